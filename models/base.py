"""The interface every multi-task model implements, the new-task head interface, EM labels.

Notation: B batch size, D_dense dense features, F sparse features, D_in width of the input
vector e (Eq. 1), H representation width, K number of (existing) tasks.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mptrec.models.layers import half_squared_norm

__all__ = ["RESERVED_LOSS_KEYS", "ModelOutput", "MultiTaskModel", "NewTaskHead", "em_assign"]

RESERVED_LOSS_KEYS = ("aux", "gan", "confusion", "l2")


@dataclass
class ModelOutput:
    """What ``forward_train`` returns.

    Args:
        logits: task -> (B,) logits of the main (for MPT-Rec: fused, Eq. 8) prediction.
        aux_logits: task -> (B,) logits of the MPT-Rec shared-path prediction
            ``Tower_k(h^s)`` (Eq. 9, weight beta); empty for other models.
        task_logits: (B, K) log-probabilities of the task classifier computed through the
            gradient-reversal layer (Eq. 3); None when the model has no classifier.
        confusion_logits: (B, K) log-probabilities of the frozen-weight classifier on ``h^s``
            (MPT-Rec ``adversarial = "confusion"``); None otherwise.
    """

    logits: dict[str, torch.Tensor]
    aux_logits: dict[str, torch.Tensor] = field(default_factory=dict)
    task_logits: torch.Tensor | None = None
    confusion_logits: torch.Tensor | None = None


def _per_sample_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")


def em_assign(
    logits: Mapping[str, torch.Tensor], labels: Mapping[str, torch.Tensor], task_names: Sequence[str]
) -> torch.Tensor:
    """EM task labels (spec Eq. 5): per sample, the task with the smallest BCE.

    Pass the **fused** logits (``model(dense, kjt)`` in eval mode under no_grad), not the
    shared-path ``aux_logits``. Ties go to the earlier task in ``task_names``.

    Args:
        logits: task -> (B,) logits.
        labels: task -> (B,) labels in {0, 1}.
        task_names: the K tasks, in the order that defines the label ids 0..K-1.

    Returns:
        int64 tensor (B,) with values in [0, K).

    Example:
        >>> em_assign({"a": torch.tensor([5.0, -5.0]), "b": torch.tensor([0.0, 0.0])},
        ...           {"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([1.0, 1.0])}, ["a", "b"])
        tensor([0, 1])
    """
    if not task_names:
        raise ValueError("em_assign needs at least one task")
    missing = [t for t in task_names if t not in logits or t not in labels]
    if missing:
        raise ValueError(f"em_assign: tasks {missing} missing from logits {sorted(logits)} or labels "
                         f"{sorted(labels)}")
    losses = torch.stack([_per_sample_bce(logits[t], labels[t]) for t in task_names], dim=1)
    return torch.argmin(losses, dim=1)


class MultiTaskModel(nn.Module, abc.ABC):
    """Base of every multi-task ranker: input layer (Eq. 1), loss plumbing, new-task heads.

    The input vector is ``e = [dense || pooled embeddings in sparse_features order]``, built
    with ``KeyedTensor.to_dict()`` so a sharded EBC (whose key order follows the plan) gives the
    same ``e`` on any world size.

    Args:
        ebc: the EmbeddingBagCollection (built by the pipeline, possibly on meta); stored as
            ``self.ebc``.
        sparse_features: feature names in declared order; each must be a feature of ``ebc``
            and every feature of ``ebc`` must be listed.
        dense_dim: D_dense, number of dense input columns (may be 0).
        task_names: the tasks; the keys of the output dicts.
        task_weights: task -> weight of its BCE (default 1.0 each).
        r_dnn: weight of :meth:`dense_l2` in the loss.

    Shapes:
        ``forward(dense (B, D_dense), kjt)`` -> task -> (B,) logits.

    Example:
        >>> from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
        >>> from mptrec.models import ModelConfig, build_model
        >>> ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
        ...     name="t_a", embedding_dim=4, num_embeddings=10, feature_names=["a"])])
        >>> model = build_model(ModelConfig(name="shared_bottom", expert_hidden=(8,), tower_hidden=(4,)),
        ...                     ebc, sparse_features=["a"], dense_dim=2, task_names=["ctr", "cvr"])
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["a"], torch.tensor([1, 2]), torch.tensor([1, 1]))
        >>> model.embed(torch.rand(2, 2), kjt).shape  # e = [2 dense || 4 embedding] columns
        torch.Size([2, 6])
        >>> out = model.forward_train(torch.rand(2, 2), kjt)
        >>> loss, parts = model.loss(out, {"ctr": torch.ones(2), "cvr": torch.zeros(2)})
        >>> sorted(parts)
        ['ctr', 'cvr']
    """

    #: True when the model trains a task classifier on EM labels (MPT-Rec with GAN).
    uses_em: bool = False
    #: The new-task methods (a task config's ``method``) whose heads fit this model: declared
    #: here once per model class; everything else derives from ``MODELS``
    #: (:func:`mptrec.models.registry.new_task_methods`).
    new_task_methods: ClassVar[tuple[str, ...]] = ()
    #: the methods among them whose heads read each row's sparse ids (``NewTaskHead.needs_ids``)
    #: of the single-valued features (:attr:`id_features`): they need at least one
    id_reading_methods: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        ebc: EmbeddingBagCollection,
        *,
        sparse_features: Sequence[str],
        dense_dim: int,
        task_names: Sequence[str],
        task_weights: Mapping[str, float] | None = None,
        r_dnn: float = 0.0,
    ) -> None:
        super().__init__()
        widths = _feature_widths(ebc)
        unknown = [f for f in sparse_features if f not in widths]
        unused = [f for f in widths if f not in sparse_features]
        if unknown or unused or len(set(sparse_features)) != len(sparse_features):
            raise ValueError(
                f"sparse_features {list(sparse_features)} must list each EBC feature exactly once; "
                f"not in the EBC: {unknown}, in the EBC but not listed: {unused}"
            )
        if dense_dim < 0:
            raise ValueError(f"dense_dim must be >= 0, got {dense_dim}")
        _check_tasks(task_names, task_weights)
        self.ebc: EmbeddingBagCollection = ebc
        self.sparse_features: list[str] = list(sparse_features)
        #: the single-valued sparse features (one id per row), ``sparse_features`` order: the ones
        #: :meth:`feature_ids` returns. All of them unless the builder says otherwise
        #: (:meth:`set_single_valued`; list features are pooled bags of ids)
        self.id_features: list[str] = list(sparse_features)
        self.dense_dim: int = dense_dim
        self.input_dim: int = dense_dim + sum(widths[f] for f in sparse_features)
        if self.input_dim < 1:
            raise ValueError("the input vector e is empty: no dense and no sparse features")
        self.task_names: list[str] = list(task_names)
        weights = dict(task_weights or {})
        self.task_weights: dict[str, float] = {t: float(weights.get(t, 1.0)) for t in task_names}
        if r_dnn < 0:
            raise ValueError(f"r_dnn must be >= 0, got {r_dnn}")
        self.r_dnn: float = float(r_dnn)
        #: set by whoever gives :meth:`l2_parameters` to an optimizer with ``weight_decay = r_dnn``
        #: (coupled, as ``torch.optim.Adam``'s: the same gradient ``r_dnn * W`` without autograd):
        #: :meth:`loss` then adds the L2 term's value only (``parts["l2"]`` and the total unchanged)
        self.l2_by_optimizer: bool = False

    # ---- input layer ------------------------------------------------------------------------

    def embed(self, dense: torch.Tensor, kjt: KeyedJaggedTensor) -> torch.Tensor:
        """Eq. 1: the input vector e.

        Args:
            dense: (B, D_dense) float dense features.
            kjt: sparse ids, keys = ``sparse_features`` (any order).

        Returns:
            e, (B, D_in).
        """
        torch._assert(dense.size(1) == self.dense_dim, "dense features have the wrong number of columns")
        pooled = self.ebc(kjt).to_dict()
        return torch.cat([dense] + [pooled[f] for f in self.sparse_features], dim=1)

    def id_tables(self) -> list[tuple[int, int]]:
        """``(num_embeddings, embedding_dim)`` of each sparse feature's table, ``sparse_features`` order."""
        sizes: dict[str, tuple[int, int]] = {}
        for cfg in self.ebc.embedding_bag_configs():
            for f in cfg.feature_names:
                sizes[f] = (cfg.num_embeddings, cfg.embedding_dim)
        return [sizes[f] for f in self.sparse_features]

    def set_single_valued(self, names: Sequence[str]) -> None:
        """Declare which sparse features hold exactly one id per row (the rest are list features).

        Args:
            names: a subset of ``sparse_features`` (any order).

        Raises:
            ValueError: a name is not a sparse feature of the model.
        """
        unknown = [f for f in names if f not in self.sparse_features]
        if unknown:
            raise ValueError(f"single-valued features {unknown} are not sparse features of the model "
                             f"{self.sparse_features}")
        chosen = set(names)
        self.id_features = [f for f in self.sparse_features if f in chosen]

    def feature_ids(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        """The ids of the single-valued sparse features (:attr:`id_features`), one per row and feature.

        Args:
            kjt: sparse ids, keys = ``sparse_features`` (any order).

        Returns:
            (B, len(id_features)) int64, columns in ``id_features`` order.

        Raises:
            ValueError: a feature holds other than one id per row (named with its id count).
        """
        per_key = kjt.to_dict()
        rows = kjt.stride()
        ids = [per_key[f].values() for f in self.id_features]
        wrong = [(f, v.numel()) for f, v in zip(self.id_features, ids) if v.numel() != rows]
        if wrong:
            raise ValueError(f"feature_ids needs one id per row of every single-valued sparse feature; "
                             f"batch of {rows} rows, (feature, ids): {wrong}")
        if not ids:
            return torch.zeros(rows, 0, dtype=torch.long)
        return torch.stack(ids, dim=1)

    # ---- the contract -----------------------------------------------------------------------

    def forward(self, dense: torch.Tensor, kjt: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        """Serving path: task -> (B,) logits (fx-traceable).

        Args:
            dense: (B, D_dense).
            kjt: sparse ids.

        Returns:
            task -> (B,) logits.
        """
        return self.logits_from_features(self.features(dense, kjt))

    @abc.abstractmethod
    def features(self, dense: torch.Tensor, kjt: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        """The intermediates a new-task head needs (batch-first tensors, plus parameters)."""

    @abc.abstractmethod
    def logits_from_features(self, feats: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The existing tasks' logits from ``features()`` (bit-identical to ``forward``)."""

    def forward_train(self, dense: torch.Tensor, kjt: KeyedJaggedTensor) -> ModelOutput:
        """Training path: logits plus, for MPT-Rec, the auxiliary and classifier outputs.

        Args:
            dense: (B, D_dense).
            kjt: sparse ids.

        Returns:
            A :class:`ModelOutput`.
        """
        return ModelOutput(logits=self(dense, kjt))

    @abc.abstractmethod
    def l2_parameters(self) -> list[nn.Parameter]:
        """The weight matrices of Eq. 9's dense L2 term: experts (or bottom) and towers, no biases."""

    def dense_l2(self) -> torch.Tensor:
        """Half the squared norm of :meth:`l2_parameters`."""
        return half_squared_norm(self.l2_parameters())

    def loss(
        self,
        out: ModelOutput,
        labels: Mapping[str, torch.Tensor],
        task_assign: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Eq. 9: ``sum_k w_k BCE_k + r_dnn * L2`` (+ MPT-Rec's ``beta * aux + lambda * GAN``).

        The embedding-table term ``r_emb`` is not here: the tables may be sharded with fused
        kernels, so the pipeline owns it.

        Args:
            out: from :meth:`forward_train`.
            labels: task -> (B,) labels in {0, 1}.
            task_assign: (B,) int64 EM labels; required when ``uses_em``, ignored otherwise.

        Returns:
            The total loss and its detached, *unweighted* parts: one per task (mean BCE),
            ``aux`` (sum_k w_k BCE of the aux logits), ``gan`` (NLL), ``l2`` (dense_l2).
        """
        missing = [t for t in self.task_names if t not in labels]
        if missing:
            raise ValueError(f"{type(self).__name__}.loss: labels for tasks {missing} are missing "
                             f"(got {sorted(labels)})")
        parts: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=next(iter(out.logits.values())).device)
        for t in self.task_names:
            bce = F.binary_cross_entropy_with_logits(out.logits[t], labels[t].to(out.logits[t].dtype))
            parts[t] = bce
            total = total + self.task_weights[t] * bce
        total = total + self._extra_loss(out, labels, task_assign, parts)
        if self.r_dnn > 0:
            if self.l2_by_optimizer:  # the optimizer adds r_dnn * W to the gradients: the value only
                with torch.no_grad():
                    l2 = self.dense_l2()
            else:
                l2 = self.dense_l2()
            parts["l2"] = l2
            total = total + self.r_dnn * l2
        return total, {k: v.detach() for k, v in parts.items()}

    def _extra_loss(
        self,
        out: ModelOutput,
        labels: Mapping[str, torch.Tensor],
        task_assign: torch.Tensor | None,
        parts: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """Model-specific loss terms (MPT-Rec: aux and GAN); fills ``parts``."""
        return torch.zeros((), device=next(iter(out.logits.values())).device)

    def set_grl_alpha(self, alpha: float) -> None:
        """Set the gradient-reversal strength (no-op for models without a GRL)."""

    @abc.abstractmethod
    def new_task_head(self, name: str, method: str, tower_hidden: Sequence[int] | None = None, *,
                      offset_max_rows: int = 0) -> NewTaskHead:
        """A trainable head for a new task on top of this (frozen) model's features.

        ``method`` is one of :attr:`new_task_methods`; ``tower_hidden`` None: the base towers' sizes;
        ``offset_max_rows`` > 0 (an :attr:`id_reading_methods` head only): the head's own offsets
        cover only the single-valued features whose table has at most that many rows.
        """

    def _check_new_task(self, name: str, method: str, tower_hidden: Sequence[int] | None,
                        base_tower: Sequence[int], offset_max_rows: int = 0) -> tuple[int, ...]:
        """Check ``name``, ``method`` and ``offset_max_rows``; return the new tower's sizes.

        None: ``base_tower``.
        """
        methods = self.new_task_methods
        if method not in methods:
            raise ValueError(
                f"new-task method {method!r} does not apply to model {type(self).__name__}; "
                f"use one of {list(methods)}"
            )
        if offset_max_rows < 0 or (offset_max_rows and method not in self.id_reading_methods):
            raise ValueError(f"offset_max_rows = {offset_max_rows}: must be >= 0, and > 0 only for the "
                             f"methods with per-id offsets {list(self.id_reading_methods)}, not {method!r}")
        if name in self.task_names or name in RESERVED_LOSS_KEYS or not name:
            raise ValueError(f"new task name {name!r} is empty, reserved or already a task of the model "
                             f"({self.task_names})")
        return tuple(base_tower if tower_hidden is None else tower_hidden)


class NewTaskHead(nn.Module, abc.ABC):
    """A new task's trainable module (stage 2); reads a frozen backbone's ``features()``.

    Args:
        task_name: the new task.
        method: how it was built (``mptrec``, ``fw``, ``tes``, ``shared_bottom*``, ...).

    Shapes:
        ``forward(feats)`` -> (B,) logits.

    Example:
        >>> from mptrec.models.baselines import TowerHead
        >>> head = TowerHead("t3", "shared_bottom*", hidden_dim=8, tower_hidden=(4,))
        >>> head.adapter_params()
        ['tower.weights.0', 'tower.weights.1', 'tower.biases.0', 'tower.biases.1']
        >>> head({"h_shared": torch.rand(3, 8)}).shape
        torch.Size([3])
    """

    #: whether :meth:`forward` reads ``feats["ids"]``, the (B, F) ids of the single-valued sparse
    #: features (:meth:`MultiTaskModel.feature_ids`, ``id_features`` order), besides the
    #: backbone's ``features()``
    needs_ids: bool = False

    def __init__(self, task_name: str, method: str) -> None:
        super().__init__()
        self.task_name: str = task_name
        self.method: str = method

    @abc.abstractmethod
    def forward(self, feats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(B,) logits of the new task from the backbone's features."""

    def adapter_params(self) -> list[str]:
        """Names of the trainable (adapter) parameters: every parameter of the head."""
        return [n for n, _ in self.named_parameters()]

    @abc.abstractmethod
    def l2_parameters(self) -> list[nn.Parameter]:
        """The weight matrices of Eq. 15's L2 term: the new tower's (and new experts'), no biases."""

    def l2_penalty(self) -> torch.Tensor:
        """Half the squared norm of :meth:`l2_parameters`, unscaled.

        Eq. 15 multiplies it by ``r_dnn``; the caller does (in the loss, or as the optimizer's
        weight decay on :meth:`l2_parameters`).
        """
        return half_squared_norm(self.l2_parameters())


def _feature_widths(ebc: EmbeddingBagCollection) -> dict[str, int]:
    widths: dict[str, int] = {}
    for cfg in ebc.embedding_bag_configs():
        for f in cfg.feature_names:
            if f in widths:
                raise ValueError(f"feature {f!r} is in two EBC tables")
            widths[f] = cfg.embedding_dim
    return widths


def _check_tasks(task_names: Sequence[str], task_weights: Mapping[str, float] | None) -> None:
    if not task_names or len(set(task_names)) != len(task_names):
        raise ValueError(f"task_names must be non-empty and unique, got {list(task_names)}")
    bad = [t for t in task_names if t in RESERVED_LOSS_KEYS or not t or "." in t]
    if bad:
        raise ValueError(f"task names {bad} are empty, contain '.', or are reserved {RESERVED_LOSS_KEYS}")
    for t, w in (task_weights or {}).items():
        if t not in task_names:
            raise ValueError(f"task_weights names unknown task {t!r} (tasks: {list(task_names)})")
        if w < 0:
            raise ValueError(f"task weight of {t!r} must be >= 0, got {w}")
