"""The task store of a trained run: ``RUN/tasks.json`` (``mptrec tasks list`` / ``register``).

The store records which tasks a stage-1 model predicts and which new tasks were added to it
by prompt tuning (stage 2), each with its label, method, base checkpoint (path and content
hash), artefact, metrics and efficiency figures. Shape (``version`` 1)::

    {"version": 1,
     "base": {"run", "model", "checkpoint", "checkpoint_sha256", "created"},
     "tasks": {NAME: {"name", "label": {"column", "positive_values"},
                      "role": "pretrained" | "prompt_tuned", "method", "description",
                      "base_checkpoint", "base_checkpoint_sha256", "artifact", "config",
                      "created", "status": "registered" | "trained",
                      "metrics": {...}, "efficiency": {...}, "artifact_sha256"}}}

Paths in the store are relative to the run directory (so a run directory can be moved).
Every write is atomic (temporary file, then ``os.replace``) and happens under an exclusive
lock on ``RUN/.tasks.lock``; a failed registration leaves ``tasks.json`` byte-identical. The
store is created lazily from ``RUN/config.json``: the stage-1 tasks are recorded with role
``pretrained``. A new task is checked against the run by :mod:`mptrec.pipeline.tasks.checks`
before it is recorded; every problem is a :class:`~mptrec.pipeline.rundir.RunDirError`.
(Not to be confused with the model registry ``mptrec.models.MODELS``.)

Example:
    >>> entry = register_task("runs/aliccp", "configs/tasks/aliccp_scenario.toml")
    >>> load_task_store("runs/aliccp")["tasks"]["scenario"]["status"]
    'registered'
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from mptrec.io import atomic_write, atomic_write_json
from mptrec.pipeline.config import NewTaskSpec, RunConfig, TaskSpec, load_task_config
from mptrec.pipeline.rundir import (
    RunDirError,
    file_sha256,
    hash_checkpoint,
    load_run_config,
    relative_path,
    resolve_path,
    resolve_run_checkpoint,
    task_dir,
)
from mptrec.pipeline.strict import ConfigError, apply_overrides, from_dict, to_dict
from mptrec.pipeline.tasks.checks import validate_new_task

__all__ = [
    "TASK_STORE_FILE",
    "check_artifact",
    "format_table",
    "load_task_spec",
    "load_task_store",
    "prompt_config",
    "record_result",
    "register_task",
    "trained_prompt_tasks",
    "write_json_atomic",
]

TASK_STORE_FILE = "tasks.json"
TASK_STORE_VERSION = 1


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically (:func:`mptrec.io.atomic_write_json`).

    The store's writes go through this name so that tests can interrupt them.

    Args:
        path: destination file; its folder is created if needed.
        data: a JSON-serialisable object.
    """
    atomic_write_json(path, data)


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the run's store for a read-modify-write."""
    lock = run_dir / ".tasks.lock"
    with lock.open("a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------
# Reading and creating
# --------------------------------------------------------------------------------------------


def _pretrained_entry(task: TaskSpec, cfg: RunConfig, ckpt: str, sha: str, created: str,
                      metric: Mapping[str, Any]) -> dict[str, Any]:
    auc = metric.get("auc", {}) if isinstance(metric.get("auc"), dict) else {}
    metrics = {"valid_auc": auc[task.name], "epoch": metric.get("epoch")} if task.name in auc else {}
    return {
        "name": task.name,
        "label": {"column": task.label, "positive_values": list(task.positive_values)},
        "role": "pretrained",
        "method": cfg.model.name,
        "description": "stage-1 task",
        "base_checkpoint": ckpt,
        "base_checkpoint_sha256": sha,
        "artifact": ckpt,
        "config": "config.json",
        "created": created,
        "status": "trained",
        "metrics": metrics,
        "efficiency": {},
    }


def _new_store(run_dir: Path, checkpoint: str) -> dict[str, Any]:
    cfg = load_run_config(run_dir)
    ckpt = resolve_run_checkpoint(run_dir, checkpoint)
    sha = hash_checkpoint(ckpt)
    created = _now()
    rel = relative_path(run_dir, ckpt)
    try:
        metric = json.loads((ckpt / "meta.json").read_text()).get("metric") or {}
    except (OSError, json.JSONDecodeError, AttributeError):
        metric = {}
    metric = metric if isinstance(metric, dict) else {}
    return {
        "version": TASK_STORE_VERSION,
        "base": {"run": cfg.name, "model": cfg.model.name, "checkpoint": rel,
                 "checkpoint_sha256": sha, "created": created},
        "tasks": {t.name: _pretrained_entry(t, cfg, rel, sha, created, metric) for t in cfg.tasks},
    }


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunDirError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, dict) or data.get("version") != TASK_STORE_VERSION:
        raise RunDirError(f"{path}: not a version-{TASK_STORE_VERSION} task registry")
    for key in ("base", "tasks"):
        if not isinstance(data.get(key), dict):
            raise RunDirError(f"{path}: key {key!r} missing or not an object")
    return data


