"""The module ``mptrec export`` writes: the frozen backbone and new-task heads on plain tensors.

:class:`ServingModule` is the computation of :class:`mptrec.models.NewTaskModel` (the old
tasks from the backbone's ``logits_from_features``, the new ones from their heads on the same
features) with the backbone's ``EmbeddingBagCollection`` replaced by :class:`PooledTables`:
per-feature ``values``/``lengths`` tensors (the KJT cut per key, in the manifest's order),
``F.embedding`` for single-valued features, ``F.embedding_bag(mode="sum")`` times ``1 / L`` for
list features (FBGEMM's pooling numerics; why, and how it is exported, in
:mod:`mptrec.pipeline.serve.export`).

Table formats (``QUANTIZE``): fp32; ``int8``, row-wise uint8 codes with an fp16 scale and bias
per row (``x = q * scale + bias``, FBGEMM's 8-bit row-wise layout,
:func:`quantize_rowwise_int8`); or ``fp16`` rows. Rows are de-quantised after the lookup and
pooling runs in fp32.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from mptrec.data_loaders.schema import FeatureSpec
from mptrec.models.base import MultiTaskModel, NewTaskHead

__all__ = [
    "QUANTIZE",
    "PooledEmbeddings",
    "PooledTables",
    "ServingModule",
    "SparseBatch",
    "pack_rowwise_int8",
    "quantize_rowwise_int8",
]

QUANTIZE = ("int8", "fp16")


@dataclass
class SparseBatch:
    """The sparse inputs as the program receives them: per feature, ids and ids per row."""

    values: list[torch.Tensor]
    lengths: list[torch.Tensor]


class PooledEmbeddings:
    """What :class:`PooledTables` returns: ``to_dict()`` like TorchRec's ``KeyedTensor``."""

    def __init__(self, pooled: dict[str, torch.Tensor]) -> None:
        self._pooled = pooled

    def to_dict(self) -> dict[str, torch.Tensor]:
        """Feature -> (B, D_f) pooled embedding."""
        return self._pooled


