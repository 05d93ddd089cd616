"""Checks of a new task against its run, before it is registered and before it is trained.

:func:`validate_new_task` (``mptrec tasks register``): the name is free, the method fits the base
model, the label column exists in the data's ``schema.json`` (and its positive values occur),
the excluded features exist and are not inputs of the base model, the label is not an input,
and the base checkpoint still has the hash recorded in the task store.
:func:`check_base_unchanged` (also before prompt tuning): the base checkpoint exists and still
has its recorded content hash. Every failure is a :class:`~mptrec.pipeline.rundir.RunDirError`
naming the task config, the task, the key and the value.

Which methods fit which base model is declared on the model classes (``new_task_methods``) and
read through :func:`mptrec.models.registry.new_task_methods`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mptrec.models.registry import id_reading_methods, new_task_methods
from mptrec.pipeline.build import check_label, resolve_run_features
from mptrec.pipeline.config import NewTaskSpec, RunConfig
from mptrec.pipeline.rundir import RunDirError, hash_checkpoint, load_run_config, resolve_path
from mptrec.pipeline.strict import ConfigError

__all__ = [
    "check_base_unchanged",
    "validate_new_task",
]


def _check_features(cfg: NewTaskSpec, run_cfg: RunConfig, schema: Mapping[str, Any],
                    where: str) -> None:
    declared = {f["name"] for f in schema.get("features", [])}
    unknown = [f for f in cfg.exclude_features if f not in declared]
    if unknown:
        raise RunDirError(f"{where}: exclude_features {unknown} are not features of the run's data")
    try:
        inputs = resolve_run_features(run_cfg, schema)
    except ConfigError as e:
        raise RunDirError(f"{where}: {e}") from e
    used = {f.name for f in inputs} | {f.column for f in inputs}
    leaked = [f for f in cfg.exclude_features if f in used]
    if leaked:
        raise RunDirError(
            f"{where}: exclude_features {leaked} are inputs of the base model of run "
            f"{run_cfg.name!r}; prompt tuning cannot remove an input, pre-train without them"
        )
    if cfg.method in id_reading_methods(run_cfg.model.name):
        single = {f.name: f.num_embeddings for f in inputs if f.single_valued}
        if not single:
            lists = [f.name for f in inputs if f.kind == "sparse"]
            raise RunDirError(
                f"{where}: method {cfg.method!r} gives the new task its own offsets of the embedding "
                f"of each single-valued sparse input's id, and the base model has none (sparse "
                f"inputs: {lists}, all list features; use mptrec_res)"
            )
        if cfg.offset_max_rows and min(single.values()) > cfg.offset_max_rows:
            raise RunDirError(
                f"{where}: offset_max_rows = {cfg.offset_max_rows} leaves no table to offset (rows of "
                f"the single-valued inputs: {single}); raise it, or 0 for all of them"
            )
    elif cfg.offset_max_rows:
        raise RunDirError(
            f"{where}: offset_max_rows = {cfg.offset_max_rows} applies to the methods with per-id "
            f"offsets {list(id_reading_methods(run_cfg.model.name))}, not {cfg.method!r}"
        )
    if cfg.label in used:
        raise RunDirError(
            f"{where}: label column {cfg.label!r} is an input feature of the base model "
            f"(the new task would see its own label); pre-train without it"
        )


def validate_new_task(run_dir: str | os.PathLike[str], cfg: NewTaskSpec,
                      store: Mapping[str, Any], *, source: str = "task config") -> None:
    """Check that a new task fits the run; raise a :class:`RunDirError` naming the problem.

    Checks: the name is free, the method fits the base model, the label column exists in the
    data's ``schema.json`` (and its positive values occur), the excluded features exist and are
    not inputs of the base model, the label is not an input, and the base checkpoint still has
    the hash recorded in the task store.

    Args:
        run_dir: the stage-1 run directory.
        cfg: the new task's config.
        store: the run's task store (:func:`mptrec.pipeline.tasks.store.load_task_store`).
        source: the task config's file, for the messages.
    """
    from mptrec.data_loaders.layout import read_schema

    run_cfg = load_run_config(run_dir)
    where = f"{source} (task {cfg.name!r})"
    if cfg.name in store["tasks"]:
        role = store["tasks"][cfg.name]["role"]
        raise RunDirError(f"{where}: name {cfg.name!r} is taken by a {role} task of run {run_dir}")
    base_model = run_cfg.model.name
    if cfg.method not in new_task_methods(base_model):
        raise RunDirError(
            f"{where}: method {cfg.method!r} does not fit base model {base_model!r} "
            f"(methods for it: {list(new_task_methods(base_model)) or 'none'})"
        )
    try:
        schema = read_schema(run_cfg.data.path)
    except (OSError, ValueError) as e:
        raise RunDirError(f"{where}: cannot read the run's data schema: {e}") from e
    try:
        check_label(cfg.task_spec(), schema, run_cfg.data.path)
    except ConfigError as e:
        raise RunDirError(f"{source}: {e}") from e
    _check_features(cfg, run_cfg, schema, where)
    check_base_unchanged(run_dir, store)


def check_base_unchanged(run_dir: str | os.PathLike[str], store: Mapping[str, Any],
                         task: str | None = None) -> Path:
    """Verify the base checkpoint exists and still has its recorded hash.

    Args:
        run_dir: the run directory.
        store: the run's task store.
        task: check the task's recorded ``base_checkpoint``/hash instead of the store's base.

    Returns:
        The checkpoint folder.

    Raises:
        RunDirError: missing checkpoint or changed content.
    """
    rec = store["tasks"][task] if task else store["base"]
    key_path, key_sha = ("base_checkpoint", "base_checkpoint_sha256") if task else (
        "checkpoint", "checkpoint_sha256")
    ckpt = resolve_path(run_dir, rec[key_path])
    if not ckpt.is_dir():
        raise RunDirError(f"base checkpoint {ckpt} of run {run_dir} no longer exists")
    sha = hash_checkpoint(ckpt)
    if sha != rec[key_sha]:
        raise RunDirError(
            f"base checkpoint {ckpt} changed since registration (sha256 {sha[:12]}... != recorded "
            f"{rec[key_sha][:12]}...); re-register the task against the new checkpoint"
        )
    return ckpt