def load_task_store(run_dir: str | os.PathLike[str], *, checkpoint: str = "best") -> dict[str, Any]:
    """Read ``RUN/tasks.json``, or build (without writing) the initial store from the run.

    Args:
        run_dir: the stage-1 run directory.
        checkpoint: base checkpoint recorded when the store does not exist yet.

    Returns:
        The store as a JSON object.

    Raises:
        RunDirError: the file is invalid, or the run has no config or checkpoint.
    """
    path = Path(run_dir) / TASK_STORE_FILE
    if path.is_file():
        return _read(path)
    return _new_store(Path(run_dir), checkpoint)


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------


def register_task(run_dir: str | os.PathLike[str], task_config: str | os.PathLike[str],
                  overrides: Sequence[str] = (), *, checkpoint: str = "best") -> dict[str, Any]:
    """Validate a new-task config against a run and record it (status ``registered``).

    Copies the TOML to ``RUN/tasks/<name>/task.toml`` and writes the resolved config to
    ``RUN/tasks/<name>/task.json``; then rewrites ``RUN/tasks.json`` atomically. Any failure
    leaves the store as it was.

    Args:
        run_dir: the stage-1 run directory.
        task_config: ``configs/tasks/<name>.toml``.
        overrides: ``key=value`` overrides of the task config.
        checkpoint: base checkpoint to record if the store does not exist yet.

    Returns:
        The new task's entry.

    Raises:
        RunDirError: any validation failure (the message names the file and the problem).
    """
    run = Path(run_dir)
    try:
        cfg = load_task_config(task_config, overrides)
    except ConfigError as e:
        raise RunDirError(str(e)) from e
    with _locked(run) if run.is_dir() else contextlib.nullcontext():
        store = load_task_store(run, checkpoint=checkpoint)
        validate_new_task(run, cfg, store, source=str(task_config))
        out = task_dir(run, cfg.name)
        existed = out.exists()
        try:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write(out / "task.toml", lambda tmp: shutil.copyfile(task_config, tmp))
            write_json_atomic(out / "task.json", to_dict(cfg))
            entry = {
                "name": cfg.name,
                "label": {"column": cfg.label, "positive_values": list(cfg.positive_values)},
                "role": "prompt_tuned",
                "method": cfg.method,
                "description": cfg.description,
                "base_checkpoint": store["base"]["checkpoint"],
                "base_checkpoint_sha256": store["base"]["checkpoint_sha256"],
                "artifact": relative_path(run, out / "head.pt"),
                "config": relative_path(run, out / "task.json"),
                "created": _now(),
                "status": "registered",
                "metrics": {},
                "efficiency": {},
            }
            new = json.loads(json.dumps(store))
            new["tasks"][cfg.name] = entry
            write_json_atomic(run / TASK_STORE_FILE, new)
        except BaseException:
            if not existed:
                shutil.rmtree(out, ignore_errors=True)
            raise
    return entry


# --------------------------------------------------------------------------------------------
# Reading back and updating after training
# --------------------------------------------------------------------------------------------


def prompt_config(run_dir: str | os.PathLike[str], name: str,
                  overrides: Sequence[str] = ()) -> tuple[NewTaskSpec, dict[str, Any]]:
    """The registered config of a new task (with ``key=value`` overrides) and its entry.

    Raises:
        RunDirError: no store, unknown task, or a pretrained task.
    """
    path = Path(run_dir) / TASK_STORE_FILE
    if not path.is_file():
        raise RunDirError(f"{path}: no task registry; run `mptrec tasks register` first")
    store = _read(path)
    if name not in store["tasks"]:
        raise RunDirError(f"task {name!r} is not registered in {path} (tasks: {sorted(store['tasks'])})")
    entry = store["tasks"][name]
    if entry["role"] != "prompt_tuned":
        raise RunDirError(f"task {name!r} of {path} is a {entry['role']} task, not a new task")
    return load_task_spec(run_dir, entry, overrides), entry


