"""Measured efficiency figures of a prompt-tuning job (spec sections 4, 8): parameters, FLOPs, time, memory.

What is measured, and how:

- **Parameters**: ``count_parameters`` on the new head (trainable) and on the model as served
  (backbone + head); the %Params denominator is a full (K+1)-task model of the same
  architecture built from the run config (on the meta device: no memory, exact counts).
- **FLOPs per sample**: ``torch.utils.flop_counter.FlopCounterMode`` on one batch, divided by the
  batch size, on an unsharded copy of the model (sharded collectives are not counted). A
  multiply-add counts as ONE flop (fvcore's convention, the paper's). The trained part's forward
  is the new head's forward from the frozen features; the full model's is a (K+1)-task model's
  forward (embedding lookups count 0 in both).
- **Wall time**: ``time.perf_counter`` around each epoch's training loop (validation excluded,
  reported separately), on rank 0, after a barrier.
- **Peak memory**: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of each process (the peak
  resident set size since the process started, so it includes the interpreter, torch and the
  data loader; taken as the maximum over ranks), plus ``torch.cuda.max_memory_allocated`` on
  CUDA. A full-retraining comparison (``--compare-full``) runs in a child job that measures
  itself the same way, so both figures are per-process peaks.
- **Full retraining** (``--compare-full``) is compared with these figures by
  :mod:`mptrec.pipeline.tasks.full_retrain`.
"""

from __future__ import annotations

import dataclasses
import resource
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mptrec.data_loaders.schema import FeatureSpec
from mptrec.models import NewTaskModel, count_parameters, forward_flops_per_sample
from mptrec.models.base import MultiTaskModel
from mptrec.pipeline.config import NewTaskSpec, RunConfig

__all__ = [
    "EpochClock",
    "cuda_peak_mib",
    "feature_bytes_per_row",
    "peak_rss_mib",
    "ratio",
    "static_figures",
]


def peak_rss_mib(children: bool = False) -> float:
    """Peak resident set size in MiB of this process (or of its largest waited-for child).

    On Linux the peak survives ``exec``, and a process made by fork starts with its parent's
    resident pages, so a process started directly by a large one (say a long pytest run) reports
    at least its parent's size; torchrun's workers are started by torchrun (a few hundred MiB).

    Args:
        children: read ``RUSAGE_CHILDREN`` (the largest terminated, waited-for descendant) instead
            of ``RUSAGE_SELF``.

    Returns:
        MiB (Linux reports KiB, macOS bytes; both are converted).
    """
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    raw = float(resource.getrusage(who).ru_maxrss)
    return raw / (1024.0 * 1024.0) if sys.platform == "darwin" else raw / 1024.0


def cuda_peak_mib(device: torch.device) -> float | None:
    """Peak CUDA memory allocated by torch on ``device`` in MiB; None on a CPU device."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / (1024.0 * 1024.0)


def ratio(part: float, whole: float) -> float | None:
    """``part / whole``, or None when ``whole`` is 0."""
    return part / whole if whole else None


class EpochClock:
    """Wall time of training epochs (and of the rest), with ``time.perf_counter``.

    Example:
        >>> clock = EpochClock()
        >>> with clock.epoch():
        ...     pass
        >>> len(clock.epoch_s)
        1
    """

    def __init__(self) -> None:
        self.epoch_s: list[float] = []
        self.eval_s: list[float] = []
        self.cache_s: float = 0.0
        self.start = time.perf_counter()

    @contextmanager
    def caching(self) -> Iterator[None]:
        """Time the one pass of the frozen backbone that fills the feature cache."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.cache_s += time.perf_counter() - t0

    @contextmanager
    def epoch(self) -> Iterator[None]:
        """Time one training epoch."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.epoch_s.append(time.perf_counter() - t0)

    @contextmanager
    def evaluation(self) -> Iterator[None]:
        """Time one validation pass."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.eval_s.append(time.perf_counter() - t0)

    def summary(self) -> dict[str, Any]:
        """Per-epoch and total figures as plain JSON data."""
        n = len(self.epoch_s)
        return {
            "epochs_run": n,
            "epoch_wall_s": [round(t, 4) for t in self.epoch_s],
            "wall_s_per_epoch": round(sum(self.epoch_s) / n, 4) if n else None,
            "train_wall_s": round(sum(self.epoch_s), 4),
            "eval_wall_s": round(sum(self.eval_s), 4),
            "feature_cache_wall_s": round(self.cache_s, 4),
            "job_wall_s": round(time.perf_counter() - self.start, 4),
        }


# --------------------------------------------------------------------------------------------
# Parameters and FLOPs of the new head vs the models it is compared with
# --------------------------------------------------------------------------------------------

_FLOP_BATCH = 32
_FLOP_VOCAB = 16  # FLOPs do not depend on table sizes: small tables, real widths


