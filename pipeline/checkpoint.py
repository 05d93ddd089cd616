"""Stage-1 checkpoints with ``torch.distributed.checkpoint`` (DCP): save, resume, reshard, backbone.

Layout of one checkpoint (``RUN/checkpoints/step-000123/``)::

    .metadata, __<rank>_0.distcp   DCP: {"model": backbone state dict (sharded tables included),
                                          "optim": CombinedOptimizer state (dense Adam + fused)}
    em_labels.pt                   EM task labels of the training rows (rank 0)
    rng-rank<r>.pt                 torch / numpy / python (/ CUDA) RNG states of rank r
    plan.txt                       the sharding plan that wrote it
    config.json                    the resolved run config
    meta.json                      written last: step, epoch, batches consumed in that epoch,
                                   world size, model name, features, tasks, every backbone
                                   key's global shape, train state, library versions

Model keys are **backbone-relative** (the keys of the ``MultiTaskModel``'s own
``state_dict()``, e.g. ``ebc.embedding_bags.t_205.weight``), whatever wraps the model.

Writes are atomic: every rank writes into ``RUN/checkpoints/.tmp-step-N``; after a barrier rank 0
renames it to ``step-N`` (``os.replace``), points ``best`` (a relative symlink) at it when it is
the best so far, and deletes all but the last ``train.keep_last`` checkpoints (never the best).
A multi-node run needs ``out_dir`` on a shared file system.

Damage: ``meta.json`` lists every file of the checkpoint with its size;
:func:`mptrec.pipeline.checkpoint_files.verify_checkpoint` checks them (and the byte ranges DCP's
``.metadata`` refers to) before any load, naming a missing or truncated file, and ``--resume``
skips a damaged last checkpoint for the previous complete one
(:func:`mptrec.pipeline.checkpoint_files.latest_complete_checkpoint`). Finding, naming and
checking checkpoint folders (no tensors) is :mod:`mptrec.pipeline.checkpoint_files`; saving and
loading tensors is here.

Loading into a different world size (resharding) is DCP's job: each rank reads the pieces of
its own shards; tested 2 -> 1 and 1 -> 2 processes (``tests/pipeline/test_checkpoint.py``). RNG
states are restored only when the world size is unchanged (exact resume).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

from mptrec.data_loaders.schema import FeatureSpec
from mptrec.io import atomic_write_json
from mptrec.pipeline.checkpoint_files import (
    FORMAT_VERSION,
    CheckpointError,
    check_compatible,
    feature_identity,
    find_checkpoints,
    global_shape,
    resolve_checkpoint,
    verify_checkpoint,
)
from mptrec.pipeline.distributed import barrier, get_rank, get_world_size

__all__ = [
    "TrainState",
    "backbone_state_dict",
    "library_versions",
    "load_backbone",
    "load_checkpoint",
    "save_checkpoint",
]

@dataclass
class TrainState:
    """Where training stands (saved in ``meta.json``).

    Attributes:
        step: optimizer steps done (global step).
        epoch: the epoch in progress (0-based); after an epoch ends, the next one.
        batches_in_epoch: batches of ``epoch`` already trained (the loader position: a resumed
            run skips that many batches of the epoch, deterministically).
        best_metric: best sum of validation AUCs so far (None: no validation yet).
        best_step: step of the best checkpoint.
        bad_epochs: epochs since the last improvement (early stopping).
        stopped: early stopping fired.
    """

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    bad_epochs: int = 0
    stopped: bool = False


def library_versions() -> dict[str, str]:
    """Versions of torch, torchrec, FBGEMM and mptrec (``meta.json``)."""
    out: dict[str, str] = {"torch": str(torch.__version__)}
    for name, dists in (("torchrec", ("torchrec",)), ("fbgemm", ("fbgemm-gpu-cpu", "fbgemm-gpu")),
                        ("mptrec", ("mptrec",))):
        for d in dists:
            try:
                out[name] = metadata.version(d)
                break
            except metadata.PackageNotFoundError:
                continue
        else:
            out[name] = "unknown"
    return out


# --------------------------------------------------------------------------------------------
# State dicts
# --------------------------------------------------------------------------------------------


def backbone_state_dict(module: nn.Module, prefix: str = "") -> dict[str, Any]:
    """The backbone's entries of ``module.state_dict()``, with ``prefix`` stripped.

    Args:
        module: the backbone itself (``prefix=""``), or a module holding it under ``prefix``
            (e.g. a DMP-wrapped ``TrainWrapper``: ``prefix="model."``).
        prefix: where the backbone sits in ``module``.

    Returns:
        backbone-relative key -> tensor / ShardedTensor (views of the live parameters).
    """
    sd = module.state_dict()
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


# --------------------------------------------------------------------------------------------
# RNG states
# --------------------------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    np_state: tuple[Any, ...] = tuple(np.random.get_state(legacy=True))
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(np_state[0]), "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    *,
    module: nn.Module,
    prefix: str,
    optimizer: Any,
    state: TrainState,
    identity: Mapping[str, Any],
    em_labels: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    plan_text: str = "",
    keep_last: int = 2,
    is_best: bool = False,
    metric: Mapping[str, Any] | None = None,
    group: dist.ProcessGroup | None = None,
) -> Path:
    """Write ``RUN/checkpoints/step-<state.step>`` atomically (collective).

    Args:
        run_dir: the run folder.
        module: the (DMP-wrapped) module whose ``state_dict()`` holds the backbone.
        prefix: where the backbone sits in ``module``'s keys (``"model."`` for a TrainWrapper).
        optimizer: a KeyedOptimizer (``CombinedOptimizer``) with a keyed ``state_dict()``.
        state: the train state to record.
        identity: :func:`~mptrec.pipeline.checkpoint_files.checkpoint_meta` of the model.
        em_labels: ``EMLabelStore.state_dict()`` or None.
        config: the resolved run config (JSON-able).
        plan_text: the sharding plan.
        keep_last: step checkpoints to keep (at least 1), besides the best.
        is_best: point ``checkpoints/best`` at this one.
        metric: validation metrics recorded with it.
        group: process group.

    Returns:
        The checkpoint folder.
    """
    root = Path(run_dir) / "checkpoints"
    name = f"step-{state.step:06d}"
    tmp, final = root / f".tmp-{name}", root / name
    rank = get_rank(group)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier(group)
    dcp.save({"model": backbone_state_dict(module, prefix), "optim": optimizer.state_dict()},
             checkpoint_id=tmp, process_group=group)
    torch.save(_rng_state(), tmp / f"rng-rank{rank}.pt")
    barrier(group)
    if rank == 0:
        if em_labels is not None:
            torch.save(dict(em_labels), tmp / "em_labels.pt")
        (tmp / "plan.txt").write_text(plan_text)
        (tmp / "config.json").write_text(json.dumps(config or {}, indent=2) + "\n")
        files = {f.relative_to(tmp).as_posix(): f.stat().st_size
                 for f in sorted(tmp.rglob("*")) if f.is_file() and f.name != "meta.json"}
        meta = {"format": FORMAT_VERSION, **identity, "files": files, "step": state.step,
                "epoch": state.epoch,
                "batches_in_epoch": state.batches_in_epoch, "world_size": get_world_size(group),
                "train_state": asdict(state), "metric": dict(metric) if metric else None,
                "versions": library_versions(), "created": datetime.now(UTC).isoformat(timespec="seconds")}
        atomic_write_json(tmp / "meta.json", meta, indent=1)
        _publish(root, tmp, final, is_best, keep_last)
    barrier(group)
    return final


def _publish(root: Path, tmp: Path, final: Path, is_best: bool, keep_last: int) -> None:
    """Rename the finished checkpoint into place, repoint ``best``, prune old ones (rank 0)."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if is_best:
        link = root / ".best.tmp"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(final.name, target_is_directory=True)
        os.replace(link, root / "best")
    _prune(root, keep_last)


