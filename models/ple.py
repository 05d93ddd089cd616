"""PLE (Progressive Layered Extraction) and its PLE* fine-tuning head (spec sections 7-8).

Notation: B batch size, D_in width of e, H PLE expert width (``ple_expert_hidden[-1]``), K tasks,
L levels, P specific experts per task and level, S shared experts per level, M = P + S.

Level ``l`` (a CGC layer) takes one input per task and one shared input (all equal to e at
level 0). Task ``k``'s output is a softmax-gated mixture (gate: Linear with bias on the task's
input) of its P specific experts and the S shared experts; except at the last level, a shared
gate on the shared input mixes all K*P + S experts into the next shared input. Gates are
Linear layers with bias, as in the authors' baseline code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import cast

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mptrec.models.base import MultiTaskModel, NewTaskHead
from mptrec.models.config import ModelConfig
from mptrec.models.layers import StackedMLP

__all__ = ["PLE", "PLEHead"]


def _at(mods: nn.ModuleList, i: int) -> StackedMLP:
    return cast(StackedMLP, mods[i])


class PLE(MultiTaskModel):
    """PLE with ``ple_levels`` CGC levels and one tower per task.

    Args:
        cfg: ``ple_levels``, ``ple_shared_experts`` (S), ``ple_specific_experts`` (P),
            ``ple_expert_hidden``, ``ple_expert_dropout``, ``tower_hidden``, ``r_dnn``.
        ebc: the EmbeddingBagCollection.
        sparse_features: EBC feature names in declared order.
        dense_dim: number of dense columns.
        task_names: the K tasks.
        task_weights: task -> BCE weight.

    Shapes:
        ``forward(dense (B, D_dense), kjt)`` -> task -> (B,); ``features``: ``e`` (B, D_in),
        ``ple_shared`` (B, L, S, H) the shared experts' outputs at every level, ``task_out``
        (B, K, H) the last level's per-task outputs.

    Example:
        >>> from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
        >>> ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
        ...     name="t_a", embedding_dim=4, num_embeddings=10, feature_names=["a"])])
        >>> cfg = ModelConfig(name="ple", ple_expert_hidden=(8,), tower_hidden=(4,))
        >>> model = PLE(cfg, ebc, sparse_features=["a"], dense_dim=1, task_names=["ctr", "cvr"])
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["a"], torch.tensor([1, 2]), torch.tensor([1, 1]))
        >>> model.features(torch.zeros(2, 1), kjt)["ple_shared"].shape
        torch.Size([2, 2, 1, 8])
    """

    new_task_methods = ("ple*",)

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
        if cfg.variant != "full":
            raise ValueError(f"model.variant = {cfg.variant!r} applies to the mptrec model only, not 'ple'")
        super().__init__(ebc, sparse_features=sparse_features, dense_dim=dense_dim, task_names=task_names,
                         task_weights=task_weights, r_dnn=cfg.r_dnn)
        self.cfg: ModelConfig = cfg
        k, p, s = len(self.task_names), cfg.ple_specific_experts, cfg.ple_shared_experts
        self.num_tasks, self.num_specific, self.num_shared = k, p, s
        self.num_levels: int = cfg.ple_levels
        self.hidden_dim: int = cfg.ple_expert_hidden[-1]
        self.specific_experts = nn.ModuleList()
        self.shared_experts = nn.ModuleList()
        self.task_gates = nn.ModuleList()
        self.shared_gates = nn.ModuleList()
        for level in range(self.num_levels):
            in_dim = self.input_dim if level == 0 else self.hidden_dim
            sizes, drop = cfg.ple_expert_hidden, cfg.ple_expert_dropout
            self.specific_experts.append(StackedMLP(k * p, in_dim, sizes, last_activation=True, dropout=drop))
            self.shared_experts.append(StackedMLP(s, in_dim, sizes, last_activation=True, dropout=drop))
            self.task_gates.append(StackedMLP(k, in_dim, (p + s,), last_activation=False))
            if level < self.num_levels - 1:
                self.shared_gates.append(StackedMLP(1, in_dim, (k * p + s,), last_activation=False))
        self.towers = StackedMLP(k, self.hidden_dim, (*cfg.tower_hidden, 1), last_activation=False)

    def _level(
        self, level: int, task_in: torch.Tensor, shared_in: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One CGC level: task inputs (K, B, in) (level 0: e (B, D_in)), shared input (B, in).

        Returns:
            task outputs (K, B, H), shared expert outputs (S, B, H), next shared input (B, H) or None.
        """
        k, p = self.num_tasks, self.num_specific
        if level == 0:
            spec = _at(self.specific_experts, level).forward_shared(task_in)
            gates = _at(self.task_gates, level).forward_shared(task_in)
        else:
            spec_in = task_in.repeat_interleave(p, dim=0) if p > 1 else task_in
            spec = _at(self.specific_experts, level)(spec_in)
            gates = _at(self.task_gates, level)(task_in)
        shared = _at(self.shared_experts, level).forward_shared(shared_in)  # (S, B, H)
        g = torch.softmax(gates, dim=-1)  # (K, B, P + S)
        batch, hidden = shared.size(1), shared.size(2)
        cand = torch.cat([spec.view(k, p, batch, hidden), shared.unsqueeze(0).expand(k, -1, -1, -1)], dim=1)
        task_out = torch.einsum("kbm,kmbh->kbh", g, cand)
        if level == self.num_levels - 1:
            return task_out, shared, None
        gs = torch.softmax(_at(self.shared_gates, level).forward_shared(shared_in)[0], dim=-1)  # (B, K*P + S)
        shared_out = torch.einsum("bm,mbh->bh", gs, torch.cat([spec, shared], dim=0))
        return task_out, shared, shared_out

    def features(self, dense: torch.Tensor, kjt: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        """``e`` (B, D_in), ``ple_shared`` (B, L, S, H), ``task_out`` (B, K, H)."""
        e = self.embed(dense, kjt)
        task_in, shared_in = e, e
        shared_outs = []
        for level in range(self.num_levels):
            task_out, shared, next_shared = self._level(level, task_in, shared_in)
            shared_outs.append(shared)
            task_in = task_out
            if next_shared is not None:
                shared_in = next_shared
        return {"e": e, "ple_shared": torch.stack(shared_outs, dim=0).permute(2, 0, 1, 3),
                "task_out": task_in.transpose(0, 1)}

    def logits_from_features(self, feats: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Task -> (B,) logits ``Tower_k(task_out_k)``."""
        logits = self.towers(feats["task_out"].transpose(0, 1)).squeeze(-1)
        return {t: logits[i] for i, t in enumerate(self.task_names)}

    def l2_parameters(self) -> list[nn.Parameter]:
        """Every expert's and tower's weight matrices (gates excluded)."""
        params = self.towers.l2_weights()
        for level in range(self.num_levels):
            params += _at(self.specific_experts, level).l2_weights()
            params += _at(self.shared_experts, level).l2_weights()
        return params

    def new_task_head(self, name: str, method: str, tower_hidden: Sequence[int] | None = None, *,
                      offset_max_rows: int = 0) -> PLEHead:
        """``ple*``: new task-specific experts and gates at every level and a new tower."""
        tower = self._check_new_task(name, method, tower_hidden, self.cfg.tower_hidden, offset_max_rows)
        return PLEHead(name, method, input_dim=self.input_dim, num_levels=self.num_levels,
                       num_specific=self.num_specific, num_shared=self.num_shared,
                       expert_hidden=self.cfg.ple_expert_hidden, expert_dropout=self.cfg.ple_expert_dropout,
                       tower_hidden=tower)


class PLEHead(NewTaskHead):
    """PLE*: the new task's own CGC path over the frozen shared experts.

    At level ``l`` the new task's P new specific experts read its previous output (e at level
    0), a new gate (Linear with bias, softmax) mixes them with the backbone's frozen shared
    experts of that level (``feats["ple_shared"][:, l]``), and a new tower reads the last
    mixture. The backbone's shared path (shared experts and shared gates) is untouched, so the
    old tasks' predictions do not change. (The authors' script instead rebuilt a one-task PLE,
    which also re-trained the level-1 shared gate.)

    Args:
        task_name: the new task.
        method: ``ple*``.
        input_dim: D_in.
        num_levels: L.
        num_specific: P.
        num_shared: S.
        expert_hidden: PLE expert sizes.
        expert_dropout: PLE expert dropout (empty: none).
        tower_hidden: tower hidden sizes.

    Shapes:
        ``forward(feats)`` with ``e`` (B, D_in), ``ple_shared`` (B, L, S, H) -> (B,).

    Example:
        >>> head = PLEHead("t3", "ple*", input_dim=6, num_levels=2, num_specific=1, num_shared=1,
        ...                expert_hidden=(4,), expert_dropout=(), tower_hidden=(2,))
        >>> head({"e": torch.rand(3, 6), "ple_shared": torch.rand(3, 2, 1, 4)}).shape
        torch.Size([3])
    """

    def __init__(
        self,
        task_name: str,
        method: str,
        *,
        input_dim: int,
        num_levels: int,
        num_specific: int,
        num_shared: int,
        expert_hidden: Sequence[int],
        expert_dropout: Sequence[float],
        tower_hidden: Sequence[int],
    ) -> None:
        super().__init__(task_name, method)
        hidden = expert_hidden[-1]
        self.experts = nn.ModuleList()
        self.gates = nn.ModuleList()
        for level in range(num_levels):
            in_dim = input_dim if level == 0 else hidden
            self.experts.append(StackedMLP(num_specific, in_dim, expert_hidden, last_activation=True,
                                           dropout=expert_dropout))
            self.gates.append(StackedMLP(1, in_dim, (num_specific + num_shared,), last_activation=False))
        self.tower = StackedMLP(1, hidden, (*tower_hidden, 1), last_activation=False)

    def forward(self, feats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(B,) logits of the new task."""
        x = feats["e"]
        shared_all = feats["ple_shared"]
        for level in range(len(self.experts)):
            spec = _at(self.experts, level).forward_shared(x)  # (P, B, H)
            shared = shared_all[:, level].transpose(0, 1)  # (S, B, H)
            g = torch.softmax(_at(self.gates, level).forward_shared(x)[0], dim=-1)  # (B, P + S)
            x = torch.einsum("bm,mbh->bh", g, torch.cat([spec, shared], dim=0))
        return self.tower.forward_shared(x)[0].squeeze(-1)

    def l2_parameters(self) -> list[nn.Parameter]:
        """The new experts' and tower's weight matrices (gates excluded)."""
        params = self.tower.l2_weights()
        for level in range(len(self.experts)):
            params += _at(self.experts, level).l2_weights()
        return params
