"""Stage 2: train a registered new task's head on the frozen, sharded stage-1 model (spec 3.3, 4).

The job (:func:`prompt_tune`, collective over 1..N processes):

1. reads the task from the task store and checks the base checkpoint still has the content hash
   recorded at registration;
2. rebuilds the stage-1 model from ``RUN/config.json``, adds ``new_task_head(name, method,
   tower_hidden)`` (a :class:`NewTaskModel`), shards it on THIS job's world size with **no
   optimizer on the tables** (no ``apply_optimizer_in_backward``, no dense optimizer) and loads
   only the backbone's keys from the stage-1 DCP checkpoint
   (:func:`mptrec.pipeline.tasks.union.build_run_model`). TorchRec's FUSED kernel still carries
   a built-in update (EXACT_SGD when none is configured) that runs only inside the kernel's own
   backward; that backward is never reached, because the backbone runs under ``no_grad``, its
   outputs are detached and every backbone leaf (the kernels' weights included) has
   ``requires_grad`` off; step 5 proves it;
3. trains the head only (:func:`mptrec.pipeline.tasks.tuning_loop.train_head`): the backbone
   is frozen (``requires_grad`` off, eval mode, forward under ``no_grad``, outputs detached),
   Adam holds exactly the head's parameters, and after each backward the head's gradients (the
   only ones) are averaged over the ranks with one flat ``all_reduce`` (the head is replicated;
   training calls the inner modules, not DMP's DDP wrapper). Loss: BCE + ``r_dnn`` x
   ``head.l2_penalty()`` (Eq. 15: new tower weights only), the L2 gradient applied as Adam's
   weight decay on ``head.l2_parameters()``. The frozen features never change, so
   when they fit in ``feature_cache_mib`` the backbone runs ONCE over the train and validation
   rows (lock-step with filler batches, every row once) and each epoch trains on the cached
   features, reshuffled, with the ranks agreeing on the minimum batch count (``all_reduce
   MIN``). Without the cache each epoch streams the shards through the backbone: before each
   step the ranks all-reduce (MIN) a "has a batch" flag and the epoch ends when any rank is out
   of data, so every rank runs the same number of sharded forwards (the other ranks' surplus,
   at most about a row group, is skipped);
4. validates the new task each epoch (exact AUC over every validation row), early-stops on
   it (``patience``) and keeps the best head;
5. proves the freeze: a digest of every backbone tensor (this rank's embedding shards
   included) taken after loading must be unchanged after training, else the job fails;
6. rank 0 writes ONLY the new task's weights ``RUN/tasks/<name>/head.pt`` (a tensor state
   dict), ``meta.json`` (config, tower sizes, base checkpoint and hash, library versions),
   ``efficiency.json``, and updates the task store (status ``trained``, metrics, efficiency),
   all atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mptrec.io import atomic_write, atomic_write_json
from mptrec.logs import get_logger
from mptrec.models import count_parameters
from mptrec.pipeline.distributed import barrier, get_rank, get_world_size, max_over_ranks
from mptrec.pipeline.eval.efficiency import cuda_peak_mib, peak_rss_mib
from mptrec.pipeline.rundir import file_sha256, load_run_config, task_dir
from mptrec.pipeline.strict import to_dict
from mptrec.pipeline.tasks.checks import check_base_unchanged
from mptrec.pipeline.tasks.store import load_task_store, prompt_config, record_result
from mptrec.pipeline.tasks.tuning_loop import Stage2, StageResult, head_optimizer, train_head
from mptrec.pipeline.tasks.union import HeadSpec, backbone_digest, build_run_model

__all__ = ["prompt_tune", "run_stage2", "setup_stage2"]

log = get_logger(__name__)


def setup_stage2(run_dir: str | os.PathLike[str], task: str, device: torch.device,
                 overrides: Sequence[str] = (), group: dist.ProcessGroup | None = None) -> Stage2:
    """Check the registration, build/shard/load the frozen model with a fresh head (collective).

    Raises:
        RunDirError: unknown task, or its base checkpoint is gone or changed.
    """
    run = Path(run_dir)
    cfg, entry = prompt_config(run, task, overrides)
    ckpt = check_base_unchanged(run, load_task_store(run), task)
    rank, world = get_rank(group), get_world_size(group)
    run_cfg = load_run_config(run)
    if run_cfg.train.threads > 0:
        torch.set_num_threads(run_cfg.train.threads)
    inherited = cfg.resolve(run_cfg)
    sharded = build_run_model(run, ckpt, device, {cfg.name: HeadSpec.of(cfg, inherited.tower_hidden)},
                            seed=cfg.seed, batch_size=inherited.batch_size, group=group)
    head = sharded.heads[cfg.name]
    optimizer = head_optimizer(head, cfg.lr, inherited.r_dnn)  # fused: one kernel per step
    return Stage2(run_dir=run, cfg=cfg, entry=entry, sharded=sharded, head=head, optimizer=optimizer,
                  r_dnn=inherited.r_dnn, batch_size=inherited.batch_size, tower_hidden=inherited.tower_hidden,
                  device=device, rank=rank, world_size=world, group=group)


# --------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------


def _optimized_params(s: Stage2) -> int:
    """Parameters the stage-2 optimizer updates (the head's)."""
    return sum(p.numel() for g in s.optimizer.param_groups for p in g["params"])


def _efficiency(s: Stage2, res: StageResult) -> dict[str, Any]:
    from mptrec.pipeline.eval.efficiency import static_figures

    figures = static_figures(s.sharded.run_cfg, s.sharded.features, s.cfg, s.tower_hidden)
    trainable, _ = count_parameters(s.head)
    opt_params = _optimized_params(s)
    if trainable != figures["trainable_params"] or opt_params != trainable:
        raise RuntimeError(f"parameter accounting mismatch: head {trainable}, optimizer {opt_params}, "
                           f"unsharded head {figures['trainable_params']}")
    cuda = cuda_peak_mib(s.device)
    return {
        **figures,
        **res.clock.summary(),
        "steps": res.steps,
        "peak_rss_mib": round(max_over_ranks(peak_rss_mib(), s.device, s.group), 1),
        "peak_cuda_mib": None if cuda is None else round(max_over_ranks(cuda, s.device, s.group), 1),
        "world_size": s.world_size,
        "device": s.device.type,
        "memory_measure": "max over ranks of getrusage(RUSAGE_SELF).ru_maxrss (whole-process peak RSS)",
    }


def _save(s: Stage2, res: StageResult, metrics: dict[str, Any], efficiency: dict[str, Any]) -> Path:
    """Rank 0: head weights, meta, efficiency report, task store update (each atomic)."""
    from mptrec.pipeline.checkpoint import library_versions

    out = task_dir(s.run_dir, s.cfg.name)
    out.mkdir(parents=True, exist_ok=True)
    head_path = out / "head.pt"
    state = {k: v.detach().cpu().clone() for k, v in res.best_state.items()}
    atomic_write(head_path, lambda tmp: torch.save(state, tmp))
    meta = {"task": s.cfg.name, "method": s.cfg.method, "tower_hidden": list(s.tower_hidden),
            "config": to_dict(s.cfg), "base_checkpoint": s.entry["base_checkpoint"],
            "base_checkpoint_sha256": s.entry["base_checkpoint_sha256"], "world_size": s.world_size,
            "metrics": metrics, "versions": library_versions(), "adapter_params": list(s.head.state_dict())}
    atomic_write_json(out / "meta.json", meta)
    atomic_write_json(out / "efficiency.json", efficiency)
    record_result(s.run_dir, s.cfg.name, status="trained", metrics=metrics, efficiency=efficiency,
                  artifact_sha256=file_sha256(head_path))
    return head_path


def run_stage2(s: Stage2, *, progress: bool = True) -> dict[str, Any]:
    """Train the head of a set-up job, prove the freeze, save and register (collective).

    Returns:
        ``{"metrics", "efficiency", "artifact"}`` (the same on every rank).

    Raises:
        RuntimeError: a backbone tensor changed, or the parameter accounting does not add up.
    """
    from mptrec.pipeline.train.metrics_log import MetricsLogger

    before = backbone_digest(s.sharded.backbone)
    if not before or not any("embedding" in k for k in before):
        raise RuntimeError(f"the backbone digest covers no embedding table ({sorted(before)[:5]}); "
                           "the freeze could not be proved")
    # what the optimizer updates: the head. (Replicated data_parallel tables are views of their
    # fused weights that keep requires_grad after sharding; the backbone runs under no_grad and
    # its digest, checked after training, proves it unchanged.)
    trainable = _optimized_params(s)
    total = count_parameters(s.sharded.model)[1]
    if progress:
        log.info("prompt-tune %s: method %s, trains %s of %s local parameters (the head's), %d process(es)",
                 s.cfg.name, s.cfg.method, f"{trainable:,}", f"{total:,}", s.world_size)
    logger = MetricsLogger(task_dir(s.run_dir, s.cfg.name), enabled=s.rank == 0, tensorboard=False)
    try:
        res = train_head(s, num_workers=s.sharded.run_cfg.data.num_workers, progress=progress, logger=logger)
    finally:
        logger.close()
    after = backbone_digest(s.sharded.backbone)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    if changed:
        raise RuntimeError(f"the frozen backbone changed during prompt tuning: {changed[:5]}")
    metrics = {"valid_auc": res.best_auc, "best_epoch": res.best_epoch, "epochs_run": len(res.valid),
               "steps": res.steps, "valid_history": res.valid, "backbone_unchanged": after == before,
               "backbone_tensors_checked": len(before)}
    efficiency = _efficiency(s, res)
    artifact = task_dir(s.run_dir, s.cfg.name) / "head.pt"
    if s.rank == 0:
        _save(s, res, metrics, efficiency)
    log.info(json.dumps({"task": s.cfg.name, "valid_auc": res.best_auc,
                         "trainable_params": efficiency["trainable_params"],
                         "trainable_fraction": efficiency["trainable_fraction"]}))
    barrier(s.group)
    return {"metrics": metrics, "efficiency": efficiency, "artifact": str(artifact)}


def prompt_tune(run_dir: str | os.PathLike[str], task: str, device: torch.device, *,
                overrides: Sequence[str] = (), group: dist.ProcessGroup | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Run the whole stage-2 job for a registered task (collective; every rank calls it).

    Args:
        run_dir: the stage-1 run folder holding the task store.
        task: the registered new task.
        device: compute device.
        overrides: ``key=value`` overrides of the registered task config (``epochs=3``).
        group: process group (default: the world).
        progress: tqdm bars and per-epoch lines on rank 0.

    Returns:
        ``{"metrics", "efficiency", "artifact"}`` (the same on every rank).
    """
    return run_stage2(setup_stage2(run_dir, task, device, overrides, group), progress=progress)
