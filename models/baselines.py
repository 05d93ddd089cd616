"""Baselines of spec section 8 (Single Task, Shared Bottom, MMoE) and their fine-tuning heads.

Notation: B batch size, D_in width of e, H expert output width, K tasks, E MMoE experts. Every
model shares the input layer (Eq. 1, one EBC); towers are ``H -> tower_hidden -> 1`` with ReLU
on the hidden layers; experts/bottoms have ReLU after every layer (as MPT-Rec's experts).
PLE lives in :mod:`mptrec.models.ple`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mptrec.models.base import MultiTaskModel, NewTaskHead
from mptrec.models.config import ModelConfig
from mptrec.models.layers import StackedMLP

__all__ = ["MMoE", "MMoEHead", "SharedBottom", "SingleTask", "SingleTaskHead", "TowerHead"]


def _towers(num: int, in_dim: int, tower_hidden: Sequence[int]) -> StackedMLP:
    return StackedMLP(num, in_dim, (*tower_hidden, 1), last_activation=False)


def _check_variant(cfg: ModelConfig) -> None:
    if cfg.variant != "full":
        raise ValueError(
            f"model.variant = {cfg.variant!r} applies to the mptrec model only, not {cfg.name!r}"
        )


class _Baseline(MultiTaskModel):
    """Shared constructor plumbing of the baselines (no GAN, no aux loss)."""

    def __init__(
        self,
        cfg: ModelConfig,
        ebc: EmbeddingBagCollection,
        *,
        sparse_features: Sequence[str],
        dense_dim: int,
        task_names: Sequence[str],
        task_weights: Mapping[str, float] | None = None,
    ) -> None:
        _check_variant(cfg)
        super().__init__(ebc, sparse_features=sparse_features, dense_dim=dense_dim, task_names=task_names,
                         task_weights=task_weights, r_dnn=cfg.r_dnn)
        self.cfg: ModelConfig = cfg
        self.num_tasks: int = len(self.task_names)
        self.hidden_dim: int = cfg.hidden_dim

    def _as_dict(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        return {t: logits[i] for i, t in enumerate(self.task_names)}


class SingleTask(_Baseline):
    """One independent network per task (expert MLP + tower) over the shared input layer.

    Args:
        cfg: ``expert_hidden``, ``expert_dropout``, ``tower_hidden``, ``r_dnn``.
        ebc: the EmbeddingBagCollection (the only shared part).
        sparse_features: EBC feature names in declared order.
        dense_dim: number of dense columns.
        task_names: the K tasks.
        task_weights: task -> BCE weight.

    Shapes:
        ``forward(dense (B, D_dense), kjt)`` -> task -> (B,); ``features``: ``e`` (B, D_in),
        ``h`` (B, K, H).

    Example:
        >>> from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
        >>> ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
        ...     name="t_a", embedding_dim=4, num_embeddings=10, feature_names=["a"])])
        >>> cfg = ModelConfig(name="single_task", expert_hidden=(16, 8), tower_hidden=(4,))
        >>> model = SingleTask(cfg, ebc, sparse_features=["a"], dense_dim=0, task_names=["ctr", "cvr"])
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["a"], torch.tensor([1, 2]), torch.tensor([1, 1]))
        >>> model(torch.zeros(2, 0), kjt)["cvr"].shape
        torch.Size([2])
    """

    new_task_methods = ("single_task",)

    def __init__(
        self,
        cfg: ModelConfig,
        ebc: EmbeddingBagCollection,
        *,
        sparse_features: Sequence[str],
        dense_dim: int,
        task_names: Sequence[str],
        task_weights: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__(cfg, ebc, sparse_features=sparse_features, dense_dim=dense_dim,
                         task_names=task_names, task_weights=task_weights)
        self.experts = StackedMLP(self.num_tasks, self.input_dim, cfg.expert_hidden, last_activation=True,
                                  dropout=cfg.expert_dropout)
        self.towers = _towers(self.num_tasks, self.hidden_dim, cfg.tower_hidden)

    def features(self, dense: torch.Tensor, kjt: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        """``e`` (B, D_in) and every task's expert output ``h`` (B, K, H)."""
        e = self.embed(dense, kjt)
        return {"e": e, "h": self.experts.forward_shared(e).transpose(0, 1)}

    def logits_from_features(self, feats: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Task -> (B,) logits: ``Tower_k(h_k)``."""
        return self._as_dict(self.towers(feats["h"].transpose(0, 1)).squeeze(-1))

    def l2_parameters(self) -> list[nn.Parameter]:
        """The expert and tower weight matrices."""
        return self.experts.l2_weights() + self.towers.l2_weights()

    def new_task_head(self, name: str, method: str, tower_hidden: Sequence[int] | None = None, *,
                      offset_max_rows: int = 0) -> SingleTaskHead:
        """``single_task``: a fresh expert + tower on the frozen input vector e (embeddings frozen)."""
        tower = self._check_new_task(name, method, tower_hidden, self.cfg.tower_hidden, offset_max_rows)
        return SingleTaskHead(name, method, input_dim=self.input_dim, expert_hidden=self.cfg.expert_hidden,
                              expert_dropout=self.cfg.expert_dropout, tower_hidden=tower)


class SharedBottom(_Baseline):
    """Shared-bottom MLP (``expert_hidden``) and one tower per task.

    Args:
        cfg: ``expert_hidden`` (bottom sizes), ``expert_dropout``, ``tower_hidden``, ``r_dnn``.
        ebc: the EmbeddingBagCollection.
        sparse_features: EBC feature names in declared order.
        dense_dim: number of dense columns.
        task_names: the K tasks.
        task_weights: task -> BCE weight.

    Shapes:
        ``forward(dense (B, D_dense), kjt)`` -> task -> (B,); ``features``: ``e`` (B, D_in),
        ``h_shared`` (B, H).

    Example:
        >>> from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
        >>> ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
        ...     name="t_a", embedding_dim=4, num_embeddings=10, feature_names=["a"])])
        >>> cfg = ModelConfig(name="shared_bottom", expert_hidden=(16, 8), tower_hidden=(4,))
        >>> model = SharedBottom(cfg, ebc, sparse_features=["a"], dense_dim=1, task_names=["ctr"])
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["a"], torch.tensor([1, 2]), torch.tensor([1, 1]))
        >>> model(torch.zeros(2, 1), kjt)["ctr"].shape
        torch.Size([2])
    """

    new_task_methods = ("shared_bottom*",)

    def __init__(
        self,
        cfg: ModelConfig,
        ebc: EmbeddingBagCollection,
        *,
        sparse_features: Sequence[str],
        dense_dim: int,
        task_names: Sequence[str],
        task_weights: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__(cfg, ebc, sparse_features=sparse_features, dense_dim=dense_dim,
                         task_names=task_names, task_weights=task_weights)
        self.bottom = StackedMLP(1, self.input_dim, cfg.expert_hidden, last_activation=True,
                                 dropout=cfg.expert_dropout)
        self.towers = _towers(self.num_tasks, self.hidden_dim, cfg.tower_hidden)

    def features(self, dense: torch.Tensor, kjt: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        """``e`` (B, D_in) and the bottom's output ``h_shared`` (B, H)."""
        e = self.embed(dense, kjt)
        return {"e": e, "h_shared": self.bottom.forward_shared(e)[0]}

    def logits_from_features(self, feats: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Task -> (B,) logits: ``Tower_k(h_shared)``."""
        return self._as_dict(self.towers.forward_shared(feats["h_shared"]).squeeze(-1))

    def l2_parameters(self) -> list[nn.Parameter]:
        """The bottom and tower weight matrices."""
        return self.bottom.l2_weights() + self.towers.l2_weights()

    def new_task_head(self, name: str, method: str, tower_hidden: Sequence[int] | None = None, *,
                      offset_max_rows: int = 0) -> TowerHead:
        """``shared_bottom*``: a new tower only, on the frozen bottom output."""
        tower = self._check_new_task(name, method, tower_hidden, self.cfg.tower_hidden, offset_max_rows)
        return TowerHead(name, method, hidden_dim=self.hidden_dim, tower_hidden=tower)


class MMoE(_Baseline):
    """MMoE: ``num_experts`` experts, per-task softmax gates on e (no bias), towers.

    Args:
        cfg: ``num_experts``, ``expert_hidden``, ``expert_dropout``, ``tower_hidden``, ``r_dnn``.
        ebc: the EmbeddingBagCollection.
        sparse_features: EBC feature names in declared order.
        dense_dim: number of dense columns.
        task_names: the K tasks.
        task_weights: task -> BCE weight.

    Shapes:
        ``forward(dense (B, D_dense), kjt)`` -> task -> (B,); ``features``: ``e`` (B, D_in),
        ``experts`` (B, E, H).

    Example:
        >>> from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
        >>> ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
        ...     name="t_a", embedding_dim=4, num_embeddings=10, feature_names=["a"])])
        >>> cfg = ModelConfig(name="mmoe", expert_hidden=(16, 8), tower_hidden=(4,), num_experts=3)
        >>> model = MMoE(cfg, ebc, sparse_features=["a"], dense_dim=1, task_names=["ctr", "cvr"])
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["a"], torch.tensor([1, 2]), torch.tensor([1, 1]))
        >>> model.features(torch.zeros(2, 1), kjt)["experts"].shape
        torch.Size([2, 3, 8])
    """

    new_task_methods = ("mmoe*",)

    def __init__(
        self,
        cfg: ModelConfig,
        ebc: EmbeddingBagCollection,
        *,
        sparse_features: Sequence[str],
        dense_dim: int,
        task_names: Sequence[str],
        task_weights: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__(cfg, ebc, sparse_features=sparse_features, dense_dim=dense_dim,
                         task_names=task_names, task_weights=task_weights)
        self.num_experts: int = cfg.num_experts
        self.experts = StackedMLP(cfg.num_experts, self.input_dim, cfg.expert_hidden, last_activation=True,
                                  dropout=cfg.expert_dropout)
        self.gates = nn.Linear(self.input_dim, self.num_tasks * cfg.num_experts, bias=False)
        self.towers = _towers(self.num_tasks, self.hidden_dim, cfg.tower_hidden)

    def features(self, dense: torch.Tensor, kjt: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        """``e`` (B, D_in) and the expert outputs ``experts`` (B, E, H)."""
        e = self.embed(dense, kjt)
        return {"e": e, "experts": self.experts.forward_shared(e).transpose(0, 1)}

    def logits_from_features(self, feats: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Task -> (B,) logits: ``Tower_k(sum_j g_kj(e) expert_j)``."""
        g = torch.softmax(self.gates(feats["e"]).view(-1, self.num_tasks, self.num_experts), dim=-1)
        mixed = torch.bmm(g, feats["experts"]).transpose(0, 1)  # (K, B, H)
        return self._as_dict(self.towers(mixed).squeeze(-1))

    def l2_parameters(self) -> list[nn.Parameter]:
        """The expert and tower weight matrices (gates excluded)."""
        return self.experts.l2_weights() + self.towers.l2_weights()

    def new_task_head(self, name: str, method: str, tower_hidden: Sequence[int] | None = None, *,
                      offset_max_rows: int = 0) -> MMoEHead:
        """``mmoe*``: a new gate and a new tower over the frozen experts."""
        tower = self._check_new_task(name, method, tower_hidden, self.cfg.tower_hidden, offset_max_rows)
        return MMoEHead(name, method, input_dim=self.input_dim, num_experts=self.num_experts,
                        hidden_dim=self.hidden_dim, tower_hidden=tower)


