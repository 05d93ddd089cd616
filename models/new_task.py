"""Stage 2: a frozen backbone plus trainable new-task heads (spec section 4).

Freezing is real, not "left out of the optimizer": the backbone gets ``requires_grad_(False)``,
stays in ``eval()`` mode whatever ``train()`` is called with, and runs under ``torch.no_grad()``;
its outputs are also ``detach()``-ed, so that an fx-traced copy (which drops ``no_grad``) still
sends no gradient into the backbone or into fused embedding kernels.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mptrec.models.base import MultiTaskModel, NewTaskHead

__all__ = ["NewTaskModel", "freeze"]


def freeze(module: nn.Module) -> nn.Module:
    """Freeze ``module`` in place: ``requires_grad_(False)`` and ``eval()``; returns it."""
    module.requires_grad_(False)
    return module.eval()


class NewTaskModel(nn.Module):
    """A frozen :class:`MultiTaskModel` and new-task heads trained on its features.

    Args:
        backbone: the stage-1 model (frozen here, in place).
        heads: new task name -> head from ``backbone.new_task_head(...)``.

    Shapes:
        ``forward(dense (B, D_dense), kjt)`` -> task -> (B,) logits for the backbone's tasks
        (bit-identical to ``backbone(dense, kjt)``) and the new ones.

    Example:
        >>> from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
        >>> from mptrec.models.config import ModelConfig
        >>> from mptrec.models.mptrec import MPTRec
        >>> ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
        ...     name="t_a", embedding_dim=4, num_embeddings=10, feature_names=["a"])])
        >>> cfg = ModelConfig(expert_hidden=(16, 8), tower_hidden=(4,))
        >>> base = MPTRec(cfg, ebc, sparse_features=["a"], dense_dim=0, task_names=["ctr", "cvr"])
        >>> model = NewTaskModel(base, {"t3": base.new_task_head("t3", "mptrec")})
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["a"], torch.tensor([1, 2]), torch.tensor([1, 1]))
        >>> sorted(model(torch.zeros(2, 0), kjt)), model.task_names
        (['ctr', 'cvr', 't3'], ['ctr', 'cvr', 't3'])
    """

    def __init__(self, backbone: MultiTaskModel, heads: Mapping[str, NewTaskHead]) -> None:
        super().__init__()
        if not heads:
            raise ValueError("NewTaskModel needs at least one new-task head")
        clash = [n for n in heads if n in backbone.task_names]
        if clash:
            raise ValueError(f"new tasks {clash} are already tasks of the backbone {backbone.task_names}")
        wrong = [(n, h.task_name) for n, h in heads.items() if h.task_name != n]
        if wrong:
            raise ValueError(f"heads registered under another task's name (key, head.task_name): {wrong}")
        self.backbone: MultiTaskModel = backbone
        self.heads = nn.ModuleDict(dict(heads))
        self.new_task_names: list[str] = list(heads)
        self.task_names: list[str] = [*backbone.task_names, *self.new_task_names]
        self.needs_ids: bool = any(cast(NewTaskHead, h).needs_ids for h in heads.values())
        freeze(self.backbone)

    def train(self, mode: bool = True) -> NewTaskModel:
        """Set the heads' mode; the backbone always stays in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    def backbone_features(self, dense: torch.Tensor, kjt: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        """The frozen backbone's features, computed without autograd and detached.

        Plus ``ids`` (B, F), each row's sparse ids, when a head reads them
        (:attr:`NewTaskHead.needs_ids`).
        """
        with torch.no_grad():
            feats = self.backbone.features(dense, kjt)
        out = {k: v.detach() for k, v in feats.items()}
        if self.needs_ids:
            out["ids"] = self.backbone.feature_ids(kjt)
        return out

    def forward(self, dense: torch.Tensor, kjt: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        """Logits of every task.

        Args:
            dense: (B, D_dense).
            kjt: sparse ids.

        Returns:
            task -> (B,) logits: the backbone's tasks first, then the new ones.
        """
        feats = self.backbone_features(dense, kjt)
        with torch.no_grad():
            old = self.backbone.logits_from_features(feats)
        out = {k: v.detach() for k, v in old.items()}
        for name, head in self.heads.items():
            out[name] = head(feats)
        return out

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The heads' parameters (the only ones that may be given to an optimizer)."""
        return [p for p in self.heads.parameters() if p.requires_grad]

    def l2_penalty(self) -> torch.Tensor:
        """Sum of the heads' :meth:`NewTaskHead.l2_penalty` (Eq. 15, before ``r_dnn``)."""
        penalties = [cast(NewTaskHead, head).l2_penalty() for head in self.heads.values()]
        total = penalties[0]
        for p in penalties[1:]:
            total = total + p
        return total
