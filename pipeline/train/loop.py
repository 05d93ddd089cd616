"""The stage-1 training loop: epochs of steps, EM re-labelling, validation, early stopping, checkpoints.

Steps run through ``TrainPipelineSparseDist`` (``train.pipelined = true``: the sharded EBC's
input distribution of batch i+1 overlaps batch i) or a plain loop (zero_grad, forward, backward,
step); both call the same ``TrainWrapper`` and give the same losses step by step.

Uneven data across ranks. The sharded EBC's forward and backward hold collectives, so every
rank must run the same number of steps. At the start of each epoch the ranks agree on the
minimum of their batch counts (``all_reduce MIN``) and every rank trains that many batches:
the surplus of the other ranks (at most about one row group per rank and epoch, since the
loader deals whole row groups round-robin) is not trained on in that epoch. Validation and EM
re-labelling instead score every row exactly once, in lock-step with filler batches
(:func:`mptrec.pipeline.distributed.lockstep`).

Exact resume. A checkpoint records the epoch and the number of its batches already trained; a
resumed run re-creates that epoch's (deterministic) batch order and skips that many batches,
and restores the model, both optimizers, the EM labels and every rank's RNG states, so each
later step computes the same loss as an uninterrupted run.
"""

from __future__ import annotations

import functools
import hashlib
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from tqdm import tqdm

from mptrec.data_loaders.batch import Batch
from mptrec.logs import get_logger
from mptrec.models import em_assign, grl_alpha
from mptrec.pipeline.checkpoint import TrainState, save_checkpoint
from mptrec.pipeline.config import RunConfig
from mptrec.pipeline.distributed import agree_min, lockstep, lockstep_min
from mptrec.pipeline.eval.evaluate import evaluate
from mptrec.pipeline.strict import to_dict
from mptrec.pipeline.train.em import EMLabelStore, relabel
from mptrec.pipeline.train.metrics_log import MetricsLogger
from mptrec.pipeline.train.wrapper import TrainOutput, TrainWrapper

__all__ = ["DataSource", "PlainStepper", "TrainContext", "TrainResult", "Trainer", "bf16_autocast",
           "cpu_has_native_bf16", "epoch_batches", "make_stepper"]

log = get_logger(__name__)


class DataSource(Protocol):
    """This rank's batches (every method returns a fresh iterable, deterministic per epoch)."""

    def train(self, epoch: int) -> Iterable[Batch]:
        """Training batches of ``epoch`` (0-based), shuffled by (seed, epoch)."""
        ...

    def num_train_batches(self, epoch: int) -> int:
        """How many batches :meth:`train` yields for ``epoch`` on this rank."""
        ...

    def train_in_order(self) -> Iterable[Batch]:
        """Every training row this rank owns, once, unshuffled (EM re-labelling)."""
        ...

    def valid(self) -> Iterable[Batch] | None:
        """Validation batches (every validation row once across ranks), or None."""
        ...


class Stepper(Protocol):
    """One training step per call: ``progress(iterator) -> TrainOutput`` (StopIteration at the end)."""

    def progress(self, dataloader_iter: Iterator[Batch]) -> TrainOutput:
        """Train on the next batch."""
        ...