def _prune(root: Path, keep_last: int) -> None:
    best = root / "best"
    best_target = os.path.realpath(best) if best.is_symlink() else None
    steps = find_checkpoints(root.parent)
    for _, path in steps[:-max(1, keep_last)]:
        if best_target is not None and os.path.realpath(path) == best_target:
            continue
        shutil.rmtree(path)


# --------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------


@dataclass
class LoadedCheckpoint:
    """What :func:`load_checkpoint` restored besides the tensors."""

    path: Path
    meta: dict[str, Any]
    state: TrainState
    em_labels: dict[str, Any] | None = None
    rng_restored: bool = False
    notes: list[str] = field(default_factory=list)


def _init_lazy_states(optimizer: Any) -> None:
    """Create the state of every non-fused keyed optimizer that has none yet (a zero-gradient step)."""
    parts = optimizer.optimizers if isinstance(optimizer, CombinedOptimizer) else [("", optimizer)]
    for _, opt in parts:
        if isinstance(opt, KeyedOptimizerWrapper) and not opt.state:
            opt.init_state()
            opt.zero_grad()


def _dcp_load(sd: dict[str, Any], ckpt: Path, group: dist.ProcessGroup | None) -> None:
    """``dcp.load``, with a failure to read the files reported as a CheckpointError naming the folder."""
    try:
        dcp.load(sd, checkpoint_id=ckpt, process_group=group)
    except CheckpointError:
        raise
    except (OSError, EOFError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{ckpt}: cannot load the DCP files ({type(e).__name__}: {first})") from e


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    module: nn.Module,
    prefix: str,
    optimizer: Any,
    identity: Mapping[str, Any],
    restore_rng: bool = True,
    group: dist.ProcessGroup | None = None,
) -> LoadedCheckpoint:
    """Restore model, optimizers, train state, EM labels and (same world size) RNG states.

    Collective. Checks the checkpoint's model identity first
    (:func:`~mptrec.pipeline.checkpoint_files.check_compatible`).

    Args:
        path: checkpoint folder.
        module: the (DMP-wrapped) module holding the backbone under ``prefix``.
        prefix: where the backbone sits in ``module``'s keys.
        optimizer: the ``CombinedOptimizer`` to restore; the lazy states of its non-fused parts
            (Adam, ...) are created first (``init_state``) so that DCP can load into them.
        identity: :func:`~mptrec.pipeline.checkpoint_files.checkpoint_meta` of the current model.
        restore_rng: restore this rank's RNG states when the world size is unchanged.
        group: process group.

    Returns:
        A :class:`LoadedCheckpoint`.
    """
    ckpt = Path(path)
    meta = verify_checkpoint(ckpt)
    check_compatible(ckpt, meta, identity)
    _init_lazy_states(optimizer)
    backbone = backbone_state_dict(module, prefix)
    sd: dict[str, Any] = {"model": backbone, "optim": optimizer.state_dict()}
    _dcp_load(sd, ckpt, group)
    result = module.load_state_dict({prefix + k: v for k, v in sd["model"].items()}, strict=False)
    unexpected = list(getattr(result, "unexpected_keys", []))
    if unexpected:
        raise CheckpointError(f"{ckpt}: keys {unexpected[:5]} do not belong to the model")
    optimizer.load_state_dict(sd["optim"])
    loaded = LoadedCheckpoint(path=ckpt, meta=meta, state=TrainState(**meta["train_state"]))
    if (ckpt / "em_labels.pt").is_file():
        loaded.em_labels = torch.load(ckpt / "em_labels.pt", weights_only=True)
    rng_file = ckpt / f"rng-rank{get_rank(group)}.pt"
    if restore_rng and meta.get("world_size") == get_world_size(group) and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=True))
        loaded.rng_restored = True
    elif restore_rng:
        loaded.notes.append(f"RNG states not restored: checkpoint written by {meta.get('world_size')} "
                            f"process(es), this run has {get_world_size(group)} "
                            "(resharded, not an exact resume)")
    return loaded