def quantize_rowwise_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row-wise 8-bit quantisation: uint8 codes, fp16 scale and bias per row.

    ``x ~= q * scale + bias`` with ``bias`` the row minimum and ``scale = (max - min) / 255``,
    both rounded to fp16 before the codes are computed (so de-quantisation uses exactly them).

    Args:
        weight: (rows, D) float table.

    Returns:
        ``(q (rows, D) uint8, scale (rows,) fp16, bias (rows,) fp16)``.
    """
    w = weight.detach().float()
    lo, hi = w.min(dim=1).values, w.max(dim=1).values
    scale = ((hi - lo) / 255.0).half()
    bias = lo.half()
    s = scale.float().clamp_min(torch.finfo(torch.float16).tiny).unsqueeze(1)
    q = torch.round((w - bias.float().unsqueeze(1)) / s).clamp(0, 255).to(torch.uint8)
    return q, scale, bias


def _as_words(t: torch.Tensor) -> torch.Tensor:
    """A (rows, n) tensor of 1- or 2-byte elements as (rows, ceil(bytes / 4)) int32 words.

    Rows are padded with zero bytes to a multiple of 4; a row lookup then moves whole words
    (``index_select`` on int32 is several times faster than on uint8 / fp16 rows here).
    """
    raw = t.contiguous().view(torch.uint8)
    pad = (-raw.shape[1]) % 4
    if pad:
        raw = torch.cat([raw, torch.zeros(raw.shape[0], pad, dtype=torch.uint8)], dim=1)
    return raw.view(torch.int32)


def pack_rowwise_int8(weight: torch.Tensor) -> torch.Tensor:
    """:func:`quantize_rowwise_int8` packed one row per word run: codes, zero padding, fp16 scale, bias.

    Args:
        weight: (rows, D) float table.

    Returns:
        (rows, W) int32 with ``4 W = D + pad + 4`` bytes a row (FBGEMM's fused 8-bit row layout,
        padded to whole words).
    """
    q, scale, bias = quantize_rowwise_int8(weight)
    pad = (-q.shape[1]) % 4
    sb = torch.stack([scale, bias], dim=1).view(torch.uint8)
    parts = [q, torch.zeros(q.shape[0], pad, dtype=torch.uint8), sb]
    return torch.cat(parts, dim=1).view(torch.int32)


class PooledTables(nn.Module):
    """Unsharded embedding tables with FBGEMM's pooling numerics, fed by plain tensors.

    Replaces the backbone's ``EmbeddingBagCollection`` in the exported module. Sum pooling is
    ``F.embedding_bag(mode="sum")``; mean pooling multiplies that sum by ``1 / L`` (as FBGEMM's
    kernels do; ``aten``'s mode ``mean`` divides and differs in the last bit); an empty bag
    pools to zeros. Single-valued features are a plain row lookup.

    Args:
        features: the sparse features, in the program's input order.
        weights: feature -> (num_embeddings, D) fp32 table.
        quantize: None (fp32), ``int8`` (:func:`quantize_rowwise_int8`) or ``fp16``.

    Shapes:
        ``forward(SparseBatch)`` with per feature f ``values[f]`` (N_f,) int64 and
        ``lengths[f]`` (B,) int64 -> :class:`PooledEmbeddings` of (B, D_f) tensors.

    Example:
        >>> f = FeatureSpec("a", num_embeddings=3, embedding_dim=2, multivalent=True, pooling="mean")
        >>> t = PooledTables([f], {"a": torch.arange(6.0).view(3, 2)})
        >>> t(SparseBatch([torch.tensor([0, 2, 1])], [torch.tensor([2, 1])])).to_dict()["a"]
        tensor([[2., 3.],
                [2., 3.]])
    """

    def __init__(self, features: Sequence[FeatureSpec], weights: Mapping[str, torch.Tensor],
                 quantize: str | None = None) -> None:
        super().__init__()
        if quantize not in (None, *QUANTIZE):
            raise ValueError(f"--quantize {quantize!r}: expected one of {list(QUANTIZE)}")
        self.names: list[str] = [f.name for f in features]
        self.multi: list[bool] = [f.multivalent for f in features]
        self.mean: list[bool] = [f.pooling == "mean" for f in features]
        self.quantize: str | None = quantize
        self.dims: list[int] = [f.embedding_dim for f in features]
        for i, f in enumerate(features):
            w = weights[f.name].detach().to(torch.float32).contiguous()
            if quantize == "int8":
                self.register_buffer(f"w{i}", pack_rowwise_int8(w))
            elif quantize == "fp16":
                self.register_buffer(f"w{i}", _as_words(w.half()))
            else:
                self.register_buffer(f"w{i}", w)  # shares the loaded table's memory (no copy)

    def table_bytes(self) -> int:
        """Bytes of the tables as stored (codes, scales and biases included)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def _rows(self, i: int, ids: torch.Tensor) -> torch.Tensor:
        """The (de-quantised, fp32) table rows of ``ids`` of feature ``i``."""
        rows = getattr(self, f"w{i}").index_select(0, ids)
        if self.quantize == "int8":
            packed = rows.view(torch.uint8)  # (N, row bytes): codes, padding, fp16 scale and bias
            sb = rows[:, -1:].view(torch.float16).float()  # the last word: (N, 2) scale, bias
            return torch.addcmul(sb[:, 1:2], packed.float()[:, : self.dims[i]], sb[:, 0:1])
        if self.quantize == "fp16":
            return rows.view(torch.float16)[:, : self.dims[i]].float()
        return rows

    def forward(self, sparse: SparseBatch) -> PooledEmbeddings:
        """Pooled embeddings of every feature.

        Args:
            sparse: per feature, values (N_f,) and lengths (B,).

        Returns:
            feature -> (B, D_f).
        """
        out: dict[str, torch.Tensor] = {}
        for i, name in enumerate(self.names):
            values, lengths = sparse.values[i], sparse.lengths[i]
            if not self.multi[i]:
                out[name] = self._rows(i, values)
                continue
            offsets = torch.cumsum(lengths, 0) - lengths
            if self.quantize is None:
                pooled = F.embedding_bag(values, getattr(self, f"w{i}"), offsets, mode="sum")
            else:
                rows = self._rows(i, values)
                idx = torch.arange(rows.size(0), dtype=values.dtype, device=values.device)
                pooled = F.embedding_bag(idx, rows, offsets, mode="sum")
            if self.mean[i]:
                pooled = pooled * (1.0 / lengths.clamp_min(1).to(pooled.dtype)).unsqueeze(1)
            out[name] = pooled
        return PooledEmbeddings(out)


class ServingModule(nn.Module):
    """The frozen backbone (tables replaced by :class:`PooledTables`) and new-task heads.

    The same computation as :class:`mptrec.models.NewTaskModel` (old tasks from
    ``logits_from_features``, new ones from their heads on the same features), on plain tensors.

    Args:
        backbone: the unsharded stage-1 model with loaded weights (its ``ebc`` is replaced).
        heads: new task name -> trained head.
        tables: the backbone's tables as :class:`PooledTables`.
        task_names: the outputs, in order (default: the backbone's tasks, then the heads').

    Shapes:
        ``forward(dense (B, D_dense), values [F x (N_f,)], lengths [F x (B,)])`` -> task -> (B,).

    Example:
        >>> from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
        >>> from mptrec.models import ModelConfig, build_model
        >>> ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
        ...     name="t_a", embedding_dim=4, num_embeddings=10, feature_names=["a"])])
        >>> base = build_model(ModelConfig(expert_hidden=(8, 4), tower_hidden=(4,)), ebc,
        ...                    sparse_features=["a"], dense_dim=1, task_names=["ctr", "cvr"])
        >>> feats = [FeatureSpec("a", num_embeddings=10, embedding_dim=4)]
        >>> tables = PooledTables(feats, {"a": ebc.embedding_bags["t_a"].weight})
        >>> serving = ServingModule(base, {"t3": base.new_task_head("t3", "mptrec")}, tables)
        >>> out = serving(torch.rand(3, 1), [torch.tensor([1, 2, 9])], [torch.ones(3, dtype=torch.long)])
        >>> {t: v.shape for t, v in out.items()}
        {'ctr': torch.Size([3]), 'cvr': torch.Size([3]), 't3': torch.Size([3])}
    """

    def __init__(self, backbone: MultiTaskModel, heads: Mapping[str, NewTaskHead], tables: PooledTables,
                 task_names: Sequence[str] | None = None) -> None:
        super().__init__()
        if tables.names != backbone.sparse_features:
            raise ValueError(f"tables {tables.names} are not the backbone's sparse features "
                             f"{backbone.sparse_features} in order")
        lists = [n for n, multi in zip(tables.names, tables.multi) if multi]
        readers = [n for n, h in heads.items() if h.needs_ids]
        wrong = [f for f in backbone.id_features if f in lists]
        if readers and wrong:
            raise ValueError(f"heads {readers} read each row's id of the backbone's single-valued "
                             f"features {backbone.id_features}, but {wrong} are list features here")
        self.needs_ids: bool = bool(readers)
        #: indices into the sparse inputs of the features whose ids the heads read
        self.id_columns: list[int] = [tables.names.index(f) for f in backbone.id_features]
        backbone._modules["ebc"] = tables  # embed() calls self.ebc(sparse).to_dict()
        self.backbone: MultiTaskModel = backbone
        self.heads = nn.ModuleDict(dict(heads))
        self.task_names: list[str] = list(task_names or [*backbone.task_names, *heads])
        self.requires_grad_(False)
        self.eval()

    def forward(self, dense: torch.Tensor, values: list[torch.Tensor],
                lengths: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Logits of every exported task.

        Args:
            dense: (B, D_dense) float32.
            values: per sparse feature, (N_f,) int64 ids.
            lengths: per sparse feature, (B,) int64 ids per row.

        Returns:
            task -> (B,) logits, in ``task_names`` order.
        """
        feats = self.backbone.features(dense, cast(Any, SparseBatch(values, lengths)))
        out = self.backbone.logits_from_features(feats)
        if self.needs_ids:  # single-valued features: values[i] holds one id per row
            feats = {**feats, "ids": torch.stack([values[i] for i in self.id_columns], dim=1)}
        for name, head in self.heads.items():
            out[name] = head(feats)
        return {t: out[t] for t in self.task_names}