class PlainStepper:
    """The non-pipelined step: the same calls TrainPipelineSparseDist makes, in order, one batch at a time.

    Args:
        model: the DMP-wrapped ``TrainWrapper``.
        optimizer: the combined optimizer.
        device: the compute device.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        self.model = model
        self.optimizer = optimizer
        self.device = device

    def progress(self, dataloader_iter: Iterator[Batch]) -> TrainOutput:
        """zero_grad, forward, backward, step on the next batch."""
        batch = next(dataloader_iter).to(self.device, non_blocking=True)
        self.optimizer.zero_grad()
        loss, output = self.model(batch)
        loss.backward()
        self.optimizer.step()
        out: TrainOutput = output
        return out


@functools.lru_cache(maxsize=4)
def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU does bf16 arithmetic natively (``avx512_bf16`` or ``amx_bf16`` flags)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_autocast(setting: str, device: torch.device) -> bool:
    """Whether ``train.autocast = setting`` trains in bf16 on ``device``.

    Example:
        >>> bf16_autocast("none", torch.device("cpu")), bf16_autocast("bf16", torch.device("cpu"))
        (False, True)
    """
    if setting == "auto":
        return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
    return setting == "bf16"


def make_stepper(dmp: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 pipelined: bool) -> Stepper | TrainPipelineSparseDist[Batch, TrainOutput]:
    """``TrainPipelineSparseDist`` when ``pipelined``, else :class:`PlainStepper`."""
    if pipelined:
        return TrainPipelineSparseDist(dmp, optimizer, device, execute_all_batches=True)
    return PlainStepper(dmp, optimizer, device)


def epoch_batches(batches: Iterable[Batch], skip: int, limit: int, device: torch.device,
                  group: dist.ProcessGroup | None = None) -> Iterator[Batch]:
    """Batches ``skip .. limit-1`` of an epoch, ending on every rank at once (collective per batch).

    Each batch is guarded by an ``all_reduce MIN`` of a "have a batch" flag, so if any rank runs
    out before ``limit`` (a row group skipped under ``on_error="skip"``), all ranks stop together
    instead of deadlocking in the sharded EBC's collectives.
    """
    it = iter(batches)
    for i in range(skip):
        if next(it, None) is None:
            raise RuntimeError(f"resume: the epoch has only {i} batches on this rank, cannot skip {skip}")
    yield from lockstep_min(it, device, group, steps=limit - skip)


@dataclass
class TrainResult:
    """What a stage-1 run did (the same on every rank except ``losses``).

    Attributes:
        steps: optimizer steps done in total.
        losses: this rank's total loss at each step run by this process (resumed runs: only
            the steps after the checkpoint), as ``(step, loss)``.
        valid: validation records, one per epoch.
        best_metric: best sum of validation AUCs.
        last_checkpoint: folder of the last checkpoint written.
        samples_per_s: training throughput over this process's steps (all ranks' samples).
        wall_s: wall time of the loop.
        stopped_early: early stopping fired.
        em_digest: SHA-256 of the final EM labels on this rank (equal on every rank), or None.
    """

    steps: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    valid: list[dict[str, Any]] = field(default_factory=list)
    best_metric: float | None = None
    last_checkpoint: str | None = None
    samples_per_s: float = 0.0
    wall_s: float = 0.0
    stopped_early: bool = False
    em_digest: str | None = None


@dataclass
class TrainContext:
    """Everything the loop runs on (built by :func:`mptrec.pipeline.train.pretrain.pretrain`)."""

    cfg: RunConfig
    run_dir: Path
    dmp: nn.Module
    wrapper: TrainWrapper
    optimizer: Any
    data: DataSource
    device: torch.device
    identity: Mapping[str, Any]
    plan_text: str
    em_store: EMLabelStore | None
    logger: MetricsLogger
    rank: int = 0
    world_size: int = 1
    progress: bool = True
    verbose: bool = True
    group: dist.ProcessGroup | None = None


class Trainer:
    """Runs stage-1 epochs on a :class:`TrainContext` from a :class:`TrainState`.

    Args:
        ctx: the run's objects.
        state: where to start (a fresh ``TrainState()`` or the one of a loaded checkpoint).
        on_step: optional callback ``(step, parts)`` after every step (tests).
    """

    def __init__(self, ctx: TrainContext, state: TrainState,
                 on_step: Callable[[int, Mapping[str, torch.Tensor]], None] | None = None) -> None:
        self.ctx = ctx
        self.state = state
        self.on_step = on_step
        self.result = TrainResult(steps=state.step, best_metric=state.best_metric)
        self.stepper = make_stepper(ctx.dmp, ctx.optimizer, ctx.device, ctx.cfg.train.pipelined)
        self._last_saved_step = state.step if state.step > 0 else -1  # a resumed state is saved
        self._samples = 0
        self._window: list[torch.Tensor] = []
        self._pending_losses: list[tuple[int, torch.Tensor]] = []

    # ---- top level ----------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        """Train until ``train.epochs``, ``train.max_steps`` or early stopping; checkpoint at the end."""
        cfg, st = self.ctx.cfg, self.state
        t0 = time.perf_counter()
        while not st.stopped and st.epoch < cfg.train.epochs and not self._max_steps_reached():
            n = agree_min(self.ctx.data.num_train_batches(st.epoch), self.ctx.device, self.ctx.group)
            if n == 0:
                raise RuntimeError(f"epoch {st.epoch}: some rank has no training batch (train split too "
                                   f"small for {self.ctx.world_size} processes and batch size "
                                   f"{cfg.data.batch_size})")
            if not self._train_epoch(n) or st.stopped:  # max_steps or early stopping mid-epoch
                break
            self._end_of_epoch()
        if self._last_saved_step != st.step and st.step > 0:
            self._checkpoint(is_best=st.best_step is None and not self.result.valid)
        self.result.steps = st.step
        self.result.wall_s = time.perf_counter() - t0
        self.result.samples_per_s = self._samples / self.result.wall_s if self.result.wall_s > 0 else 0.0
        self.result.stopped_early = st.stopped
        self.result.best_metric = st.best_metric
        if self.ctx.em_store is not None:
            labels = self.ctx.em_store.labels.cpu().numpy().tobytes()
            self.result.em_digest = hashlib.sha256(labels).hexdigest()
        return self.result

    def _max_steps_reached(self) -> bool:
        return 0 < self.ctx.cfg.train.max_steps <= self.state.step

    # ---- one epoch ----------------------------------------------------------------------------

    def _train_epoch(self, n: int) -> bool:
        """Train the epoch's remaining batches; False when ``max_steps`` stopped it mid-epoch."""
        ctx, cfg, st = self.ctx, self.ctx.cfg, self.state
        ctx.dmp.train()
        it = epoch_batches(ctx.data.train(st.epoch), st.batches_in_epoch, n, ctx.device, ctx.group)
        bar = tqdm(total=n, initial=st.batches_in_epoch, desc=f"epoch {st.epoch + 1}/{cfg.train.epochs}",
                   unit="batch", file=sys.stderr, disable=not (ctx.progress and ctx.rank == 0),
                   dynamic_ncols=True)
        t_log = time.perf_counter()
        bf16 = bf16_autocast(cfg.train.autocast, ctx.device)
        with bar:
            while st.batches_in_epoch < n and not self._max_steps_reached():
                alpha = grl_alpha(cfg.model.grl_schedule, st.batches_in_epoch, st.epoch + 1, n,
                                  cfg.train.epochs, cfg.data.batch_size, cfg.model.grl_alpha)
                ctx.wrapper.model.set_grl_alpha(alpha)
                try:
                    with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=bf16):
                        parts, _, labels = self.stepper.progress(it)
                except StopIteration:  # some rank ran out of data early (see epoch_batches)
                    break
                st.step += 1
                st.batches_in_epoch += 1
                rows = int(next(iter(labels.values())).shape[0])
                self._window.append(torch.stack([parts[k].float() for k in parts] + [
                    torch.tensor(float(rows), device=parts["loss"].device)]))
                self._pending_losses.append((st.step, parts["loss"]))
                if self.on_step is not None:
                    self.on_step(st.step, parts)
                bar.update(1)
                if st.step % cfg.train.log_every == 0:
                    t_log = self._log_train(list(parts), alpha, t_log, bar)
                    self._flush_losses()
                if (cfg.train.validate_every and st.step % cfg.train.validate_every == 0
                        and st.batches_in_epoch < n):
                    if self._validate_mid_epoch():
                        break
                    continue
                if (cfg.train.checkpoint_every and st.step % cfg.train.checkpoint_every == 0
                        and st.batches_in_epoch < n):
                    self._checkpoint(is_best=False)
        self._flush_losses()
        if isinstance(self.stepper, TrainPipelineSparseDist):
            self.stepper.detach()  # restore the EBC's own forward for eval / EM / checkpointing
        return not self._max_steps_reached() or st.batches_in_epoch >= n

    def _validate_mid_epoch(self) -> bool:
        """Validation point inside an epoch (``train.validate_every``); True when it stops the run.

        The train pipeline is detached for the evaluation (its in-flight batches are kept) and
        re-attaches itself at the next step. The checkpoint written here is the best one when
        the sum of validation AUCs improved, else a plain one (exact resume from mid-epoch).
        """
        ctx = self.ctx
        if isinstance(self.stepper, TrainPipelineSparseDist):
            self.stepper.detach()
        valid = ctx.data.valid()
        is_best = False
        if valid is not None:
            is_best = self._track(self._validate(valid, self.state.epoch + 1))
        self._checkpoint(is_best=is_best, metric=self.result.valid[-1] if is_best else None)
        ctx.dmp.train()
        return self.state.stopped

    def _track(self, record: Mapping[str, Any]) -> bool:
        """Best metric and early stopping (patience counted in validation points); True if best."""
        st, patience = self.state, self.ctx.cfg.train.patience
        metric = record["auc_sum"]
        if st.best_metric is None or metric > st.best_metric:
            st.best_metric, st.best_step, st.bad_epochs = metric, st.step, 0
            return True
        st.bad_epochs += 1
        if 0 < patience <= st.bad_epochs:
            st.stopped = True
        return False

    def _flush_losses(self) -> None:
        # converted in bulk, so a CUDA run does not synchronise at every step
        self.result.losses.extend((s, float(v)) for s, v in self._pending_losses)
        self._pending_losses = []

    def _log_train(self, keys: Sequence[str], alpha: float, t_log: float, bar: tqdm) -> float:
        """Average the window's loss parts over steps and ranks; one metrics line (collective)."""
        ctx = self.ctx
        window = torch.stack(self._window)
        self._window = []
        totals = torch.cat([window[:, :-1].sum(0), window[:, -1].sum(0, keepdim=True),
                            torch.tensor([float(len(window))], device=window.device)])
        if ctx.world_size > 1:
            dist.all_reduce(totals, group=ctx.group)
        steps = float(totals[-1])
        rows = float(totals[-2])
        self._samples += int(rows)
        now = time.perf_counter()
        rate = rows / max(now - t_log, 1e-9)
        means = {k: float(v) / steps for k, v in zip(keys, totals[:-2])}
        record = {"step": self.state.step, "epoch": self.state.epoch + 1, "loss": means.pop("loss"),
                  "losses": means, "lr": ctx.cfg.train.lr, "samples_per_s": round(rate, 1),
                  "alpha": alpha}
        ctx.logger.log(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{rate:,.0f}")
        return now

    # ---- end of epoch -------------------------------------------------------------------------

    def _end_of_epoch(self) -> None:
        ctx, cfg, st = self.ctx, self.ctx.cfg, self.state
        if self._window:
            self._samples += self._flush_window_rows()
        epoch = st.epoch + 1  # 1-based for logs and the EM interval
        interval = cfg.model.clustering_interval
        if ctx.em_store is not None and interval > 0 and epoch % interval == 0:
            sizes = self._relabel()
            ctx.logger.log({"epoch": epoch, "step": st.step, "cluster_sizes": sizes})
        is_best = False
        valid = ctx.data.valid()
        if valid is not None:
            is_best = self._track(self._validate(valid, epoch))
        st.epoch += 1
        st.batches_in_epoch = 0
        self._checkpoint(is_best=is_best, metric=self.result.valid[-1] if is_best else None)

    def _flush_window_rows(self) -> int:
        """Rows of steps not yet logged (counted for throughput only, collective)."""
        rows = torch.tensor([float(sum(float(w[-1]) for w in self._window))], device=self.ctx.device)
        self._window = []
        if self.ctx.world_size > 1:
            dist.all_reduce(rows, group=self.ctx.group)
        return int(rows.item())

    def _validate(self, batches: Iterable[Batch], epoch: int) -> dict[str, Any]:
        ctx = self.ctx
        report = evaluate(ctx.wrapper.model, batches, ctx.cfg.task_names, device=ctx.device,
                          group=ctx.group, progress=ctx.progress, split=ctx.cfg.data.valid_split)
        auc = {t: report["tasks"][t]["auc"] for t in ctx.cfg.task_names}
        auc_sum = sum(v for v in auc.values() if v is not None and math.isfinite(v))
        record = {"epoch": epoch, "step": self.state.step, "split": "valid", "auc": auc, "auc_sum": auc_sum}
        ctx.logger.log(record)
        self.result.valid.append(record)
        if ctx.verbose:
            shown = ", ".join(f"{t} {v:.4f}" if v is not None else f"{t} n/a" for t, v in auc.items())
            log.info("epoch %s: valid AUC %s (sum %.4f)", epoch, shown, auc_sum)
        return record

    def _relabel(self) -> list[int]:
        ctx = self.ctx
        assert ctx.em_store is not None
        model = ctx.wrapper.model
        model.eval()

        def score(batch: Batch) -> Mapping[str, torch.Tensor]:
            logits: Mapping[str, torch.Tensor] = model(batch.dense_features.to(ctx.device),
                                                      batch.sparse_features.to(ctx.device))
            return logits

        try:
            sizes = relabel(ctx.em_store, lockstep(ctx.data.train_in_order(), group=ctx.group), score,
                            em_assign, group=ctx.group)
        finally:
            model.train()
        if ctx.verbose:
            log.info("EM re-labelling: cluster sizes %s", dict(zip(ctx.cfg.task_names, sizes)))
        return sizes

    # ---- checkpoints --------------------------------------------------------------------------

    def _checkpoint(self, is_best: bool, metric: Mapping[str, Any] | None = None) -> None:
        ctx = self.ctx
        path = save_checkpoint(
            ctx.run_dir, module=ctx.dmp, prefix="model.", optimizer=ctx.optimizer, state=self.state,
            identity=ctx.identity, em_labels=ctx.em_store.state_dict() if ctx.em_store else None,
            config=to_dict(ctx.cfg), plan_text=ctx.plan_text, keep_last=ctx.cfg.train.keep_last,
            is_best=is_best, metric=metric, group=ctx.group,
        )
        self._last_saved_step = self.state.step
        self.result.last_checkpoint = str(path)
