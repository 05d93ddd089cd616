"""MPT-Rec (spec section 3): disentangled experts, task prompts, gates, GAN; new-task prompt tuning.

Notation: B batch size, D_in width of the input vector e, H representation width (last expert
size), K number of existing tasks. The shared expert and the K specific experts share one shape
and run as one :class:`~mptrec.models.layers.StackedMLP` (network 0 = shared, 1..K = specific);
the K towers likewise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mptrec.models.base import ModelOutput, MultiTaskModel, NewTaskHead
from mptrec.models.config import ModelConfig
from mptrec.models.layers import StackedMLP, grad_reverse

__all__ = ["MPTRec", "MPTRecNewTaskHead"]

# fx patches the name in the module that calls wrap(): a traced forward_train keeps the GRL
# as one opaque call instead of tracing into autograd.Function.apply.
torch.fx.wrap("grad_reverse")

#: rank of the residual path e -> (D_in x r) -> (r x H) -> tower input of the ``*_res`` heads
RESIDUAL_RANKS = {"mptrec_res": 8, "mptrec_emb": 1}
#: width of the one-hidden-layer residual path e -> (D_in x m) + b -> ReLU -> (m x H) of ``mptrec_mlp``
MLP_RESIDUAL_HIDDEN = {"mptrec_mlp": 32}
#: the Eq. 10 projection's hidden width is H // this (the paper's: 2, for the other methods)
PROJECTION_DIVISOR = {"mptrec_mlp": 8}
#: heads with their own zero-initialised per-id offsets of the frozen tables (``e' = e + delta``)
DELTA_METHODS = ("mptrec_emb", "mptrec_mlp")
_VARIANTS = ("full", "share", "specific", "no_gan")


class MPTRec(MultiTaskModel):
    """MPT-Rec stage-1 model (Eq. 1-9) with the ablation variants of spec section 8.

    - ``full``: ``f^k = g^k_1 (h^k * p^k) + g^k_2 h^s``, ``y^k = Tower_k(f^k)``; aux loss on
      ``Tower_k(h^s)``; task classifier on ``GRL(h^s)``.
    - ``share``: only the shared expert: ``y^k = Tower_k(h^s)``; no specific experts, gates or
      task embeddings (they would be unused); classifier and aux loss kept; in ``features()``
      the specific representations (and the prompts) are zero.
    - ``specific``: ``y^k = Tower_k(h^k * p^k)``; no gates; shared expert, aux loss and
      classifier kept (as in the fork); in ``features()`` ``h_shared`` is zero.
    - ``no_gan``: ``full`` without the classifier and its loss (so no EM labels).

    Args:
        cfg: ``expert_hidden`` (last = H), ``expert_dropout``, ``tower_hidden``, ``variant``,
            ``gan_weight`` (lambda), ``aux_weight`` (beta), ``grl_alpha`` (initial alpha),
            ``tau`` (new heads), ``r_dnn``.
        ebc: the EmbeddingBagCollection; stored as ``self.ebc``.
        sparse_features: EBC feature names in declared order (Eq. 1 order).
        dense_dim: number of dense columns (first in e).
        task_names: the K tasks.
        task_weights: task -> BCE weight (default 1).

    Shapes:
        ``forward(dense (B, D_dense), kjt)`` -> task -> (B,) logits.
        ``features`` -> ``e`` (B, D_in), ``h_shared`` (B, H), ``h_specific`` (B, K, H),
        ``prompts`` (K, H).

    Example:
        >>> from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
        >>> ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
        ...     name="t_a", embedding_dim=4, num_embeddings=10, feature_names=["a"])])
        >>> cfg = ModelConfig(expert_hidden=(16, 8), tower_hidden=(4,))
        >>> model = MPTRec(cfg, ebc, sparse_features=["a"], dense_dim=2, task_names=["ctr", "cvr"])
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["a"], torch.tensor([1, 2, 3]), torch.tensor([1, 1, 1]))
        >>> {t: v.shape for t, v in model(torch.rand(3, 2), kjt).items()}
        {'ctr': torch.Size([3]), 'cvr': torch.Size([3])}
        >>> model.new_task_head("t3", "mptrec")(model.features(torch.rand(3, 2), kjt)).shape
        torch.Size([3])
    """

    new_task_methods = ("mptrec", "mptrec_res", "mptrec_emb", "mptrec_mlp", "fw", "tes")
    id_reading_methods = DELTA_METHODS

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
        super().__init__(ebc, sparse_features=sparse_features, dense_dim=dense_dim, task_names=task_names,
                         task_weights=task_weights, r_dnn=cfg.r_dnn)
        if cfg.variant not in _VARIANTS:
            raise ValueError(f"unknown MPT-Rec variant {cfg.variant!r}; expected one of {_VARIANTS}")
        self.cfg: ModelConfig = cfg
        self.variant: str = cfg.variant
        num_tasks, hidden = len(self.task_names), cfg.hidden_dim
        self.num_tasks: int = num_tasks
        self.hidden_dim: int = hidden
        num_nets = 1 if self.variant == "share" else 1 + num_tasks
        self.experts = StackedMLP(num_nets, self.input_dim, cfg.expert_hidden, last_activation=True,
                                  dropout=cfg.expert_dropout)
        self.towers = StackedMLP(num_tasks, hidden, (*cfg.tower_hidden, 1), last_activation=False)
        self.task_embedding: nn.Embedding | None = (
            None if self.variant == "share" else nn.Embedding(num_tasks, hidden)  # N(0, 1) init
        )
        self.gates: nn.Linear | None = None
        if self.variant in ("full", "no_gan"):
            self.gates = nn.Linear(self.input_dim, 2 * num_tasks, bias=False)
        self.classifier: nn.Linear | None = None
        if self.variant != "no_gan":
            self.classifier = nn.Linear(hidden, num_tasks)
            nn.init.xavier_uniform_(self.classifier.weight)
        self.uses_em = self.classifier is not None
        self.cross: nn.Linear | None = None
        if cfg.interaction == "cross":  # x = e * (W e + b) + e, the identity at initialisation
            self.cross = nn.Linear(self.input_dim, self.input_dim)
            nn.init.zeros_(self.cross.weight)
            nn.init.zeros_(self.cross.bias)
        self.grl_alpha: float = cfg.grl_alpha

    # ---- pieces -------------------------------------------------------------------------------

    def _experts(self, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 2: h^s (B, H) and the specific h^k stacked as (K, B, H) (K rows empty for share).

        With ``interaction = "cross"`` the experts read ``e * (W e + b) + e`` instead of ``e``.
        """
        if self.cross is not None:
            e = torch.addcmul(e, e, self.cross(e))
        h = self.experts.forward_shared(e)
        return h[0], h[1:]

    def _prompts(self, h_shared: torch.Tensor) -> torch.Tensor:
        if self.task_embedding is None:
            return h_shared.new_zeros((self.num_tasks, self.hidden_dim))
        return self.task_embedding.weight

    def _fused_logits(
        self, e: torch.Tensor, h_shared: torch.Tensor, h_spec: torch.Tensor, prompts: torch.Tensor
    ) -> torch.Tensor:
        """Eq. 6-8 (per variant): (K, B) logits from e, h^s (B, H), h^k (K, B, H), p (K, H)."""
        if self.variant == "share":
            return self.towers.forward_shared(h_shared).squeeze(-1)
        tilde = h_spec * prompts.unsqueeze(1)  # Eq. 6
        if self.variant == "specific" or self.gates is None:
            return self.towers(tilde).squeeze(-1)
        g = torch.softmax(self.gates(e).view(-1, self.num_tasks, 2), dim=-1).transpose(0, 1)  # Eq. 7
        fused = g[..., 0:1] * tilde + g[..., 1:2] * h_shared.unsqueeze(0)  # Eq. 8
        return self.towers(fused).squeeze(-1)

    def _as_dict(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        return {t: logits[i] for i, t in enumerate(self.task_names)}

    # ---- contract ----------------------------------------------------------------------------

    def features(self, dense: torch.Tensor, kjt: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        """Backbone intermediates for new-task heads (variant zeroing applied).

        Args:
            dense: (B, D_dense).
            kjt: sparse ids.

        Returns:
            ``e`` (B, D_in), ``h_shared`` (B, H), ``h_specific`` (B, K, H), ``prompts`` (K, H).
        """
        e = self.embed(dense, kjt)
        h_shared, h_spec = self._experts(e)
        if self.variant == "share":
            h_specific = torch.zeros_like(h_shared).unsqueeze(1).expand(-1, self.num_tasks, -1)
        else:
            h_specific = h_spec.transpose(0, 1)
        if self.variant == "specific":
            h_shared = torch.zeros_like(h_shared)
        return {"e": e, "h_shared": h_shared, "h_specific": h_specific, "prompts": self._prompts(h_shared)}

    def logits_from_features(self, feats: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Old tasks' fused logits from :meth:`features` (what ``forward`` returns).

        Args:
            feats: from :meth:`features`.

        Returns:
            task -> (B,) logits.
        """
        h_spec = feats["h_specific"].transpose(0, 1)
        return self._as_dict(self._fused_logits(feats["e"], feats["h_shared"], h_spec, feats["prompts"]))

    def forward_train(self, dense: torch.Tensor, kjt: KeyedJaggedTensor) -> ModelOutput:
        """Fused logits, shared-path logits ``Tower_k(h^s)`` and classifier log-probs via the GRL.

        Args:
            dense: (B, D_dense).
            kjt: sparse ids.

        Returns:
            :class:`ModelOutput` with ``logits``, ``aux_logits`` and ``task_logits`` (B, K) or None.
        """
        e = self.embed(dense, kjt)
        h_shared, h_spec = self._experts(e)
        aux = self.towers.forward_shared(h_shared).squeeze(-1)
        if self.variant == "share":
            logits = aux
        else:
            logits = self._fused_logits(e, h_shared, h_spec, self._prompts(h_shared))
        task_logits = confusion = None
        if self.classifier is not None and self.cfg.adversarial == "confusion":
            # classifier on detached h^s; h^s against the classifier's frozen weights
            task_logits = F.log_softmax(self.classifier(h_shared.detach()), dim=-1)
            w, b = self.classifier.weight.detach(), self.classifier.bias.detach()
            confusion = F.log_softmax(F.linear(h_shared, w, b), dim=-1)
        elif self.classifier is not None:  # Eq. 3, through the gradient-reversal layer
            task_logits = F.log_softmax(self.classifier(grad_reverse(h_shared, self.grl_alpha)), dim=-1)
        return ModelOutput(logits=self._as_dict(logits), aux_logits=self._as_dict(aux),
                           task_logits=task_logits, confusion_logits=confusion)

    def _extra_loss(
        self,
        out: ModelOutput,
        labels: Mapping[str, torch.Tensor],
        task_assign: torch.Tensor | None,
        parts: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """``beta * sum_k w_k BCE(Tower_k(h^s)) + lambda * NLL(D(GRL(h^s)), t)`` (Eq. 4, 9)."""
        aux = torch.zeros((), device=next(iter(out.logits.values())).device)
        for t in self.task_names:
            y = labels[t].to(out.aux_logits[t].dtype)
            aux = aux + self.task_weights[t] * F.binary_cross_entropy_with_logits(out.aux_logits[t], y)
        parts["aux"] = aux
        total = self.cfg.aux_weight * aux
        if self.classifier is None:
            return total
        if out.task_logits is None:
            raise ValueError("MPTRec.loss: out.task_logits is None; use forward_train() outputs")
        if task_assign is None or task_assign.dtype != torch.long or task_assign.dim() != 1:
            raise ValueError(
                f"MPTRec.loss (variant {self.variant!r}) needs task_assign, the (B,) int64 EM task labels; "
                f"got {None if task_assign is None else (task_assign.dtype, tuple(task_assign.shape))}"
            )
        gan = F.nll_loss(out.task_logits, task_assign)
        parts["gan"] = gan
        if out.confusion_logits is None:
            return total + self.cfg.gan_weight * gan
        # cross-entropy against the uniform distribution, minus its minimum log K: KL(U || D(h^s)) >= 0
        confusion = -out.confusion_logits.mean(dim=-1).mean() - math.log(self.num_tasks)
        parts["confusion"] = confusion
        return total + self.cfg.gan_weight * (gan + self.grl_alpha * confusion)

    def l2_parameters(self) -> list[nn.Parameter]:
        """The expert and tower weight matrices (spec Eq. 9's R, dense part).

        And the cross layer's ``W`` with ``interaction = "cross"``.
        """
        params = self.experts.l2_weights() + self.towers.l2_weights()
        return params + [self.cross.weight] if self.cross is not None else params

    def set_grl_alpha(self, alpha: float) -> None:
        """Set alpha of the gradient-reversal layer (see :func:`mptrec.models.layers.grl_alpha`)."""
        if alpha < 0:
            raise ValueError(f"grl alpha must be >= 0, got {alpha}")
        self.grl_alpha = float(alpha)

    def new_task_head(self, name: str, method: str, tower_hidden: Sequence[int] | None = None, *,
                      offset_max_rows: int = 0) -> MPTRecNewTaskHead:
        """The stage-2 module for task ``name`` (spec 3.3; ``fw``/``tes`` ablations of Eq. 10-11).

        Args:
            name: the new task.
            method: one of :attr:`new_task_methods`.
            tower_hidden: new tower sizes (None: the base towers' sizes).
            offset_max_rows: ``mptrec_emb`` / ``mptrec_mlp`` only: > 0 gives offsets only to the
                single-valued features whose table has at most this many rows (0: every
                single-valued feature).

        Returns:
            A fresh :class:`MPTRecNewTaskHead`.

        Raises:
            ValueError: a bad method or name, or no single-valued feature within ``offset_max_rows``.
        """
        tower = self._check_new_task(name, method, tower_hidden, self.cfg.tower_hidden, offset_max_rows)
        id_tables = columns = None
        if method in DELTA_METHODS:
            id_tables = self.id_tables()
            rows = {f: n for f, (n, _) in zip(self.sparse_features, id_tables)}
            columns = [self.id_features.index(f) if f in self.id_features
                       and (offset_max_rows == 0 or rows[f] <= offset_max_rows) else -1
                       for f in self.sparse_features]
            if all(c < 0 for c in columns):
                raise ValueError(
                    f"new task {name!r}: method {method!r} has no table to offset: single-valued "
                    f"features {self.id_features} (rows {[rows[f] for f in self.id_features]}), "
                    f"offset_max_rows = {offset_max_rows}")
        return MPTRecNewTaskHead(
            name, method, input_dim=self.input_dim, hidden_dim=self.hidden_dim, num_tasks=self.num_tasks,
            tower_hidden=tower, tau=self.cfg.tau, id_tables=id_tables, dense_dim=self.dense_dim,
            offset_columns=columns,
        )


class MPTRecNewTaskHead(NewTaskHead):
    """New-task prompt module (spec Eq. 10-15) and its FW / TES ablations.

    ``mptrec``: ``z = LN(W2 ReLU(W1 e))`` (no biases), ``w = softmax_k(z . p^k / tau)``;
    ``fw``: ``w_k = 1/K``; ``tes``: ``w = softmax_k(p^new . p^k / tau)`` (no projection). Then
    ``h^new = sum_k w_k h^k``, ``f = g_1 (h^new * p^new) + g_2 h^s`` with ``g = softmax(W_g e)``,
    and the logit is ``Tower_new(f)``.

    ``mptrec_res`` (beyond the paper): ``mptrec`` plus a low-rank linear path from the input
    vector, ``f += B A e`` with ``A`` (r x D_in), ``B`` (H x r) initialised to zero (the head
    starts as ``mptrec``), r = ``RESIDUAL_RANKS[method]`` = 8. The frozen experts were trained
    for the old tasks; this gives the new task a direct view of features they may have
    discarded, for ``r (D_in + H)`` parameters (Census: 2,008 more, 29,071 = 9.92% in all).

    ``mptrec_emb`` (beyond the paper): ``mptrec`` reading ``e' = e + delta`` wherever it reads
    ``e`` (projection, gate), plus a rank-1 residual path from ``e'``. ``delta`` is the new task's
    own per-id offset of every row of the single-valued features' frozen tables (zero-initialised,
    so the head starts as ``mptrec``; in :meth:`l2_penalty`): the frozen embeddings were shaped,
    and L2-shrunk, for the old tasks, and this lets the new task move its own copy of them while
    the old tasks keep theirs. It reads ``feats["ids"]`` (:attr:`needs_ids`), the ids of the
    single-valued features; a list feature's pooled block of ``e`` is read as it is.
    ``sum_f V_f d_f + D_in + H`` more parameters over the single-valued features f (Census, all
    single-valued: 1,884 + 251, 29,198 = 9.96% in all); :meth:`MPTRec.new_task_head`'s
    ``offset_max_rows`` keeps the offsets to the tables of at most that many rows (the Ali-CCP
    task config: 10,000, 60,237 parameters instead of 4.19M).

    ``mptrec_mlp`` (beyond the paper): ``mptrec_emb`` with a nonlinear residual path instead of
    the rank-1 one, ``f += B ReLU(A e' + b)`` with ``A`` (m x D_in), ``B`` (H x m) zero-initialised,
    m = ``MLP_RESIDUAL_HIDDEN[method]`` = 32, and a narrower Eq. 10 projection (hidden width
    H / 8 instead of H / 2; it only chooses the K transfer weights). The rank-1 path lets the new
    task read one linear function of its offset inputs; this one reads 32 nonlinear ones, for
    fewer parameters in all (Census: 24,963 = 8.5%, with the same offsets).

    Args:
        task_name: the new task.
        method: one of :attr:`MPTRec.new_task_methods`.
        input_dim: D_in.
        hidden_dim: H.
        num_tasks: K, the existing tasks.
        tower_hidden: hidden sizes of the new tower.
        tau: softmax temperature (Eq. 11).
        id_tables: ``mptrec_emb`` / ``mptrec_mlp`` only: ``(num_embeddings, embedding_dim)`` of each sparse
            feature's table, in the order of their blocks in ``e``
            (:meth:`MultiTaskModel.id_tables`).
        dense_dim: ``mptrec_emb`` / ``mptrec_mlp`` only: D_dense, the dense columns that lead ``e``.
        offset_columns: ``mptrec_emb`` / ``mptrec_mlp`` only: per entry of ``id_tables``, the column of
            ``feats["ids"]`` that holds the block's ids when the block gets offsets, else -1 (a
            list feature, or a table left out); None: every block, column i for block i.

    Shapes:
        ``forward(feats)`` with ``e`` (B, D_in), ``h_shared`` (B, H), ``h_specific`` (B, K, H),
        ``prompts`` (K, H) (and ``ids`` (B, F) int64 for ``mptrec_emb``) -> (B,) logits.

    Example:
        >>> head = MPTRecNewTaskHead("t3", "mptrec", input_dim=123, hidden_dim=128, num_tasks=2,
        ...                          tower_hidden=(64, 32), tau=150.0)
        >>> sum(p.numel() for p in head.parameters())
        27063
        >>> feats = {"e": torch.rand(4, 123), "h_shared": torch.rand(4, 128),
        ...          "h_specific": torch.rand(4, 2, 128), "prompts": torch.randn(2, 128)}
        >>> head(feats).shape
        torch.Size([4])
    """

    def __init__(
        self,
        task_name: str,
        method: str,
        *,
        input_dim: int,
        hidden_dim: int,
        num_tasks: int,
        tower_hidden: Sequence[int],
        tau: float,
        id_tables: Sequence[tuple[int, int]] | None = None,
        dense_dim: int = 0,
        offset_columns: Sequence[int] | None = None,
    ) -> None:
        super().__init__(task_name, method)
        if method not in MPTRec.new_task_methods:
            raise ValueError(f"unknown MPT-Rec new-task method {method!r}; "
                             f"expected one of {MPTRec.new_task_methods}")
        if tau <= 0 or num_tasks < 1:
            raise ValueError(f"need tau > 0 and num_tasks >= 1, got {tau}, {num_tasks}")
        self.tau: float = float(tau)
        self.num_tasks: int = num_tasks
        self.prompt = nn.Parameter(torch.randn(hidden_dim))  # p^new, N(0, 1) (Eq. 13)
        self.projection: nn.Sequential | None = None
        self.residual: nn.Sequential | None = None
        width = RESIDUAL_RANKS.get(method) or MLP_RESIDUAL_HIDDEN.get(method)
        if width:
            up = nn.Linear(width, hidden_dim, bias=False)
            nn.init.zeros_(up.weight)  # starts as the base method
            down: list[nn.Module] = ([nn.Linear(input_dim, width), nn.ReLU()] if method in MLP_RESIDUAL_HIDDEN
                                     else [nn.Linear(input_dim, width, bias=False)])
            self.residual = nn.Sequential(*down, up)
        self.deltas: nn.ParameterList | None = None
        if method in DELTA_METHODS:
            if id_tables is None:
                raise ValueError(f"method {method!r} needs id_tables (the frozen tables' shapes)")
            widths = dense_dim + sum(d for _, d in id_tables)
            if widths != input_dim or dense_dim < 0 or any(n < 1 or d < 1 for n, d in id_tables):
                raise ValueError(f"id_tables {list(id_tables)} and dense_dim {dense_dim} do not make up "
                                 f"D_in = {input_dim}")
            cols = list(range(len(id_tables))) if offset_columns is None else list(offset_columns)
            used = [c for c in cols if c >= 0]
            if len(cols) != len(id_tables) or not used or len(set(used)) != len(used):
                raise ValueError(f"offset_columns {offset_columns} must give each of the {len(id_tables)} "
                                 f"id_tables a distinct ids column or -1, and at least one column")
            self.needs_ids = True
            self.dense_dim: int = dense_dim
            self.deltas = nn.ParameterList(nn.Parameter(torch.zeros(n, d))
                                           for (n, d), c in zip(id_tables, cols) if c >= 0)
            # e's column ranges: (start, stop, index into deltas or -1: read as is, ids column)
            segments: list[tuple[int, int, int, int]] = []
            start, k = dense_dim, 0
            for (_, d), c in zip(id_tables, cols):
                segments.append((start, start + d, k if c >= 0 else -1, c))
                k += c >= 0
                start += d
            self._segments: list[tuple[int, int, int, int]] = segments
            # one lookup for every offset table when they share a width (see shifted_input): the
            # ids column, the first row in the tables stacked in order, e's columns of each block
            shifted = [(n, d, c, a) for (n, d), (a, _, k, c) in zip(id_tables, segments) if k >= 0]
            self.fused_offsets: bool = len({d for _, d, _, _ in shifted}) == 1
            firsts = torch.tensor([0, *[n for n, _, _, _ in shifted]]).cumsum(0)[:-1]
            self.register_buffer("_id_cols", torch.tensor([c for _, _, c, _ in shifted]), persistent=False)
            self.register_buffer("_row_starts", firsts, persistent=False)
            self.register_buffer("_e_cols", torch.tensor([a + j for _, d, _, a in shifted for j in range(d)]),
                                 persistent=False)
        if method not in ("fw", "tes"):  # Eq. 10
            mid = max(hidden_dim // PROJECTION_DIVISOR.get(method, 2), 1)
            self.projection = nn.Sequential(
                nn.Linear(input_dim, mid, bias=False),
                nn.ReLU(),
                nn.Linear(mid, hidden_dim, bias=False),
                nn.LayerNorm(hidden_dim),
            )
        self.gate = nn.Linear(input_dim, 2, bias=False)  # Eq. 14
        self.tower = StackedMLP(1, hidden_dim, (*tower_hidden, 1), last_activation=False)

    def transfer_weights(self, feats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Eq. 10-11 (or FW / TES): (B, K) weights over the existing tasks, rows summing to 1."""
        prompts = feats["prompts"]
        if self.projection is not None:
            z = self.projection(feats["e"])
            return torch.softmax(z @ prompts.t() / self.tau, dim=-1)
        if self.method == "tes":
            w = torch.softmax(prompts @ self.prompt / self.tau, dim=0)
        else:
            w = torch.full_like(prompts[:, 0], 1.0 / self.num_tasks)
        return w.unsqueeze(0).expand(feats["e"].size(0), -1)

    def forward(self, feats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Eq. 12-14.

        Args:
            feats: the backbone's :meth:`MPTRec.features`.

        Returns:
            (B,) logits.
        """
        if self.deltas is not None:
            feats = {**feats, "e": self.shifted_input(feats["e"], feats["ids"])}
        w = self.transfer_weights(feats)
        # Eq. 12; a broadcast product summed over K: a (B, 1, K) x (B, K, H) bmm runs B tiny
        # matrix products, measured ~15x slower fwd+bwd on CPU at B=2000, K=2, H=64
        h_new = (w.unsqueeze(-1) * feats["h_specific"]).sum(dim=1)
        tilde = h_new * self.prompt  # Eq. 13
        g = torch.softmax(self.gate(feats["e"]), dim=-1)  # Eq. 14
        fused = g[:, 0:1] * tilde + g[:, 1:2] * feats["h_shared"]
        if self.residual is not None:
            fused = fused + self.residual(feats["e"])
        return self.tower.forward_shared(fused)[0].squeeze(-1)

    def shifted_input(self, e: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``mptrec_emb``: ``e' = e + delta``, the new task's offsets of each row's table rows.

        When the offset tables share a width (:attr:`fused_offsets`, e.g. every Census and
        Ali-CCP config), they are looked up as one stacked table and added into ``e``'s columns
        with one ``index_add``: the same sums, and one embedding backward per step instead of one
        per table (the largest op of a cached Ali-CCP step with 10 offset tables). Otherwise one
        lookup per table.

        Args:
            e: (B, D_in), the frozen input vector.
            ids: (B, F) int64, each row's id of every single-valued sparse feature, in the order
                of their blocks in ``e`` (``offset_columns`` says which column each block reads).

        Returns:
            (B, D_in).
        """
        assert self.deltas is not None
        if self.fused_offsets:  # the offset tables stacked: one lookup, one add into e's columns
            table = torch.cat(list(self.deltas)) if len(self.deltas) > 1 else self.deltas[0]
            rows = (ids.index_select(1, self._id_cols) + self._row_starts).flatten()
            # index_select, not F.embedding: its backward (index_add_ into zeros) gives the same
            # sums, measured 2.2x faster than embedding_dense_backward here (20k ids, 13k rows)
            return e.index_add(1, self._e_cols, table.index_select(0, rows).view(e.shape[0], -1))
        parts = [e[:, : self.dense_dim]]  # mixed widths: one lookup per table
        for a, b, k, c in self._segments:
            parts.append(e[:, a:b] if k < 0 else e[:, a:b] + F.embedding(ids[:, c], self.deltas[k]))
        return torch.cat(parts, dim=1)

    def l2_parameters(self) -> list[nn.Parameter]:
        """Eq. 15: the new tower's weight matrices (the caller weighs their L2 by r_dnn).

        ``mptrec_emb`` adds its offsets ``delta``: they are shrunk to the frozen rows at the
        same weight.
        """
        params = self.tower.l2_weights()
        return params + list(self.deltas) if self.deltas is not None else params
