"""The stage-2 loop: train a new task's head on the frozen backbone's features (collective).

:func:`train_head` runs the epochs of :mod:`mptrec.pipeline.tasks.prompt_tuning`'s job (step 3
and 4 there): Adam over exactly the head's parameters, the head's gradients averaged over the
ranks with one flat ``all_reduce``, BCE + ``r_dnn`` x ``head.l2_penalty()`` (Eq. 15, applied as
Adam's weight decay on ``head.l2_parameters()``: :func:`head_optimizer`, :func:`head_step`). The frozen
features never change, so when they fit in ``feature_cache_mib`` the backbone runs ONCE over the
train and validation rows (:class:`FeatureCache`; lock-step with filler batches, every row
once) and each epoch trains on the cached features, reshuffled, with the ranks agreeing on the
minimum batch count (``all_reduce MIN``). Without the cache each epoch streams the shards through
the backbone: before each step the ranks all-reduce (MIN) a "has a batch" flag and the epoch ends
when any rank is out of data, so every rank runs the same number of sharded forwards. Each epoch
validates the new task (exact AUC over every validation row), early-stops on it (``patience``)
and keeps the best head.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from mptrec.data_loaders.batch import Batch
from mptrec.data_loaders.dataset import ShardDataset, make_dataloader
from mptrec.logs import get_logger
from mptrec.models.base import NewTaskHead
from mptrec.pipeline.build import make_dataset
from mptrec.pipeline.config import NewTaskSpec
from mptrec.pipeline.distributed import agree_min, lockstep, lockstep_min
from mptrec.pipeline.eval.efficiency import EpochClock
from mptrec.pipeline.sharding import dense_adam
from mptrec.pipeline.tasks.union import ShardedRunModel

__all__ = ["FeatureCache", "Stage2", "StageResult", "head_optimizer", "head_step", "train_head"]

log = get_logger(__name__)


@dataclass
class Stage2:
    """Everything the stage-2 loop runs on.

    Attributes:
        run_dir: the stage-1 run folder.
        cfg: the new task's config (with overrides).
        entry: its task store entry.
        sharded: the sharded run model with the new head.
        head: the new head (inside ``sharded.dmp``).
        optimizer: Adam over exactly ``head.parameters()`` (:func:`head_optimizer`).
        r_dnn: weight of the new tower's L2 (Eq. 15).
        batch_size: rows per batch and rank.
        tower_hidden: the new tower's hidden sizes.
        device: compute device.
        rank: this process's rank.
        world_size: number of processes.
        group: process group.
    """

    run_dir: Path
    cfg: NewTaskSpec
    entry: dict[str, Any]
    sharded: ShardedRunModel
    head: NewTaskHead
    optimizer: torch.optim.Adam
    r_dnn: float
    batch_size: int
    tower_hidden: tuple[int, ...]
    device: torch.device
    rank: int = 0
    world_size: int = 1
    group: dist.ProcessGroup | None = None


@dataclass
class StageResult:
    """What the loop did (the same on every rank).

    Attributes:
        best_state: the best head's weights (CPU tensors).
        valid: per-epoch validation records ``{"epoch", "step", "auc", "loss"}``.
        best_epoch: 1-based epoch of the best head (0: no validation; the last head is kept).
        best_auc: its validation AUC.
        steps: optimizer steps.
        clock: epoch timings.
        losses: this rank's per-step losses.
    """

    best_state: dict[str, torch.Tensor]
    valid: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_auc: float | None = None
    steps: int = 0
    clock: EpochClock = field(default_factory=EpochClock)
    losses: list[float] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def _dataset(s: Stage2, split: str, shuffle: bool) -> ShardDataset:
    return make_dataset(s.sharded.run_cfg.data, split, s.sharded.features, [s.cfg.task_spec().label_spec()],
                        rank=s.rank, world_size=s.world_size, shuffle=shuffle, seed=s.cfg.seed,
                        batch_size=s.batch_size)


def _loader(ds: ShardDataset, epoch: int, num_workers: int) -> DataLoader[Batch]:
    ds.set_epoch(epoch)
    return make_dataloader(ds, num_workers)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@dataclass
class FeatureCache:
    """This rank's frozen backbone features of one split, computed once (they never change).

    Attributes:
        rows: per-sample features, key -> (N, ...).
        const: features that are not per sample (e.g. the old tasks' prompts (K, H)).
        labels: (N,) labels of the new task.
    """

    rows: dict[str, torch.Tensor]
    const: dict[str, torch.Tensor]
    labels: torch.Tensor

    @property
    def num_rows(self) -> int:
        """Rows held."""
        return int(self.labels.shape[0])

    @classmethod
    def build(cls, items: Iterable[tuple[Mapping[str, torch.Tensor], torch.Tensor]],
              device: torch.device) -> FeatureCache:
        """The cache of ``(features, labels)`` batches.

        Per-sample features are concatenated; the others (the same in every batch) are kept once.

        Raises:
            RuntimeError: a feature that is neither per sample nor the same in every batch.
        """
        rows: dict[str, list[torch.Tensor]] = {}
        const: dict[str, torch.Tensor] = {}
        labels: list[torch.Tensor] = []
        for feats, y in items:
            n = y.shape[0]
            for k, v in feats.items():
                if v.dim() > 0 and v.shape[0] == n:
                    rows.setdefault(k, []).append(v)
                elif k not in const:
                    const[k] = v
                elif not torch.equal(const[k], v):
                    raise RuntimeError(f"backbone feature {k!r} is neither per-sample nor constant "
                                       f"(shape {tuple(v.shape)})")
            labels.append(y)
        if not labels:
            return cls({}, const, torch.zeros(0, device=device))
        return cls({k: torch.cat(v) for k, v in rows.items()}, const, torch.cat(labels))

    def num_batches(self, batch_size: int) -> int:
        """Batches of ``batch_size`` (the last one partial)."""
        return -(-self.num_rows // batch_size)

    def batches(self, batch_size: int, order: torch.Tensor | None = None
                ) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        """Yield ``(features, labels)`` batches, rows in ``order`` (default: as collected).

        With ``order``, each batch is gathered with ``index_select``: 0.32 vs 1.18 ms for indexing
        with the index tensor, for a batch of 2,000 paper-dims rows (``mptrec bench --only
        new_task``, 2026-12-03).
        """
        for start in range(0, self.num_rows, batch_size):
            if order is None:
                rows = slice(start, start + batch_size)
                yield {**{k: v[rows] for k, v in self.rows.items()}, **self.const}, self.labels[rows]
                continue
            sel = order[start:start + batch_size]
            yield ({**{k: v.index_select(0, sel) for k, v in self.rows.items()}, **self.const},
                   self.labels.index_select(0, sel))


def _collect(s: Stage2, batches: Iterable[Batch]) -> FeatureCache:
    """Run the frozen backbone once over ``batches`` (lock-step with fillers: collective)."""

    def items() -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        for batch, real in lockstep(batches, group=s.group):
            batch = batch.to(s.device, non_blocking=True)
            feats = s.sharded.model.backbone_features(batch.dense_features, batch.sparse_features)  # type: ignore[operator]
            if real:  # a filler batch only keeps the collectives in step
                yield feats, batch.labels[s.cfg.name]

    return FeatureCache.build(items(), s.device)


def _cache_fits(s: Stage2, train: ShardDataset, valid: ShardDataset | None) -> bool:
    """Whether this rank's train + validation features fit in ``feature_cache_mib`` (same on every rank)."""
    if s.cfg.feature_cache_mib <= 0:
        return False
    from mptrec.pipeline.eval.efficiency import feature_bytes_per_row

    rows = (train.num_rows + (valid.num_rows if valid is not None else 0)) / s.world_size
    per_row = feature_bytes_per_row(s.sharded.run_cfg, s.sharded.features) + 4  # + the float label
    if getattr(s.head, "needs_ids", False):
        per_row += 8 * sum(f.single_valued for f in s.sharded.features)  # + the (F,) int64 ids it reads
    return rows * per_row <= s.cfg.feature_cache_mib * 2 ** 20


def _sync_grads(s: Stage2) -> None:
    """Average the head's gradients over the ranks (one flat all_reduce; the head is replicated)."""
    if s.world_size == 1:
        return
    params = list(s.head.parameters())  # the same list on every rank: a parameter without a
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)  # grad adds 0
                      for p in params])
    dist.all_reduce(flat, group=s.group)
    flat /= s.world_size
    offset = 0
    for p in params:
        if p.grad is not None:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()


