"""Measured efficiency figures of a prompt-tuning job (spec sections 4 and 8).

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
- **Full retraining** (``--compare-full``): the stage-1 config with the new task added (same
  data, same epochs and early stopping as stage 1), trained from scratch in a child job with
  the same number of processes; compared on the training loop's wall time (epochs +
  validation), per epoch, peak memory, parameters, and the old tasks' validation AUC change
  (the negative transfer of joint training, paper section 4.3.1).
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mptrec.data_loaders.schema import FeatureSpec
from mptrec.io import atomic_write_json
from mptrec.models import count_parameters, forward_flops_per_sample
from mptrec.models.base import MultiTaskModel
from mptrec.pipeline.config import PromptTuneConfig, RunConfig

__all__ = [
    "EpochClock",
    "cuda_peak_mib",
    "peak_rss_mib",
    "compare_full",
    "comparison",
    "feature_bytes_per_row",
    "full_retrain_config",
    "full_retrain_summary",
    "ratio",
    "run_full_retraining",
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
                       dense_dim=sum(f.kind == "dense" for f in features), task_names=list(tasks))


def feature_bytes_per_row(run_cfg: RunConfig, features: Sequence[FeatureSpec]) -> int:
    """Bytes per row of the backbone's per-sample ``features()`` (float32), for the cache budget."""
    rows = 7  # a batch size unlikely to equal a constant feature's first dimension
    model = _model(run_cfg, features, run_cfg.task_names, "cpu")
    with torch.no_grad():
        feats = model.features(*_synthetic_inputs(features, rows))
    return sum(v.numel() // rows * v.element_size() for v in feats.values()
               if v.dim() > 0 and v.shape[0] == rows)