def load_backbone(
    run_dir: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str],
    model: nn.Module,
    *,
    prefix: str = "",
    model_name: str | None = None,
    features: Sequence[FeatureSpec] | None = None,
    group: dist.ProcessGroup | None = None,
) -> dict[str, Any]:
    """Load ONLY a stage-1 backbone's weights into ``model`` (which may hold extra modules).

    For the task store / prompt-tuning / evaluation stages. ``model`` may be

    - the backbone itself (``prefix=""``), unsharded (its EBC materialised on CPU/GPU, e.g.
      ``build_ebc(features, device)``) or sharded (a DMP around it, any world size / plan);
    - a module holding the backbone under ``prefix`` (e.g. ``NewTaskModel`` with the
      backbone at ``backbone.``: ``prefix="backbone."``), possibly DMP-wrapped. Its other keys
      (new-task heads) are left untouched: only the checkpoint's backbone keys are requested
      from DCP, which would otherwise fail on the missing ones (pytorch#148252).

    Optimizer states, EM labels and RNG states are not loaded. Collective when ``model`` is
    sharded (call it on every rank).

    Args:
        run_dir: the stage-1 run folder.
        checkpoint: ``"best"``, ``"last"``, ``"step-000123"`` or a checkpoint folder path.
        model: the module to load into.
        prefix: where the backbone's keys sit in ``model.state_dict()`` (with a trailing dot).
        model_name: when given, must equal the checkpoint's model name.
        features: when given, must equal the checkpoint's features (names, sizes, widths).
        group: process group (default: the world, when initialised).

    Returns:
        The checkpoint's ``meta.json`` plus ``"path"`` (str): step, epoch, tasks, features, metric.

    Raises:
        CheckpointError: checkpoint missing, another model, a backbone key absent from ``model``
            or with another shape (the message names the key and both shapes).
    """
    path = resolve_checkpoint(run_dir, checkpoint)
    meta = verify_checkpoint(path)
    target = model.state_dict()
    wanted = {k: target.get(prefix + k) for k in meta["shapes"]}
    current = {"model": model_name if model_name is not None else meta["model"],
               "features": feature_identity(features) if features is not None else meta["features"],
               "tasks": meta["tasks"],
               "shapes": {k: global_shape(v) for k, v in wanted.items() if v is not None}}
    check_compatible(path, meta, current, backbone_only=True)
    sd = {"model": wanted}
    _dcp_load(sd, path, group)
    result = model.load_state_dict({prefix + k: v for k, v in sd["model"].items()}, strict=False)
    unexpected = list(getattr(result, "unexpected_keys", []))
    if unexpected:
        raise CheckpointError(f"{path}: keys {unexpected[:5]} were not accepted by {type(model).__name__}")
    return {**meta, "path": str(path)}
