"""Plain-PyTorch references of MPT-Rec (no TorchRec), the yardsticks of ``mptrec bench``.

Same math as the pipeline's model (spec sections 2-3): per-field embeddings, ``e = [dense ||
embeddings]``, one shared and K specific experts (MLP, ReLU after every layer, dropout), a
task classifier on ``GRL(h_s)``, task prompts ``p_k``, bias-free 2-way gates on ``e``, towers
shared between the fused and the auxiliary path, and the loss ``sum_k BCE + beta * aux +
lambda * GAN + R``.

Two ways a user would write it:

* ``plain`` (the paper's code, ``BAI-LAB/MPTRec``): one ``nn.Embedding`` per field with dense
  gradients, the whole-table L2 ``r_emb * sum_j ||E_j||^2 / 2`` added to the loss, one Adam over
  every parameter. Every step touches every row of every table three times (L2, its gradient,
  Adam).
* ``sparse`` (the best a careful plain-PyTorch user would write): ``nn.Embedding(sparse=True)``,
  ``SparseAdam`` for the tables and ``Adam`` for the rest. A whole-table L2 cannot be had with
  sparse gradients, so ``r_emb`` acts on the looked-up rows (as DeepCTR's ``l2_reg_embedding``
  does, and as the fused kernel's weight decay does).

Also the new-task head of spec 3.3 and the paper's way of prompt tuning (the backbone is left
out of the optimizer but its gradients are still computed and accumulated).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mptrec.data_loaders.batch import Batch
from mptrec.data_loaders.schema import FeatureSpec
from mptrec.models.config import ModelConfig

Style = Literal["plain", "sparse"]


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, alpha: float) -> Tensor:
        ctx.alpha = alpha
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad.neg() * ctx.alpha, None


def grad_reverse(x: Tensor, alpha: float) -> Tensor:
    """DANN gradient-reversal layer: identity forward, gradient times ``-alpha`` backward."""
    return _GradReverse.apply(x, alpha)  # type: ignore[no-any-return]


def mlp(sizes: Sequence[int], dropout: Sequence[float] = (), relu_last: bool = True) -> nn.Sequential:
    """Linear layers ``sizes[0] -> ... -> sizes[-1]``, ReLU (and dropout) after each."""
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        last = i == len(sizes) - 2
        if not last or relu_last:
            layers.append(nn.ReLU())
            if dropout and dropout[i] > 0:
                layers.append(nn.Dropout(dropout[i]))
    return nn.Sequential(*layers)


def _weights(seq: nn.Sequential) -> list[Tensor]:
    return [m.weight for m in seq if isinstance(m, nn.Linear)]


@dataclass
class RefBatch:
    """A batch in the form the plain references read (converted once, before timing).

    Args:
        dense: (B, Dd) float.
        ids: per sparse feature, the ids: (B,) for single-valued fields, the flat values for
            multi-valued ones.
        offsets: per sparse feature, None (single-valued) or the (B,) bag offsets.
        labels: task -> (B,) float.
        task_assign: (B,) int64 EM task labels.
    """

    dense: Tensor
    ids: list[Tensor]
    offsets: list[Tensor | None]
    labels: dict[str, Tensor]
    task_assign: Tensor

    @property
    def batch_size(self) -> int:
        """Rows."""
        return int(self.dense.shape[0])


def to_ref_batch(batch: Batch, features: Sequence[FeatureSpec], task_assign: Tensor) -> RefBatch:
    """Convert a loader ``Batch`` for the references: per-field id tensors from the KJT."""
    jts = batch.sparse_features.to_dict()
    ids: list[Tensor] = []
    offsets: list[Tensor | None] = []
    for f in features:
        if f.kind != "sparse":
            continue
        if f.name not in jts:
            raise KeyError(f"feature {f.name!r} is not in the batch (keys {sorted(jts)})")
        jt = jts[f.name]
        if f.multivalent:
            ids.append(jt.values())
            offsets.append(jt.offsets()[:-1])
        else:
            lengths = jt.lengths()
            if not bool((lengths == 1).all()):
                raise ValueError(f"single-valued feature {f.name!r} has rows with != 1 id")
            ids.append(jt.values())
            offsets.append(None)
    return RefBatch(batch.dense_features, ids, offsets, dict(batch.labels), task_assign)


class RefEmbeddings(nn.Module):
    """One table per sparse field: ``nn.Embedding`` (single-valued) or ``nn.EmbeddingBag``."""

    def __init__(self, features: Sequence[FeatureSpec], sparse: bool) -> None:
        super().__init__()
        self.names = [f.name for f in features if f.kind == "sparse"]
        tables: list[nn.Module] = []
        for f in features:
            if f.kind != "sparse":
                continue
            if f.multivalent:
                tables.append(
                    nn.EmbeddingBag(f.num_embeddings, f.embedding_dim, mode=f.pooling, sparse=sparse)
                )
            else:
                tables.append(nn.Embedding(f.num_embeddings, f.embedding_dim, sparse=sparse))
        self.tables = nn.ModuleList(tables)

    def forward(self, batch: RefBatch) -> list[Tensor]:
        """Per-field pooled embeddings, (B, d_j) each, in declared order."""
        out = []
        for table, ids, off in zip(self.tables, batch.ids, batch.offsets):
            out.append(table(ids) if off is None else table(ids, off))
        return out

    def whole_table_l2(self) -> Tensor:
        """``sum_j ||E_j||_F^2 / 2`` over every row of every table."""
        weights: list[Tensor] = [t.weight for t in self.tables]  # type: ignore[misc]
        return sum((w.pow(2).sum() for w in weights), torch.zeros(())) / 2


class RefMPTRec(nn.Module):
    """MPT-Rec (spec Eq. 1-9) in plain PyTorch.

    Args:
        features: input features (dense ones first, then sparse, as the pipeline resolves them).
        cfg: model hyper-parameters (expert/tower sizes, dropout, weights of the loss terms).
        task_names: the K tasks.
        sparse: ``nn.Embedding(sparse=True)`` tables (reference ``sparse``) or dense-gradient
            ones (reference ``plain``).
    """

    def __init__(
        self, features: Sequence[FeatureSpec], cfg: ModelConfig, task_names: Sequence[str], sparse: bool
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.task_names = list(task_names)
        self.dense_dim = sum(1 for f in features if f.kind == "dense")
        self.d_in = self.dense_dim + sum(f.embedding_dim for f in features if f.kind == "sparse")
        k, h = len(self.task_names), cfg.hidden_dim
        self.emb = RefEmbeddings(features, sparse)
        sizes = [self.d_in, *cfg.expert_hidden]
        self.shared = mlp(sizes, cfg.expert_dropout)
        self.specific = nn.ModuleList(mlp(sizes, cfg.expert_dropout) for _ in range(k))
        self.classifier = nn.Linear(h, k)
        nn.init.xavier_uniform_(self.classifier.weight)
        self.prompts = nn.Embedding(k, h)
        self.gates = nn.ModuleList(nn.Linear(self.d_in, 2, bias=False) for _ in range(k))
        self.towers = nn.ModuleList(mlp([h, *cfg.tower_hidden, 1], relu_last=False) for _ in range(k))
        self.grl_alpha = 1.0

    def input_vector(self, batch: RefBatch) -> Tensor:
        """``e = [dense || E_1[x_1] .. E_m[x_m]]``, (B, D_in)."""
        return torch.cat([batch.dense, *self.emb(batch)], dim=1)

    def features(self, batch: RefBatch) -> dict[str, Tensor]:
        """What a new-task head reads: e, h_shared (B,H), h_specific (B,K,H), prompts (K,H)."""
        e = self.input_vector(batch)
        return {
            "e": e,
            "h_shared": self.shared(e),
            "h_specific": torch.stack([ex(e) for ex in self.specific], dim=1),
            "prompts": self.prompts.weight,
        }

    def forward_train(self, batch: RefBatch) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor, Tensor]:
        """Fused logits, shared-path logits, classifier log-probs (through the GRL), and e."""
        e = self.input_vector(batch)
        hs = self.shared(e)
        logits: dict[str, Tensor] = {}
        aux: dict[str, Tensor] = {}
        for i, name in enumerate(self.task_names):
            hk = self.specific[i](e) * self.prompts.weight[i]
            g = torch.softmax(self.gates[i](e), dim=1)
            f = g[:, :1] * hk + g[:, 1:] * hs
            logits[name] = self.towers[i](f).squeeze(1)
            aux[name] = self.towers[i](hs).squeeze(1)
        task_logp = torch.log_softmax(self.classifier(grad_reverse(hs, self.grl_alpha)), dim=1)
        return logits, aux, task_logp, e

    def dense_l2(self) -> Tensor:
        """``sum ||W||^2 / 2`` over expert and tower weight matrices (no biases, gates, prompts)."""
        ws = _weights(self.shared) + [w for s in self.specific for w in _weights(s)]  # type: ignore[arg-type]
        ws += [w for t in self.towers for w in _weights(t)]  # type: ignore[arg-type]
        return sum((w.pow(2).sum() for w in ws), torch.zeros(())) / 2

    def loss(self, batch: RefBatch, style: Style) -> Tensor:
        """Eq. 9; ``plain`` adds the whole-table L2, ``sparse`` the L2 of the looked-up rows."""
        logits, aux, task_logp, e = self.forward_train(batch)
        total = torch.zeros(())
        for name in self.task_names:
            y = batch.labels[name]
            total = total + F.binary_cross_entropy_with_logits(logits[name], y)
            total = total + self.cfg.aux_weight * F.binary_cross_entropy_with_logits(aux[name], y)
        if self.cfg.variant != "no_gan":
            total = total + self.cfg.gan_weight * F.nll_loss(task_logp, batch.task_assign)
        if self.cfg.r_dnn:
            total = total + self.cfg.r_dnn * self.dense_l2()
        if self.cfg.r_emb:
            if style == "plain":
                total = total + self.cfg.r_emb * self.emb.whole_table_l2()
            else:
                total = total + self.cfg.r_emb * e[:, self.dense_dim :].pow(2).sum() / 2
        return total

    def dense_parameters(self) -> list[nn.Parameter]:
        """Every parameter but the embedding tables."""
        table_ids = {id(p) for p in self.emb.parameters()}
        return [p for p in self.parameters() if id(p) not in table_ids]


@dataclass
class RefStep:
    """A reference training step: ``step(i)`` trains on batch ``i`` (cycled) and returns the loss."""

    fn: Callable[[int], float]
    optimizers: list[torch.optim.Optimizer]

    def __call__(self, i: int) -> float:
        """Train on batch ``i``."""
        return self.fn(i)


def make_train_step(
    model: RefMPTRec, batches: Sequence[RefBatch], style: Style, lr: float = 1e-3, embedding_lr: float = 1e-3
) -> RefStep:
    """A training step over ``batches`` (cycled) in the given style."""
    model.train()
    if style == "plain":
        opts: list[torch.optim.Optimizer] = [torch.optim.Adam(model.parameters(), lr=lr)]
    elif style == "sparse":
        opts = [
            torch.optim.SparseAdam(list(model.emb.parameters()), lr=embedding_lr),
            torch.optim.Adam(model.dense_parameters(), lr=lr),
        ]
    else:
        raise ValueError(f"unknown reference style {style!r} (plain or sparse)")

    def step(i: int) -> float:
        batch = batches[i % len(batches)]
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss = model.loss(batch, style)
        loss.backward()
        for o in opts:
            o.step()
        return float(loss.detach())

    return RefStep(step, opts)


# --------------------------------------------------------------------------------------------
# New task (spec 3.3)
# --------------------------------------------------------------------------------------------


class RefNewTaskHead(nn.Module):
    """The MPT-Rec new-task module (Eq. 10-15): projection, transfer weights, prompt, gate, tower.

    Args:
        d_in: width of ``e``.
        hidden: H.
        tower_hidden: tower sizes.
        tau: softmax temperature of the transfer weights.
    """

    def __init__(self, d_in: int, hidden: int, tower_hidden: Sequence[int], tau: float = 150.0) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            nn.Linear(d_in, hidden // 2, bias=False),
            nn.ReLU(),
            nn.Linear(hidden // 2, hidden, bias=False),
            nn.LayerNorm(hidden),
        )
        self.prompt = nn.Parameter(torch.randn(hidden))
        self.gate = nn.Linear(d_in, 2, bias=False)
        self.tower = mlp([hidden, *tower_hidden, 1], relu_last=False)
        self.tau = tau

    def forward(self, feats: dict[str, Tensor]) -> Tensor:
        """Logits (B,) of the new task from the backbone's features."""
        e = feats["e"]
        z = self.proj(e)
        w = torch.softmax(z @ feats["prompts"].t() / self.tau, dim=1)
        h_new = (w.unsqueeze(2) * feats["h_specific"]).sum(1) * self.prompt
        g = torch.softmax(self.gate(e), dim=1)
        return self.tower(g[:, :1] * h_new + g[:, 1:] * feats["h_shared"]).squeeze(1)

    def l2_penalty(self) -> Tensor:
        """Eq. 15: ``sum ||W||^2 / 2`` over the new tower's weight matrices."""
        return sum((w.pow(2).sum() for w in _weights(self.tower)), torch.zeros(())) / 2