def head_optimizer(head: NewTaskHead, lr: float, r_dnn: float) -> torch.optim.Adam:
    """Fused Adam over exactly ``head.parameters()``.

    Eq. 15's L2 is its weight decay ``r_dnn`` on ``head.l2_parameters()`` (the gradient
    ``r_dnn * W`` without autograd ops).
    """
    decay = {id(p): r_dnn for p in head.l2_parameters()} if r_dnn > 0 else {}
    return dense_adam(list(head.parameters()), lr, decay)


def head_step(head: NewTaskHead, optimizer: torch.optim.Optimizer, feats: Mapping[str, torch.Tensor],
              labels: torch.Tensor, r_dnn: float, sync: Callable[[], None] | None = None) -> float:
    """One step of the head on frozen features (the job's, and the bench's); returns the loss.

    The loss is BCE + ``r_dnn * head.l2_penalty()``; the optimizer (:func:`head_optimizer`)
    applies the L2 term's gradient as weight decay, so its value is added without autograd.
    ``sync`` runs between backward and the update (the job averages gradients over ranks).
    """
    optimizer.zero_grad(set_to_none=True)
    logits = head(feats)
    loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
    loss.backward()
    value = float(loss.detach())
    if r_dnn > 0:  # the weights the loss was computed at
        with torch.no_grad():
            value += r_dnn * float(head.l2_penalty())
    if sync is not None:
        sync()
    optimizer.step()
    return value