def load_task_spec(run_dir: str | os.PathLike[str], entry: Mapping[str, Any],
                   overrides: Sequence[str] = ()) -> NewTaskSpec:
    """A registered new task's spec (its ``task.json``), with ``key=value`` overrides.

    Raises:
        RunDirError: the file does not hold a valid spec (named with the key and value).
    """
    cfg_path = resolve_path(run_dir, entry["config"])
    data = apply_overrides(json.loads(cfg_path.read_text()), overrides, str(cfg_path))
    try:
        return from_dict(NewTaskSpec, data, source=str(cfg_path))
    except ConfigError as e:
        raise RunDirError(str(e)) from e


def record_result(run_dir: str | os.PathLike[str], name: str, *, status: str = "trained",
                  metrics: Mapping[str, Any] | None = None,
                  efficiency: Mapping[str, Any] | None = None,
                  artifact_sha256: str | None = None) -> dict[str, Any]:
    """Update a task's status, metrics and efficiency in the store (atomically, locked).

    ``artifact_sha256`` (the SHA-256 of the head file written just before) ties the entry to
    those exact bytes: a prompt-tune re-run that crashes after replacing ``head.pt`` but before
    this update leaves an entry whose recorded hash no longer matches, which
    :func:`check_artifact` reports.

    Returns:
        The updated entry.
    """
    run = Path(run_dir)
    with _locked(run):
        store = _read(run / TASK_STORE_FILE)
        if name not in store["tasks"]:
            raise RunDirError(f"task {name!r} is not registered in {run / TASK_STORE_FILE}")
        entry = store["tasks"][name]
        entry["status"] = status
        if metrics is not None:
            entry["metrics"] = dict(metrics)
        if efficiency is not None:
            entry["efficiency"] = dict(efficiency)
        if artifact_sha256 is not None:
            entry["artifact_sha256"] = artifact_sha256
        entry["updated"] = _now()
        write_json_atomic(run / TASK_STORE_FILE, store)
    return entry


def check_artifact(run_dir: str | os.PathLike[str], entry: Mapping[str, Any]) -> Path:
    """A trained task's head file, checked against the hash recorded with its result.

    Raises:
        RunDirError: the file is missing, or its bytes are not those the store's metrics
            describe (a prompt-tune run died between writing the head and updating the store).
    """
    path = resolve_path(run_dir, str(entry["artifact"]))
    if not path.is_file():
        raise RunDirError(f"task {entry['name']!r}: artifact {path} is missing")
    recorded = entry.get("artifact_sha256")
    if recorded and file_sha256(path) != recorded:
        raise RunDirError(
            f"task {entry['name']!r}: artifact {path} is not the one registered (sha256 "
            f"{file_sha256(path)[:12]}... != recorded {str(recorded)[:12]}...); re-run mptrec prompt-tune"
        )
    return path


def trained_prompt_tasks(store: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The store's prompt-tuned tasks with status ``trained``, in registration order."""
    return [e for e in store["tasks"].values()
            if e["role"] == "prompt_tuned" and e["status"] == "trained"]


def _fmt_auc(entry: Mapping[str, Any]) -> str:
    m = entry.get("metrics", {})
    for key in ("test_auc", "valid_auc"):
        if isinstance(m.get(key), int | float):
            return f"{m[key]:.4f} ({key.split('_')[0]})"
    return "-"


def format_table(store: Mapping[str, Any]) -> str:
    """The store as a fixed-width text table (name, role, method, status, AUC, params, artefact)."""
    header = ("name", "role", "method", "status", "AUC", "trainable params", "artifact")
    rows = [header]
    for e in store["tasks"].values():
        eff = e.get("efficiency", {})
        params = eff.get("trainable_params")
        frac = eff.get("trainable_fraction")
        ptxt = "-" if params is None else f"{params:,}" + (f" ({100 * frac:.3f}%)" if frac else "")
        rows.append((e["name"], e["role"], e["method"], e["status"], _fmt_auc(e), ptxt, e["artifact"]))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    base = store["base"]
    title = (f"run {base['run']}  model {base['model']}  base checkpoint {base['checkpoint']} "
             f"(sha256 {base['checkpoint_sha256'][:12]})")
    return title + "\n" + "\n".join(lines)
