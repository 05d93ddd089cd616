"""The checkpoint folders of a run, on disk: find, resolve, read ``meta.json``, verify, fall back.

``RUN/checkpoints/step-NNNNNN/`` folders (a complete one has ``meta.json``, written last),
``best`` a relative symlink to one of them; the layout of one folder, and saving and loading its
tensors, are :mod:`mptrec.pipeline.checkpoint`. Nothing here loads a tensor:
:func:`verify_checkpoint` checks that every file ``meta.json`` lists has its recorded size and
that every byte range DCP's ``.metadata`` refers to lies inside an existing file, naming a
missing or truncated file; :func:`latest_complete_checkpoint` is ``--resume``'s fallback past a
damaged last checkpoint. :func:`checkpoint_meta` is the model identity ``meta.json`` records
(model, features, tasks, every backbone key's global shape) and :func:`check_compatible` compares
it with the model being loaded into.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch.distributed.checkpoint as dcp

from mptrec.data_loaders.schema import FeatureSpec

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "check_compatible",
    "check_resume_config",
    "checkpoint_meta",
    "feature_identity",
    "find_checkpoints",
    "global_shape",
    "latest_checkpoint",
    "latest_complete_checkpoint",
    "optimizer_layout",
    "read_meta",
    "resolve_checkpoint",
    "verify_checkpoint",
]

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A missing, incomplete or incompatible checkpoint; the message names the checkpoint."""