def _step(s: Stage2, feats: dict[str, torch.Tensor], labels: torch.Tensor, res: StageResult) -> float:
    """One Adam step of the head on frozen features; returns the loss."""
    value = head_step(s.head, s.optimizer, feats, labels, s.r_dnn, sync=lambda: _sync_grads(s))
    res.steps += 1
    res.losses.append(value)
    return value


def _train_epoch(s: Stage2, source: Iterable[tuple[dict[str, torch.Tensor], torch.Tensor]],
                 res: StageResult, bar: tqdm) -> float:
    """Steps over ``source`` (already equal in length on every rank); returns the mean loss."""
    total, n = 0.0, 0
    s.head.train()
    for feats, labels in source:
        value = _step(s, feats, labels, res)
        total, n = total + value, n + 1
        bar.update(1)
        bar.set_postfix(loss=f"{value:.4f}")
        if 0 < s.cfg.max_steps <= res.steps:
            break
    return total / max(n, 1)


def _streamed(s: Stage2, batches: Iterable[Batch]) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """Frozen features of each batch, while every rank has one (no cache)."""
    for batch in lockstep_min(batches, s.device, s.group):
        batch = batch.to(s.device, non_blocking=True)
        feats = s.sharded.model.backbone_features(batch.dense_features, batch.sparse_features)  # type: ignore[operator]
        yield feats, batch.labels[s.cfg.name]


def _cached(s: Stage2, cache: FeatureCache,
            epoch: int) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """This epoch's shuffled batches of the cache, as many on every rank (all_reduce MIN)."""
    n = agree_min(cache.num_batches(s.batch_size), s.device, s.group)
    g = torch.Generator().manual_seed(s.cfg.seed * 1_000_003 + epoch * 101 + s.rank)
    order = torch.randperm(cache.num_rows, generator=g).to(cache.labels.device)
    for i, item in enumerate(cache.batches(s.batch_size, order)):
        if i >= n:
            return
        yield item


