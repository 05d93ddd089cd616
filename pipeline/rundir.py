"""A trained run's folder: read its config, resolve and hash its checkpoints, locate its tasks.

Layout of a run folder (``out_dir`` of the run config)::

    config.json            the resolved stage-1 config (written by ``pretrain``)
    plan.txt, metrics.jsonl, tb/
    checkpoints/step-N/    stage-1 checkpoints (:mod:`mptrec.pipeline.checkpoint`); ``best`` links one
    tasks.json             the task store (:mod:`mptrec.pipeline.tasks.store`)
    tasks/<name>/          a prompt-tuned task: task.toml, task.json, head.pt, meta.json, ...

Every problem with a run folder (no config, no such checkpoint, a changed checkpoint, a bad task
store or task registration) is a :class:`RunDirError` whose message names the run, the task, the
key and the value; the task store and the stage-2 and serving code raise it too.

Example:
    >>> task_dir("runs/aliccp", "scenario").as_posix()
    'runs/aliccp/tasks/scenario'
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from mptrec.pipeline.config import RunConfig
from mptrec.pipeline.strict import ConfigError, from_dict

__all__ = [
    "RunDirError",
    "file_sha256",
    "hash_checkpoint",
    "load_run_config",
    "relative_path",
    "resolve_path",
    "resolve_run_checkpoint",
    "task_dir",
]


class RunDirError(ValueError):
    """A run folder or task problem; the message names the run, task, key and value."""


def task_dir(run_dir: str | os.PathLike[str], name: str) -> Path:
    """Folder of a prompt-tuned task's artefacts: ``RUN/tasks/<name>``."""
    return Path(run_dir) / "tasks" / name


def relative_path(run_dir: Path, path: Path) -> str:
    """``path`` relative to the run folder (POSIX), or absolute when outside it (recorded paths)."""
    try:
        return path.resolve().relative_to(run_dir.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def resolve_path(run_dir: str | os.PathLike[str], rel: str) -> Path:
    """A recorded path: relative ones are relative to the run folder."""
    p = Path(rel)
    return p if p.is_absolute() else Path(run_dir) / p


def load_run_config(run_dir: str | os.PathLike[str]) -> RunConfig:
    """Load the resolved stage-1 config ``RUN/config.json``.

    Raises:
        RunDirError: the run directory or its ``config.json`` is missing or invalid.
    """
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise RunDirError(f"{path}: not found; is {run_dir} a stage-1 run directory?")
    try:
        data = json.loads(path.read_text())
        return from_dict(RunConfig, data, source=str(path))
    except (json.JSONDecodeError, ConfigError) as e:
        raise RunDirError(f"{path}: invalid run config: {e}") from e


def resolve_run_checkpoint(run_dir: str | os.PathLike[str], checkpoint: str) -> Path:
    """Turn ``best``, ``last``, ``step-000123`` or a path into a complete checkpoint folder.

    :func:`mptrec.pipeline.checkpoint_files.resolve_checkpoint` with a :class:`RunDirError`.

    Raises:
        RunDirError: no such complete checkpoint; the message lists the available ones.
    """
    from mptrec.pipeline.checkpoint_files import CheckpointError, resolve_checkpoint

    try:
        return resolve_checkpoint(run_dir, checkpoint)
    except CheckpointError as e:
        raise RunDirError(str(e)) from e


def hash_checkpoint(ckpt_dir: str | os.PathLike[str]) -> str:
    """SHA-256 of a checkpoint folder's content: every file in sorted relative-path order.

    Each file contributes its relative path, its size and its bytes, so a renamed, added,
    removed or modified file changes the hash. Symbolic links to the folder are followed.

    Args:
        ckpt_dir: a checkpoint folder (DCP files and ``meta.json``).

    Returns:
        The hex digest.

    Raises:
        RunDirError: the folder does not exist or holds no file.
    """
    root = Path(ckpt_dir).resolve()
    if not root.is_dir():
        raise RunDirError(f"checkpoint folder {ckpt_dir} does not exist")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    if not files:
        raise RunDirError(f"checkpoint folder {ckpt_dir} holds no file")
    h = hashlib.sha256()
    for f in files:
        rel = f.relative_to(root).as_posix().encode()
        h.update(rel + b"\0" + str(f.stat().st_size).encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of one file's bytes."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