def find_checkpoints(run_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Complete checkpoints (``meta.json`` present) of a run, by step."""
    root = Path(run_dir) / "checkpoints"
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and not p.is_symlink() and (p / "meta.json").is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The checkpoint with the highest step, or None."""
    found = find_checkpoints(run_dir)
    return found[-1][1] if found else None


def resolve_checkpoint(run_dir: str | os.PathLike[str], checkpoint: str | os.PathLike[str] = "best") -> Path:
    """``best``, ``last``, a name under ``RUN/checkpoints`` (``step-000123``) or a path -> folder.

    Raises:
        CheckpointError: no such complete checkpoint (the message lists the available ones).
    """
    root = Path(run_dir) / "checkpoints"
    name = str(checkpoint)
    path: Path | None
    if name == "last":
        path = latest_checkpoint(run_dir)
    elif (root / name).exists():
        path = root / name
    else:
        path = Path(name)
    if path is None or not (path / "meta.json").is_file():
        have = [p.name for _, p in find_checkpoints(run_dir)] + (["best"] if (root / "best").exists() else [])
        raise CheckpointError(f"checkpoint {name!r} of run {run_dir} not found or incomplete "
                              f"(no meta.json); available: {have or 'none'}")
    return path


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``meta.json`` of a checkpoint folder."""
    p = Path(path) / "meta.json"
    try:
        meta: dict[str, Any] = json.loads(p.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{p}: missing; {path} is not a complete checkpoint") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p}: not valid JSON: {e}") from e
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{p}: checkpoint format {meta.get('format')!r}, expected {FORMAT_VERSION}")
    return meta


def verify_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check that a checkpoint folder is whole before loading it; return its ``meta.json``.

    Checks every file listed in ``meta.json`` ``files`` (written with its size when the
    checkpoint was saved) is present with that size, and that every byte range DCP's
    ``.metadata`` refers to lies inside an existing file (also for checkpoints written before
    ``files`` was recorded).

    Raises:
        CheckpointError: naming the missing, truncated or unreadable file.
    """
    ckpt = Path(path)
    meta = read_meta(ckpt)
    files = meta.get("files")
    if isinstance(files, dict):
        for rel, size in files.items():
            f = ckpt / rel
            if not f.is_file():
                raise CheckpointError(f"{f}: missing (listed in {ckpt / 'meta.json'}); the checkpoint is "
                                      "incomplete")
            if f.stat().st_size != size:
                raise CheckpointError(f"{f}: {f.stat().st_size} bytes, {ckpt / 'meta.json'} records {size} "
                                      "(truncated or damaged)")
    if not (ckpt / ".metadata").is_file():
        raise CheckpointError(f"{ckpt / '.metadata'}: missing; {ckpt} is not a complete DCP checkpoint")
    try:
        storage = dcp.FileSystemReader(str(ckpt)).read_metadata().storage_data
    except Exception as e:  # noqa: BLE001 - any unpickling error means a damaged file
        raise CheckpointError(f"{ckpt / '.metadata'}: unreadable ({type(e).__name__}: {e})") from e
    sizes: dict[str, int] = {}
    for info in (storage or {}).values():
        rel = getattr(info, "relative_path", None)
        if rel is None:
            continue
        if rel not in sizes:
            f = ckpt / rel
            if not f.is_file():
                raise CheckpointError(f"{f}: missing (a shard file named by {ckpt / '.metadata'})")
            sizes[rel] = f.stat().st_size
        end = int(info.offset) + int(info.length)
        if end > sizes[rel]:
            raise CheckpointError(f"{ckpt / rel}: {sizes[rel]} bytes, but {ckpt / '.metadata'} reads up to "
                                  f"byte {end} (truncated)")
    return meta


def latest_complete_checkpoint(run_dir: str | os.PathLike[str]) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that passes :func:`verify_checkpoint`, and why newer ones were skipped.

    ``--resume`` uses it: a damaged last checkpoint (a truncated or missing file) is skipped,
    named in the returned notes, and the run resumes from the previous complete one.
    """
    notes: list[str] = []
    for _, path in reversed(find_checkpoints(run_dir)):
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            notes.append(f"skipped damaged checkpoint {path.name}: {e}")
            continue
        return path, notes
    return None, notes


# --------------------------------------------------------------------------------------------
# The model identity recorded in meta.json
# --------------------------------------------------------------------------------------------


def global_shape(value: Any) -> list[int]:
    """The whole tensor's shape of a tensor or a ``ShardedTensor`` (not its local shard's)."""
    with warnings.catch_warnings():  # ShardedTensor.size() warns that ShardedTensor is deprecated
        warnings.simplefilter("ignore", FutureWarning)
        size = value.size() if callable(getattr(value, "size", None)) else value.shape
    return [int(s) for s in size]


def feature_identity(features: Sequence[FeatureSpec]) -> list[dict[str, Any]]:
    """The features as ``meta.json`` records them (name, kind, vocabulary size, width)."""
    return [{"name": f.name, "kind": f.kind, "num_embeddings": f.num_embeddings,
             "embedding_dim": f.embedding_dim} for f in features]


def checkpoint_meta(model_name: str, features: Sequence[FeatureSpec], task_names: Sequence[str],
                    backbone: Mapping[str, Any]) -> dict[str, Any]:
    """The identity of a model, as compared on resume and by :func:`load_backbone`."""
    return {
        "model": model_name,
        "features": feature_identity(features),
        "tasks": list(task_names),
        "shapes": {k: global_shape(v) for k, v in backbone.items()},
    }


def _describe(ident: Mapping[str, Any]) -> str:
    feats = [f["name"] for f in ident.get("features", [])]
    return f"model {ident.get('model')!r} with tasks {ident.get('tasks')} and features {feats}"


def check_compatible(path: Path, saved: Mapping[str, Any], current: Mapping[str, Any],
                     *, backbone_only: bool = False) -> None:
    """Raise :class:`CheckpointError` naming both sides when ``saved`` cannot load into ``current``.

    Args:
        path: the checkpoint (for the message).
        saved: ``meta.json`` of the checkpoint.
        current: :func:`checkpoint_meta` of the model being loaded into.
        backbone_only: the current model may hold extra keys (new-task heads); tasks may differ.
    """
    problems = []
    if saved.get("model") != current.get("model"):
        problems.append(f"model {saved.get('model')!r} != {current.get('model')!r}")
    if saved.get("features") != current.get("features"):
        problems.append("features (names, vocabulary sizes or widths) differ")
    if not backbone_only and saved.get("tasks") != current.get("tasks"):
        problems.append(f"tasks {saved.get('tasks')} != {current.get('tasks')}")
    s_shapes, c_shapes = saved.get("shapes", {}), current.get("shapes", {})
    missing = sorted(set(s_shapes) - set(c_shapes))
    extra = sorted(set(c_shapes) - set(s_shapes))
    if missing:
        problems.append(f"keys missing from the model: {missing[:5]}")
    if extra and not backbone_only:
        problems.append(f"keys not in the checkpoint: {extra[:5]}")
    bad = [k for k in set(s_shapes) & set(c_shapes) if list(s_shapes[k]) != list(c_shapes[k])]
    if bad:
        k = sorted(bad)[0]
        problems.append(f"shape of {k!r}: {s_shapes[k]} in the checkpoint, {c_shapes[k]} in the model")
    if problems:
        raise CheckpointError(
            f"checkpoint {path} does not fit: it holds {_describe(saved)}; this run builds "
            f"{_describe(current)}: " + "; ".join(problems)
        )



def optimizer_layout(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of a resolved run config that fix the layout of its optimizer state.

    The embedding optimizer, and which tables are ``data_parallel`` (their state lives in a plain
    optimizer, not in the fused kernels). Other sharding changes are resharding, which a resume
    handles.
    """
    sharding = cfg.get("sharding") or {}
    dp: Any = "every table" if "data_parallel" in (sharding.get("sharding_types") or ()) else sorted(
        c.get("feature") for c in sharding.get("constraints") or ()
        if "data_parallel" in (c.get("sharding_types") or ()))
    return {"train.embedding_optimizer": (cfg.get("train") or {}).get("embedding_optimizer"),
            "data_parallel tables": dp}


def check_resume_config(path: Path, current: Mapping[str, Any]) -> None:
    """Refuse ``--resume`` from checkpoint ``path`` when :func:`optimizer_layout` changed.

    Args:
        path: the checkpoint folder (its ``config.json`` is the config it was trained with; a
            checkpoint without one is not checked).
        current: the resolved config of this run (``strict.to_dict``).

    Raises:
        CheckpointError: naming each changed setting with both values.
    """
    saved_file = path / "config.json"
    if not saved_file.is_file():
        return
    try:
        saved = json.loads(saved_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{saved_file}: unreadable ({err})") from err
    if not saved:
        return
    old, new = optimizer_layout(saved), optimizer_layout(current)
    changed = [f"{k}: {old[k]!r} in the checkpoint, {new[k]!r} now" for k in old if old[k] != new[k]]
    if changed:
        raise CheckpointError(
            f"--resume: checkpoint {path} was trained with other optimizer settings ("
            + "; ".join(changed) + "), so its optimizer state does not fit this run. Start a new "
            "run (another out_dir, or delete this one), or resume with the checkpoint's settings"
        )