def _validate(s: Stage2, valid: ShardDataset, cache: FeatureCache | None, num_workers: int) -> float | None:
    """Exact AUC of the new task over every validation row (collective)."""
    from mptrec.pipeline.eval.auc import exact_auc, gather_for_auc
    from mptrec.pipeline.eval.evaluate import evaluate

    if cache is None:
        report = evaluate(s.sharded.model, _loader(valid, 0, num_workers), [s.cfg.name], device=s.device,
                          group=s.group, progress=False, split=valid.split)
        auc = report["tasks"][s.cfg.name]["auc"]
        return None if auc is None else float(auc)
    s.head.eval()
    with torch.no_grad():
        logits = [s.head(f) for f, _ in cache.batches(4 * s.batch_size)]
    local = torch.cat(logits) if logits else torch.zeros(0, device=s.device)
    scores, labels = gather_for_auc(local.float(), cache.labels.float(), group=s.group)
    return exact_auc(scores, labels)


def _early_stop(s: Stage2, res: StageResult, record: dict[str, Any], auc: float | None, epoch: int) -> bool:
    """Keep the best head; returns whether this epoch improved on the best validation AUC."""
    record.update(split="valid", auc={s.cfg.name: auc})
    if auc is not None and (res.best_auc is None or auc > res.best_auc):
        res.best_auc, res.best_epoch = auc, epoch + 1
        res.best_state = copy.deepcopy(s.head.state_dict())
        return True
    return False


def train_head(s: Stage2, *, num_workers: int = 0, progress: bool = True, logger: Any = None) -> StageResult:
    """Train the new head with early stopping on its validation AUC (collective).

    When the features fit in ``feature_cache_mib``, the frozen backbone runs once over the
    train and validation rows (timed as ``feature_cache_wall_s``) and every epoch trains on the
    cached features, reshuffled; otherwise each epoch streams the shards through the backbone.

    Returns:
        The :class:`StageResult`; ``s.head`` holds the best weights afterwards.
    """
    run_cfg = s.sharded.run_cfg
    train = _dataset(s, run_cfg.data.train_split, shuffle=True)
    valid = _dataset(s, run_cfg.data.valid_split, shuffle=False) if run_cfg.data.valid_split else None
    res = StageResult(best_state=copy.deepcopy(s.head.state_dict()))
    cache: FeatureCache | None = None
    valid_cache: FeatureCache | None = None
    if _cache_fits(s, train, valid):
        with res.clock.caching():
            cache = _collect(s, _loader(train, 0, num_workers))
            valid_cache = _collect(s, _loader(valid, 0, num_workers)) if valid is not None else None
    bad = 0
    for epoch in range(s.cfg.epochs):
        bar = tqdm(desc=f"prompt-tune {s.cfg.name} epoch {epoch + 1}/{s.cfg.epochs}", unit="batch",
                   file=sys.stderr, disable=not (progress and s.rank == 0), dynamic_ncols=True)
        source = (_cached(s, cache, epoch) if cache is not None
                  else _streamed(s, _loader(train, epoch, num_workers)))
        with bar, res.clock.epoch():
            mean_loss = _train_epoch(s, source, res, bar)
        record: dict[str, Any] = {"epoch": epoch + 1, "step": res.steps, "loss": mean_loss,
                                  "cached_features": cache is not None}
        if valid is not None:
            with res.clock.evaluation():
                auc = _validate(s, valid, valid_cache, num_workers)
            # patience counts consecutive epochs without improvement (as stage 1 counts its
            # validation points); until 2026-12-03 it counted every such epoch of the run
            bad = 0 if _early_stop(s, res, record, auc, epoch) else bad + 1
        else:
            res.best_state = copy.deepcopy(s.head.state_dict())
        res.valid.append(record)
        if logger is not None:
            logger.log(record)
        if progress:
            log.info("epoch %d: loss %.4f, valid AUC %s", epoch + 1, mean_loss, record.get("auc"))
        if (valid is not None and 0 < s.cfg.patience <= bad) or 0 < s.cfg.max_steps <= res.steps:
            break
    s.head.load_state_dict(res.best_state)
    return res