def static_figures(run_cfg: RunConfig, features: Sequence[FeatureSpec], task_cfg: PromptTuneConfig,
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
    head = base.new_task_head(task_cfg.name, task_cfg.method, tuple(tower_hidden))
    trainable = count_parameters(head)[0]
    served = count_parameters(base)[1] + trainable
    full = count_parameters(_model(run_cfg, features, tasks, "meta"))[1]
    small = _model(run_cfg, features, run_cfg.task_names, "cpu")
    small_head = small.new_task_head(task_cfg.name, task_cfg.method, tuple(tower_hidden))
    dense, kjt = _synthetic_inputs(features, _FLOP_BATCH)
    with torch.no_grad():
        feats = small.features(dense, kjt)
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


# --------------------------------------------------------------------------------------------
# Full retraining with the new task added (``mptrec prompt-tune --compare-full``)
# --------------------------------------------------------------------------------------------


def full_retrain_config(run_cfg: RunConfig, task_cfg: PromptTuneConfig,
                        out_dir: str | os.PathLike[str]) -> RunConfig:
    """The stage-1 run config with the new task added as a jointly trained task (same data, epochs)."""
    return dataclasses.replace(run_cfg, name=f"{run_cfg.name}_full_{task_cfg.name}", out_dir=str(out_dir),
                               tasks=(*run_cfg.tasks, task_cfg.task_spec()))


def full_retrain_summary(result: Any, device: torch.device) -> dict[str, Any]:
    """Timing, peak memory and validation AUCs of a stage-1 ``TrainResult`` (collective).

    Args:
        result: the :class:`~mptrec.pipeline.loop.TrainResult` of ``pretrain``.
        device: the device of the process group's collectives.

    Returns:
        ``loop_wall_s`` (the training loop: epochs, validation, EM, checkpoints), per epoch,
        steps, samples/s, peak RSS (max over ranks), every validation record and the best one.
    """
    from mptrec.pipeline.distributed import get_world_size, max_over_ranks

    peak = max_over_ranks(peak_rss_mib(), device)
    valid = list(result.valid)
    best = max(valid, key=lambda r: r["auc_sum"]) if valid else None
    epochs = len(valid)
    return {
        "loop_wall_s": round(result.wall_s, 4),
        "epochs_run": epochs,
        "loop_wall_s_per_epoch": round(result.wall_s / epochs, 4) if epochs else None,
        "steps": result.steps,
        "samples_per_s": round(result.samples_per_s, 1),
        "peak_rss_mib": round(peak, 1),
        "valid": valid,
        "best": best,
        "world_size": get_world_size(),
    }


def run_full_retraining(run_dir: str | os.PathLike[str], task: str, nproc: int, *,
                        progress: bool = True) -> dict[str, Any]:
    """Train the stage-1 model from scratch with the new task added, in a child job; its figures.

    The child is ``python -m mptrec.launch.prompt_tune --full-retrain`` (under torchrun for
    ``nproc > 1``), so its peak memory is a separate process's, measured as the stage-2 job's.
    Its run folder is ``RUN/tasks/<task>/full_retrain`` (config, plan, metrics; the checkpoints
    are deleted afterwards).

    Raises:
        RuntimeError: the child job failed.
    """
    from mptrec.pipeline.config import write_resolved
    from mptrec.pipeline.registry import load_run_config, prompt_config, task_dir

    folder = task_dir(run_dir, task)
    run_cfg = load_run_config(run_dir)
    task_cfg, _ = prompt_config(run_dir, task)
    out = folder / "full_retrain"
    if out.exists():
        shutil.rmtree(out)
    cfg_path, result_path = folder / "full_retrain_config.json", folder / "full_retrain_result.json"
    write_resolved(full_retrain_config(run_cfg, task_cfg, out), cfg_path)
    result_path.unlink(missing_ok=True)
    args = ["-m", "mptrec.launch.prompt_tune", "--full-retrain", str(cfg_path), "--result", str(result_path)]
    args += [] if progress else ["--no-progress"]
    if nproc > 1:
        args = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.perf_counter()
    rc = subprocess.call([sys.executable, *args], env=env)
    if rc != 0 or not result_path.is_file():
        raise RuntimeError(f"full retraining for the comparison failed (exit code {rc}); see {out}")
    summary: dict[str, Any] = json.loads(result_path.read_text())
    summary["process_wall_s"] = round(time.perf_counter() - t0, 3)
    summary["run_dir"] = str(out)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return summary


def comparison(efficiency: Mapping[str, Any], full: Mapping[str, Any], base_auc: Mapping[str, float | None],
               new_task: str, new_task_auc: float | None) -> dict[str, Any]:
    """Prompt tuning vs full retraining: wall time, memory, parameters, AUCs (paper section 4.3.1).

    Args:
        efficiency: the stage-2 job's efficiency figures.
        full: :func:`run_full_retraining`'s summary.
        base_auc: old task -> validation AUC of the stage-1 model (its best checkpoint).
        new_task: the new task's name.
        new_task_auc: the prompt-tuned head's best validation AUC.

    Returns:
        ``wall_ratio`` (stage-2 loop / full-retraining loop), per-epoch ratio, peak-memory ratio,
        trainable-parameter ratio, ``old_task_auc_change`` (full retraining minus stage 1: the
        negative transfer of joint training) and the new task's AUC both ways.
    """
    stage2_loop = (float(efficiency["train_wall_s"]) + float(efficiency["eval_wall_s"])
                   + float(efficiency.get("feature_cache_wall_s", 0.0)))
    epochs = int(efficiency["epochs_run"]) or 1
    best = full.get("best") or {}
    auc = best.get("auc", {}) if isinstance(best, Mapping) else {}
    change = {t: (auc[t] - a if auc.get(t) is not None and a is not None else None)
              for t, a in base_auc.items()}
    return {
        "stage2_loop_wall_s": round(stage2_loop, 4),
        "stage2_loop_wall_s_per_epoch": round(stage2_loop / epochs, 4),
        "full_loop_wall_s": full["loop_wall_s"],
        "full_loop_wall_s_per_epoch": full["loop_wall_s_per_epoch"],
        "wall_ratio": ratio(stage2_loop, float(full["loop_wall_s"])),
        "wall_per_epoch_ratio": ratio(stage2_loop / epochs, float(full["loop_wall_s_per_epoch"] or 0)),
        "peak_rss_mib_stage2": efficiency["peak_rss_mib"],
        "peak_rss_mib_full": full["peak_rss_mib"],
        "trainable_params_stage2": efficiency["trainable_params"],
        "trainable_params_full": efficiency["full_model_params"],
        "old_task_auc_stage1": dict(base_auc),
        "old_task_auc_full": {t: auc.get(t) for t in base_auc},
        "old_task_auc_change": change,
        "new_task_auc_prompt_tuned": new_task_auc,
        "new_task_auc_full": auc.get(new_task),
        "full_epochs_run": full["epochs_run"],
        "full_world_size": full["world_size"],
        "auc_note": "validation AUC at each run's best checkpoint (full retraining: best sum of the "
                    "K+1 AUCs)",
    }


def compare_full(run_dir: str | os.PathLike[str], task: str, nproc: int, *,
                 progress: bool = True, stage2_process_wall_s: float | None = None) -> dict[str, Any]:
    """Run full retraining and add the comparison to the task's registry entry and efficiency.json.

    Args:
        run_dir: the stage-1 run folder.
        task: a trained prompt-tuned task.
        nproc: processes of the full-retraining job (use the stage-2 job's).
        progress: progress output of the child job.
        stage2_process_wall_s: wall time of the whole stage-2 process (start-up, sharding and
            loading included), compared with the full-retraining process's.

    Returns:
        The comparison (see :func:`comparison`).
    """
    from mptrec.pipeline.registry import (
        RegistryError,
        load_registry,
        record_result,
        task_dir,
    )

    entry = load_registry(run_dir)["tasks"].get(task)
    if entry is None or entry["status"] != "trained":
        raise RegistryError(f"task {task!r} of {run_dir} is not trained yet; prompt-tune it first")
    full = run_full_retraining(run_dir, task, nproc, progress=progress)
    registry = load_registry(run_dir)
    entry = registry["tasks"][task]
    base = {n: e["metrics"].get("valid_auc") for n, e in registry["tasks"].items()
            if e["role"] == "pretrained"}
    result = comparison(entry["efficiency"], full, base, task, entry["metrics"].get("valid_auc"))
    if stage2_process_wall_s is not None:
        result["stage2_process_wall_s"] = round(stage2_process_wall_s, 3)
        result["full_process_wall_s"] = full["process_wall_s"]
        result["process_wall_ratio"] = ratio(stage2_process_wall_s, float(full["process_wall_s"]))
    efficiency = {**entry["efficiency"], "full_retraining": result}
    record_result(run_dir, task, status=entry["status"], metrics=entry["metrics"], efficiency=efficiency)
    atomic_write_json(task_dir(run_dir, task) / "efficiency.json", efficiency)
    return result