def _synthetic_inputs(features: Sequence[FeatureSpec], batch: int) -> tuple[torch.Tensor, KeyedJaggedTensor]:
    """A batch with one id per sparse feature (ids < the shrunk table sizes) and N(0, 1) dense values."""
    g = torch.Generator().manual_seed(0)
    sparse = [f for f in features if f.kind == "sparse"]
    dense = torch.randn(batch, sum(f.kind == "dense" for f in features), generator=g)
    values = torch.cat([torch.randint(0, min(f.num_embeddings, _FLOP_VOCAB), (batch,), generator=g)
                        for f in sparse])
    lengths = torch.ones(batch * len(sparse), dtype=torch.int32)
    return dense, KeyedJaggedTensor.from_lengths_sync([f.name for f in sparse], values, lengths)


def _model(run_cfg: RunConfig, features: Sequence[FeatureSpec], tasks: Sequence[str],
           device: str) -> MultiTaskModel:
    from mptrec.models import build_model
    from mptrec.pipeline.build import build_ebc

    if device != "meta":
        features = [dataclasses.replace(f, num_embeddings=min(f.num_embeddings, _FLOP_VOCAB))
                    if f.kind == "sparse" else f for f in features]
    torch.manual_seed(0)
    return build_model(run_cfg.model, build_ebc(features, device),
                       sparse_features=[f.name for f in features if f.kind == "sparse"],
                       dense_dim=sum(f.kind == "dense" for f in features), task_names=list(tasks),
                       single_valued=[f.name for f in features if f.single_valued])


def feature_bytes_per_row(run_cfg: RunConfig, features: Sequence[FeatureSpec]) -> int:
    """Bytes per row of the backbone's per-sample ``features()`` (float32), for the cache budget."""
    rows = 7  # a batch size unlikely to equal a constant feature's first dimension
    model = _model(run_cfg, features, run_cfg.task_names, "cpu")
    with torch.no_grad():
        feats = model.features(*_synthetic_inputs(features, rows))
    return sum(v.numel() // rows * v.element_size() for v in feats.values()
               if v.dim() > 0 and v.shape[0] == rows)


def static_figures(run_cfg: RunConfig, features: Sequence[FeatureSpec], task_cfg: NewTaskSpec,
                   tower_hidden: Sequence[int]) -> dict[str, Any]:
    """Parameter counts and forward FLOPs per sample of the new head vs the full models.

    Built unsharded: parameter counts on the meta device (exact, nothing allocated), FLOPs on
    CPU with tables shrunk to 16 rows (a lookup costs no multiply-add).

    Args:
        run_cfg: the stage-1 run config.
        features: the model's input features.
        task_cfg: the new task.
        tower_hidden: the new tower's hidden sizes.

    Returns:
        ``trainable_params`` (the head), ``served_params`` (stage-1 model + head),
        ``full_model_params`` (a (K+1)-task model trained from scratch: the paper's %Params
        denominator), ``trainable_fraction`` (of the latter), ``trainable_fraction_of_served``,
        ``flops_per_sample_trained`` (the head's forward from the frozen features),
        ``flops_per_sample_full`` (the (K+1)-task model's forward), ``flops_fraction``,
        ``flops_per_sample_frozen_backbone`` (the backbone forward stage 2 also runs, no backward).
    """
    tasks = [*run_cfg.task_names, task_cfg.name]
    base = _model(run_cfg, features, run_cfg.task_names, "meta")
    head = base.new_task_head(task_cfg.name, task_cfg.method, tuple(tower_hidden),
                              offset_max_rows=task_cfg.offset_max_rows)
    trainable = count_parameters(head)[0]
    served = count_parameters(base)[1] + trainable
    full = count_parameters(_model(run_cfg, features, tasks, "meta"))[1]
    small = _model(run_cfg, features, run_cfg.task_names, "cpu")
    small_head = small.new_task_head(task_cfg.name, task_cfg.method, tuple(tower_hidden),
                                     offset_max_rows=task_cfg.offset_max_rows)
    dense, kjt = _synthetic_inputs(features, _FLOP_BATCH)
    # what the head reads, from the one place that assembles it (ids included when it reads them)
    feats = NewTaskModel(small, {task_cfg.name: small_head}).backbone_features(dense, kjt)
    f_head = forward_flops_per_sample(small_head, feats)
    f_full = forward_flops_per_sample(_model(run_cfg, features, tasks, "cpu"), dense, kjt)
    return {
        "method": task_cfg.method,
        "trainable_params": trainable,
        "served_params": served,
        "full_model_params": full,
        "trainable_fraction": ratio(trainable, full),
        "trainable_fraction_of_served": ratio(trainable, served),
        "flops_per_sample_trained": f_head,
        "flops_per_sample_full": f_full,
        "flops_fraction": ratio(f_head, f_full),
        "flops_per_sample_frozen_backbone": forward_flops_per_sample(small, dense, kjt),
        "flops_convention": "one multiply-add = one flop (fvcore), torch.utils.flop_counter",
    }