def make_paper_prompt_step(
    backbone: RefMPTRec,
    head: RefNewTaskHead,
    batches: Sequence[RefBatch],
    task: str,
    lr: float = 1e-3,
    r_dnn: float = 0.0,
) -> RefStep:
    """Prompt tuning the way the paper's code does it (``BAI-LAB/MPTRec`` ``train_three_task``).

    The backbone is "frozen" only by leaving it out of the optimizer: it keeps
    ``requires_grad=True``, so every backward computes (and accumulates, since only the
    optimizer's parameters are zeroed) the gradients of every backbone weight, the dense
    embedding tables included. The backbone runs in eval mode, as in the official run.
    """
    backbone.eval()
    head.train()
    opt = torch.optim.Adam(head.parameters(), lr=lr)

    def step(i: int) -> float:
        batch = batches[i % len(batches)]
        opt.zero_grad(set_to_none=True)
        logits = head(backbone.features(batch))
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels[task])
        if r_dnn:
            loss = loss + r_dnn * head.l2_penalty()
        loss.backward()
        opt.step()
        return float(loss.detach())

    return RefStep(step, [opt])


def grad_bytes(module: nn.Module) -> int:
    """Bytes held by the ``.grad`` of ``module``'s parameters (dense or sparse)."""
    total = 0
    for p in module.parameters():
        g = p.grad
        if g is None:
            continue
        if g.is_sparse:
            g = g.coalesce()
            total += g.values().numel() * g.element_size() + g.indices().numel() * 8
        else:
            total += g.numel() * g.element_size()
    return total