class TowerHead(NewTaskHead):
    """Shared Bottom*: a new tower on the frozen shared representation ``h_shared``.

    Args:
        task_name: the new task.
        method: ``shared_bottom*``.
        hidden_dim: H.
        tower_hidden: new tower hidden sizes.

    Shapes:
        ``forward(feats)`` with ``h_shared`` (B, H) -> (B,).

    Example:
        >>> head = TowerHead("t3", "shared_bottom*", hidden_dim=128, tower_hidden=(64, 32))
        >>> sum(p.numel() for p in head.parameters()), head({"h_shared": torch.rand(5, 128)}).shape
        (10369, torch.Size([5]))
    """

    def __init__(self, task_name: str, method: str, *, hidden_dim: int, tower_hidden: Sequence[int]) -> None:
        super().__init__(task_name, method)
        self.tower = _towers(1, hidden_dim, tower_hidden)

    def forward(self, feats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(B,) logits ``Tower_new(h_shared)``."""
        return self.tower.forward_shared(feats["h_shared"])[0].squeeze(-1)

    def l2_parameters(self) -> list[nn.Parameter]:
        """The new tower's weight matrices."""
        return self.tower.l2_weights()


class SingleTaskHead(NewTaskHead):
    """Single-task new head: a fresh expert and tower on the frozen input vector ``e``.

    Args:
        task_name: the new task.
        method: ``single_task``.
        input_dim: D_in.
        expert_hidden: expert sizes.
        expert_dropout: expert dropout (empty: none).
        tower_hidden: tower hidden sizes.

    Shapes:
        ``forward(feats)`` with ``e`` (B, D_in) -> (B,).

    Example:
        >>> head = SingleTaskHead("t3", "single_task", input_dim=6, expert_hidden=(8, 4), expert_dropout=(),
        ...                       tower_hidden=(2,))
        >>> head({"e": torch.rand(3, 6)}).shape
        torch.Size([3])
    """

    def __init__(
        self,
        task_name: str,
        method: str,
        *,
        input_dim: int,
        expert_hidden: Sequence[int],
        expert_dropout: Sequence[float],
        tower_hidden: Sequence[int],
    ) -> None:
        super().__init__(task_name, method)
        self.expert = StackedMLP(1, input_dim, expert_hidden, last_activation=True, dropout=expert_dropout)
        self.tower = _towers(1, expert_hidden[-1], tower_hidden)

    def forward(self, feats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(B,) logits ``Tower_new(Expert_new(e))``."""
        return self.tower(self.expert.forward_shared(feats["e"]))[0].squeeze(-1)

    def l2_parameters(self) -> list[nn.Parameter]:
        """The new expert's and tower's weight matrices."""
        return self.expert.l2_weights() + self.tower.l2_weights()


class MMoEHead(NewTaskHead):
    """MMoE*: a new softmax gate (no bias) on e over the frozen experts, and a new tower.

    Args:
        task_name: the new task.
        method: ``mmoe*``.
        input_dim: D_in.
        num_experts: E.
        hidden_dim: H.
        tower_hidden: tower hidden sizes.

    Shapes:
        ``forward(feats)`` with ``e`` (B, D_in), ``experts`` (B, E, H) -> (B,).

    Example:
        >>> head = MMoEHead("t3", "mmoe*", input_dim=6, num_experts=3, hidden_dim=4, tower_hidden=(2,))
        >>> head({"e": torch.rand(5, 6), "experts": torch.rand(5, 3, 4)}).shape
        torch.Size([5])
    """

    def __init__(
        self,
        task_name: str,
        method: str,
        *,
        input_dim: int,
        num_experts: int,
        hidden_dim: int,
        tower_hidden: Sequence[int],
    ) -> None:
        super().__init__(task_name, method)
        self.gate = nn.Linear(input_dim, num_experts, bias=False)
        self.tower = _towers(1, hidden_dim, tower_hidden)

    def forward(self, feats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(B,) logits ``Tower_new(sum_j g_j(e) expert_j)``."""
        g = torch.softmax(self.gate(feats["e"]), dim=-1)
        mixed = torch.bmm(g.unsqueeze(1), feats["experts"]).squeeze(1)
        return self.tower.forward_shared(mixed)[0].squeeze(-1)

    def l2_parameters(self) -> list[nn.Parameter]:
        """The new tower's weight matrices (gate excluded)."""
        return self.tower.l2_weights()
