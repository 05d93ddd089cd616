"""Prompt tuning vs full retraining with the new task added (``mptrec prompt-tune --compare-full``).

Full retraining: the stage-1 config with the new task added (same data, same epochs and early
stopping as stage 1), trained from scratch in a child job with the same number of processes as
the stage-2 job, so its peak memory is a separate process's, measured as the stage-2 job's
(:mod:`mptrec.pipeline.eval.efficiency`). Compared on the training loop's wall time (epochs +
validation), per epoch, peak memory, parameters, and the old tasks' validation AUC change (the
negative transfer of joint training, paper section 4.3.1).

The steps, around the child job that ``mptrec prompt-tune --compare-full`` starts
(``launch/cmd_prompt_tune.py``; the child is ``mptrec.launch.worker_prompt_tune
--full-retrain``, which trains with ``pretrain`` and writes :func:`full_retrain_summary`):

1. :func:`prepare_full_retraining`: check the task is trained, write the child's resolved config
   into ``RUN/tasks/<task>/`` (its run folder is ``RUN/tasks/<task>/full_retrain``);
2. the child job runs;
3. :func:`read_full_retraining`: read its summary, delete its checkpoints;
4. :func:`record_comparison`: :func:`comparison` into the task's store entry and
   ``efficiency.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mptrec.io import atomic_write_json
from mptrec.pipeline.config import NewTaskSpec, RunConfig, write_resolved
from mptrec.pipeline.distributed import get_world_size, max_over_ranks
from mptrec.pipeline.eval.efficiency import peak_rss_mib, ratio
from mptrec.pipeline.rundir import RunDirError, load_run_config, task_dir
from mptrec.pipeline.tasks.store import load_task_store, prompt_config, record_result

__all__ = [
    "FullRetraining",
    "comparison",
    "full_retrain_config",
    "full_retrain_summary",
    "prepare_full_retraining",
    "read_full_retraining",
    "record_comparison",
]


def full_retrain_config(run_cfg: RunConfig, task_cfg: NewTaskSpec,
                        out_dir: str | os.PathLike[str]) -> RunConfig:
    """The stage-1 run config with the new task added as a jointly trained task (same data, epochs)."""
    return dataclasses.replace(run_cfg, name=f"{run_cfg.name}_full_{task_cfg.name}", out_dir=str(out_dir),
                               tasks=(*run_cfg.tasks, task_cfg.task_spec()))


def full_retrain_summary(result: Any, device: torch.device) -> dict[str, Any]:
    """Timing, peak memory and validation AUCs of a stage-1 ``TrainResult`` (collective).

    Args:
        result: the :class:`~mptrec.pipeline.train.loop.TrainResult` of ``pretrain``.
        device: the device of the process group's collectives.

    Returns:
        ``loop_wall_s`` (the training loop: epochs, validation, EM, checkpoints), per epoch,
        steps, samples/s, peak RSS (max over ranks), every validation record and the best one.
    """
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


@dataclass(frozen=True)
class FullRetraining:
    """The files of one full-retraining child job.

    Attributes:
        config: the child's resolved run config (``RUN/tasks/<task>/full_retrain_config.json``).
        result: where the child's rank 0 writes :func:`full_retrain_summary`
            (``RUN/tasks/<task>/full_retrain_result.json``).
        out: the child's run folder (``RUN/tasks/<task>/full_retrain``).
    """

    config: Path
    result: Path
    out: Path


def prepare_full_retraining(run_dir: str | os.PathLike[str], task: str) -> FullRetraining:
    """Check the task is trained; write the child job's config, clear its folder and result file.

    Raises:
        RunDirError: the task is not registered or not trained yet.
    """
    entry = load_task_store(run_dir)["tasks"].get(task)
    if entry is None or entry["status"] != "trained":
        raise RunDirError(f"task {task!r} of {run_dir} is not trained yet; prompt-tune it first")
    folder = task_dir(run_dir, task)
    run_cfg = load_run_config(run_dir)
    task_cfg, _ = prompt_config(run_dir, task)
    out = folder / "full_retrain"
    if out.exists():
        shutil.rmtree(out)
    job = FullRetraining(config=folder / "full_retrain_config.json",
                         result=folder / "full_retrain_result.json", out=out)
    write_resolved(full_retrain_config(run_cfg, task_cfg, out), job.config)
    job.result.unlink(missing_ok=True)
    return job


def read_full_retraining(job: FullRetraining, process_wall_s: float) -> dict[str, Any]:
    """The child job's summary, with its process wall time and run folder; its checkpoints deleted."""
    summary: dict[str, Any] = json.loads(job.result.read_text())
    summary["process_wall_s"] = round(process_wall_s, 3)
    summary["run_dir"] = str(job.out)
    shutil.rmtree(job.out / "checkpoints", ignore_errors=True)
    return summary


def comparison(efficiency: Mapping[str, Any], full: Mapping[str, Any], base_auc: Mapping[str, float | None],
               new_task: str, new_task_auc: float | None) -> dict[str, Any]:
    """Prompt tuning vs full retraining: wall time, memory, parameters, AUCs (paper section 4.3.1).

    Args:
        efficiency: the stage-2 job's efficiency figures.
        full: :func:`read_full_retraining`'s summary.
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


def record_comparison(run_dir: str | os.PathLike[str], task: str, full: Mapping[str, Any], *,
                      stage2_process_wall_s: float | None = None) -> dict[str, Any]:
    """Add the comparison with a finished full retraining to the task's store entry and efficiency.json.

    Args:
        run_dir: the stage-1 run folder.
        task: a trained prompt-tuned task.
        full: :func:`read_full_retraining`'s summary.
        stage2_process_wall_s: wall time of the whole stage-2 process (start-up, sharding and
            loading included), compared with the full-retraining process's.

    Returns:
        The comparison (see :func:`comparison`).
    """
    store = load_task_store(run_dir)
    entry = store["tasks"][task]
    base = {n: e["metrics"].get("valid_auc") for n, e in store["tasks"].items()
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
