"""The task registry of a trained run: ``RUN/tasks.json``.

The registry records which tasks a stage-1 model predicts and which new tasks were added to it
by prompt tuning (stage 2), each with its label, method, base checkpoint (path and content
hash), artefact, metrics and efficiency figures. Shape (``version`` 1)::

    {"version": 1,
     "base": {"run", "model", "checkpoint", "checkpoint_sha256", "created"},
     "tasks": {NAME: {"name", "label": {"column", "positive_values"},
                      "role": "pretrained" | "prompt_tuned", "method", "description",
                      "base_checkpoint", "base_checkpoint_sha256", "artifact", "config",
                      "created", "status": "registered" | "trained",
                      "metrics": {...}, "efficiency": {...}, "artifact_sha256"}}}

Paths in the registry are relative to the run directory (so a run directory can be moved).
Every write is atomic (temporary file, then ``os.replace``) and happens under an exclusive
lock on ``RUN/.tasks.lock``; a failed registration leaves ``tasks.json`` byte-identical. The
registry is created lazily from ``RUN/config.json``: the stage-1 tasks are recorded with role
``pretrained``.

Example:
    >>> entry = register_task("runs/aliccp", "configs/tasks/aliccp_scenario.toml")
    >>> load_registry("runs/aliccp")["tasks"]["scenario"]["status"]
    'registered'
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from mptrec.io import atomic_write, atomic_write_json
from mptrec.pipeline.config import (
    ConfigError,
    PromptTuneConfig,
    RunConfig,
    TaskSpec,
    apply_overrides,
    from_dict,
    load_task_config,
    to_dict,
)

__all__ = [
    "REGISTRY_FILE",
    "RegistryError",
    "check_artifact",
    "check_base_unchanged",
    "compatible_methods",
    "file_sha256",
    "format_table",
    "hash_checkpoint",
    "load_registry",
    "load_run_config",
    "prompt_config",
    "record_result",
    "register_task",
    "resolve_checkpoint",
    "task_dir",
    "trained_prompt_tasks",
    "validate_new_task",
    "write_json_atomic",
]

REGISTRY_FILE = "tasks.json"
REGISTRY_VERSION = 1
_METHOD_BASE = {
    "mptrec": "mptrec",
    "fw": "mptrec",
    "mptrec_res": "mptrec",
    "tes": "mptrec",
    "shared_bottom*": "shared_bottom",
    "mmoe*": "mmoe",
    "ple*": "ple",
    "single_task": "single_task",
}


class RegistryError(ValueError):
    """A registration or registry problem; the message names the run, task, key and value."""


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically (:func:`mptrec.io.atomic_write_json`).

    The registry's writes go through this name so that tests can interrupt them.

    Args:
        path: destination file; its folder is created if needed.
        data: a JSON-serialisable object.
    """
    atomic_write_json(path, data)


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the run's registry for a read-modify-write."""
    lock = run_dir / ".tasks.lock"
    with lock.open("a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def task_dir(run_dir: str | os.PathLike[str], name: str) -> Path:
    """Folder of a prompt-tuned task's artefacts: ``RUN/tasks/<name>``."""
    return Path(run_dir) / "tasks" / name


def compatible_methods(model_name: str) -> list[str]:
    """New-task methods that fit a base model of registered name ``model_name``."""
    return [m for m, base in _METHOD_BASE.items() if base == model_name]


# --------------------------------------------------------------------------------------------
# Run config and checkpoints
# --------------------------------------------------------------------------------------------


def load_run_config(run_dir: str | os.PathLike[str]) -> RunConfig:
    """Load the resolved stage-1 config ``RUN/config.json``.

    Raises:
        RegistryError: the run directory or its ``config.json`` is missing or invalid.
    """
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise RegistryError(f"{path}: not found; is {run_dir} a stage-1 run directory?")
    try:
        data = json.loads(path.read_text())
        return from_dict(RunConfig, data, source=str(path))
    except (json.JSONDecodeError, ConfigError) as e:
        raise RegistryError(f"{path}: invalid run config: {e}") from e


def resolve_checkpoint(run_dir: str | os.PathLike[str], checkpoint: str) -> Path:
    """Turn ``best``, ``last``, ``step-000123`` or a path into a complete checkpoint folder.

    Raises:
        RegistryError: no such complete checkpoint; the message lists the available ones.
    """
    from mptrec.pipeline.checkpoint import CheckpointError
    from mptrec.pipeline.checkpoint import resolve_checkpoint as _resolve

    try:
        return _resolve(run_dir, checkpoint)
    except CheckpointError as e:
        raise RegistryError(str(e)) from e


def hash_checkpoint(ckpt_dir: str | os.PathLike[str]) -> str:
    """SHA-256 of a checkpoint folder's content: every file in sorted relative-path order.

    Each file contributes its relative path, its size and its bytes, so a renamed, added,
    removed or modified file changes the hash. Symbolic links to the folder are followed.

    Args:
        ckpt_dir: a checkpoint folder (DCP files and ``meta.json``).

    Returns:
        The hex digest.

    Raises:
        RegistryError: the folder does not exist or holds no file.
    """
    root = Path(ckpt_dir).resolve()
    if not root.is_dir():
        raise RegistryError(f"checkpoint folder {ckpt_dir} does not exist")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    if not files:
        raise RegistryError(f"checkpoint folder {ckpt_dir} holds no file")
    h = hashlib.sha256()
    for f in files:
        rel = f.relative_to(root).as_posix().encode()
        h.update(rel + b"\0" + str(f.stat().st_size).encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _rel(run_dir: Path, path: Path) -> str:
    try:
        return path.resolve().relative_to(run_dir.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def _abs(run_dir: str | os.PathLike[str], rel: str) -> Path:
    p = Path(rel)
    return p if p.is_absolute() else Path(run_dir) / p


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


def _new_registry(run_dir: Path, checkpoint: str) -> dict[str, Any]:
    cfg = load_run_config(run_dir)
    ckpt = resolve_checkpoint(run_dir, checkpoint)
    sha = hash_checkpoint(ckpt)
    created = _now()
    rel = _rel(run_dir, ckpt)
    try:
        metric = json.loads((ckpt / "meta.json").read_text()).get("metric") or {}
    except (OSError, json.JSONDecodeError, AttributeError):
        metric = {}
    metric = metric if isinstance(metric, dict) else {}
    return {
        "version": REGISTRY_VERSION,
        "base": {"run": cfg.name, "model": cfg.model.name, "checkpoint": rel,
                 "checkpoint_sha256": sha, "created": created},
        "tasks": {t.name: _pretrained_entry(t, cfg, rel, sha, created, metric) for t in cfg.tasks},
    }


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RegistryError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, dict) or data.get("version") != REGISTRY_VERSION:
        raise RegistryError(f"{path}: not a version-{REGISTRY_VERSION} task registry")
    for key in ("base", "tasks"):
        if not isinstance(data.get(key), dict):
            raise RegistryError(f"{path}: key {key!r} missing or not an object")
    return data


def load_registry(run_dir: str | os.PathLike[str], *, checkpoint: str = "best") -> dict[str, Any]:
    """Read ``RUN/tasks.json``, or build (without writing) the initial registry from the run.

    Args:
        run_dir: the stage-1 run directory.
        checkpoint: base checkpoint recorded when the registry does not exist yet.

    Returns:
        The registry as a JSON object.

    Raises:
        RegistryError: the file is invalid, or the run has no config or checkpoint.
    """
    path = Path(run_dir) / REGISTRY_FILE
    if path.is_file():
        return _read(path)
    return _new_registry(Path(run_dir), checkpoint)


# --------------------------------------------------------------------------------------------
# Validation and registration
# --------------------------------------------------------------------------------------------


def _check_label(cfg: PromptTuneConfig, schema: Mapping[str, Any], where: str) -> None:
    labels = schema.get("labels", {})
    if cfg.label not in labels:
        raise RegistryError(
            f"{where}: label column {cfg.label!r} is not a label column of the run's data "
            f"(schema.json labels: {sorted(labels)})"
        )
    values = labels[cfg.label].get("values") if isinstance(labels[cfg.label], Mapping) else None
    if values:
        bad = [v for v in cfg.positive_values if v not in values]
        if bad:
            raise RegistryError(
                f"{where}: positive_values {bad} never occur in label column {cfg.label!r} "
                f"(values: {values})"
            )
        if not cfg.positive_values and not set(values) <= {0, 1}:
            raise RegistryError(
                f"{where}: label column {cfg.label!r} holds values {values}; set positive_values"
            )


def _check_features(cfg: PromptTuneConfig, run_cfg: RunConfig, schema: Mapping[str, Any],
                    where: str) -> None:
    from mptrec.pipeline.build import resolve_run_features

    declared = {f["name"] for f in schema.get("features", [])}
    unknown = [f for f in cfg.exclude_features if f not in declared]
    if unknown:
        raise RegistryError(f"{where}: exclude_features {unknown} are not features of the run's data")
    try:
        inputs = resolve_run_features(run_cfg, schema)
    except ConfigError as e:
        raise RegistryError(f"{where}: {e}") from e
    used = {f.name for f in inputs} | {f.column for f in inputs}
    leaked = [f for f in cfg.exclude_features if f in used]
    if leaked:
        raise RegistryError(
            f"{where}: exclude_features {leaked} are inputs of the base model of run "
            f"{run_cfg.name!r}; prompt tuning cannot remove an input, pre-train without them"
        )
    if cfg.label in used:
        raise RegistryError(
            f"{where}: label column {cfg.label!r} is an input feature of the base model "
            f"(the new task would see its own label); pre-train without it"
        )


def validate_new_task(run_dir: str | os.PathLike[str], cfg: PromptTuneConfig,
                      registry: Mapping[str, Any], *, source: str = "task config") -> None:
    """Check that a new task fits the run; raise a :class:`RegistryError` naming the problem.

    Checks: the name is free, the method fits the base model, the label column exists in the
    data's ``schema.json`` (and its positive values occur), the excluded features exist and are
    not inputs of the base model, the label is not an input, and the base checkpoint still has
    the hash recorded in the registry.
    """
    from mptrec.data_loaders.layout import read_schema

    run_cfg = load_run_config(run_dir)
    where = f"{source} (task {cfg.name!r})"
    if cfg.name in registry["tasks"]:
        role = registry["tasks"][cfg.name]["role"]
        raise RegistryError(f"{where}: name {cfg.name!r} is taken by a {role} task of run {run_dir}")
    base_model = run_cfg.model.name
    if _METHOD_BASE.get(cfg.method) != base_model:
        raise RegistryError(
            f"{where}: method {cfg.method!r} does not fit base model {base_model!r} "
            f"(methods for it: {compatible_methods(base_model) or 'none'})"
        )
    try:
        schema = read_schema(run_cfg.data.path)
    except (OSError, ValueError) as e:
        raise RegistryError(f"{where}: cannot read the run's data schema: {e}") from e
    _check_label(cfg, schema, where)
    _check_features(cfg, run_cfg, schema, where)
    check_base_unchanged(run_dir, registry)


def check_base_unchanged(run_dir: str | os.PathLike[str], registry: Mapping[str, Any],
                         task: str | None = None) -> Path:
    """Verify the base checkpoint exists and still has its recorded hash.

    Args:
        run_dir: the run directory.
        registry: the registry.
        task: check the task's recorded ``base_checkpoint``/hash instead of the registry's base.

    Returns:
        The checkpoint folder.

    Raises:
        RegistryError: missing checkpoint or changed content.
    """
    rec = registry["tasks"][task] if task else registry["base"]
    key_path, key_sha = ("base_checkpoint", "base_checkpoint_sha256") if task else (
        "checkpoint", "checkpoint_sha256")
    ckpt = _abs(run_dir, rec[key_path])
    if not ckpt.is_dir():
        raise RegistryError(f"base checkpoint {ckpt} of run {run_dir} no longer exists")
    sha = hash_checkpoint(ckpt)
    if sha != rec[key_sha]:
        raise RegistryError(
            f"base checkpoint {ckpt} changed since registration (sha256 {sha[:12]}... != recorded "
            f"{rec[key_sha][:12]}...); re-register the task against the new checkpoint"
        )
    return ckpt


def register_task(run_dir: str | os.PathLike[str], task_config: str | os.PathLike[str],
                  overrides: Sequence[str] = (), *, checkpoint: str = "best") -> dict[str, Any]:
    """Validate a new-task config against a run and record it (status ``registered``).

    Copies the TOML to ``RUN/tasks/<name>/task.toml`` and writes the resolved config to
    ``RUN/tasks/<name>/task.json``; then rewrites ``RUN/tasks.json`` atomically. Any failure
    leaves the registry as it was.

    Args:
        run_dir: the stage-1 run directory.
        task_config: ``configs/tasks/<name>.toml``.
        overrides: ``key=value`` overrides of the task config.
        checkpoint: base checkpoint to record if the registry does not exist yet.

    Returns:
        The new registry entry.

    Raises:
        RegistryError: any validation failure (the message names the file and the problem).
    """
    run = Path(run_dir)
    try:
        cfg = load_task_config(task_config, overrides)
    except ConfigError as e:
        raise RegistryError(str(e)) from e
    with _locked(run) if run.is_dir() else contextlib.nullcontext():
        registry = load_registry(run, checkpoint=checkpoint)
        validate_new_task(run, cfg, registry, source=str(task_config))
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
                "base_checkpoint": registry["base"]["checkpoint"],
                "base_checkpoint_sha256": registry["base"]["checkpoint_sha256"],
                "artifact": _rel(run, out / "head.pt"),
                "config": _rel(run, out / "task.json"),
                "created": _now(),
                "status": "registered",
                "metrics": {},
                "efficiency": {},
            }
            new = json.loads(json.dumps(registry))
            new["tasks"][cfg.name] = entry
            write_json_atomic(run / REGISTRY_FILE, new)
        except BaseException:
            if not existed:
                shutil.rmtree(out, ignore_errors=True)
            raise
    return entry


# --------------------------------------------------------------------------------------------
# Reading back and updating after training
# --------------------------------------------------------------------------------------------


def prompt_config(run_dir: str | os.PathLike[str], name: str,
                  overrides: Sequence[str] = ()) -> tuple[PromptTuneConfig, dict[str, Any]]:
    """The registered config of a new task (with ``key=value`` overrides) and its entry.

    Raises:
        RegistryError: no registry, unknown task, or a pretrained task.
    """
    path = Path(run_dir) / REGISTRY_FILE
    if not path.is_file():
        raise RegistryError(f"{path}: no task registry; run `mptrec tasks register` first")
    registry = _read(path)
    if name not in registry["tasks"]:
        raise RegistryError(f"task {name!r} is not registered in {path} (tasks: {sorted(registry['tasks'])})")
    entry = registry["tasks"][name]
    if entry["role"] != "prompt_tuned":
        raise RegistryError(f"task {name!r} of {path} is a {entry['role']} task, not a new task")
    cfg_path = _abs(run_dir, entry["config"])
    data = apply_overrides(json.loads(cfg_path.read_text()), overrides, str(cfg_path))
    try:
        return from_dict(PromptTuneConfig, data, source=str(cfg_path)), entry
    except ConfigError as e:
        raise RegistryError(str(e)) from e


def record_result(run_dir: str | os.PathLike[str], name: str, *, status: str = "trained",
                  metrics: Mapping[str, Any] | None = None,
                  efficiency: Mapping[str, Any] | None = None,
                  artifact_sha256: str | None = None) -> dict[str, Any]:
    """Update a task's status, metrics and efficiency in the registry (atomically, locked).

    ``artifact_sha256`` (the SHA-256 of the head file written just before) ties the entry to
    those exact bytes: a prompt-tune re-run that crashes after replacing ``head.pt`` but before
    this update leaves an entry whose recorded hash no longer matches, which
    :func:`check_artifact` reports.

    Returns:
        The updated entry.
    """
    run = Path(run_dir)
    with _locked(run):
        registry = _read(run / REGISTRY_FILE)
        if name not in registry["tasks"]:
            raise RegistryError(f"task {name!r} is not registered in {run / REGISTRY_FILE}")
        entry = registry["tasks"][name]
        entry["status"] = status
        if metrics is not None:
            entry["metrics"] = dict(metrics)
        if efficiency is not None:
            entry["efficiency"] = dict(efficiency)
        if artifact_sha256 is not None:
            entry["artifact_sha256"] = artifact_sha256
        entry["updated"] = _now()
        write_json_atomic(run / REGISTRY_FILE, registry)
    return entry


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of one file's bytes."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_artifact(run_dir: str | os.PathLike[str], entry: Mapping[str, Any]) -> Path:
    """A trained task's head file, checked against the hash recorded with its result.

    Raises:
        RegistryError: the file is missing, or its bytes are not those the registry's metrics
            describe (a prompt-tune run died between writing the head and updating the registry).
    """
    path = _abs(run_dir, str(entry["artifact"]))
    if not path.is_file():
        raise RegistryError(f"task {entry['name']!r}: artifact {path} is missing")
    recorded = entry.get("artifact_sha256")
    if recorded and file_sha256(path) != recorded:
        raise RegistryError(
            f"task {entry['name']!r}: artifact {path} is not the one registered (sha256 "
            f"{file_sha256(path)[:12]}... != recorded {str(recorded)[:12]}...); re-run mptrec prompt-tune"
        )
    return path


def trained_prompt_tasks(registry: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The registry's prompt-tuned tasks with status ``trained``, in registration order."""
    return [e for e in registry["tasks"].values()
            if e["role"] == "prompt_tuned" and e["status"] == "trained"]


def _fmt_auc(entry: Mapping[str, Any]) -> str:
    m = entry.get("metrics", {})
    for key in ("test_auc", "valid_auc"):
        if isinstance(m.get(key), int | float):
            return f"{m[key]:.4f} ({key.split('_')[0]})"
    return "-"


def format_table(registry: Mapping[str, Any]) -> str:
    """The registry as a fixed-width text table (name, role, method, status, AUC, params, artefact)."""
    header = ("name", "role", "method", "status", "AUC", "trainable params", "artifact")
    rows = [header]
    for e in registry["tasks"].values():
        eff = e.get("efficiency", {})
        params = eff.get("trainable_params")
        frac = eff.get("trainable_fraction")
        ptxt = "-" if params is None else f"{params:,}" + (f" ({100 * frac:.3f}%)" if frac else "")
        rows.append((e["name"], e["role"], e["method"], e["status"], _fmt_auc(e), ptxt, e["artifact"]))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    base = registry["base"]
    title = (f"run {base['run']}  model {base['model']}  base checkpoint {base['checkpoint']} "
             f"(sha256 {base['checkpoint_sha256'][:12]})")
    return title + "\n" + "\n".join(lines)
