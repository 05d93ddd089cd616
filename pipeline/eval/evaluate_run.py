"""``mptrec eval``: load a trained run (stage-1 tasks plus every prompt-tuned task) and evaluate it.

The job: the union model of the run (:func:`mptrec.pipeline.tasks.union.load_run_for_eval`,
sharded on this job's process group), this rank's part of a split (rows split over ranks by the
loader, no shuffling), and :func:`mptrec.pipeline.eval.evaluate.evaluate`, which scores every row
exactly once and computes the exact metrics; the report format is described there.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mptrec.pipeline.distributed import is_distributed
from mptrec.pipeline.eval.evaluate import evaluate

__all__ = ["EvalSetupError", "evaluate_run"]


class EvalSetupError(RuntimeError):
    """A piece ``mptrec eval`` needs is missing (e.g. the run loader); the message says which."""


def _load_run(run_dir: str | os.PathLike[str], checkpoint: str, device: torch.device) -> tuple[Any, Any, Any]:
    from mptrec.pipeline.tasks.union import load_run_for_eval

    return load_run_for_eval(str(run_dir), checkpoint, device)


def _relative_to(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def evaluate_run(
    run_dir: str | os.PathLike[str],
    *,
    checkpoint: str = "best",
    device: torch.device,
    data: str | None = None,
    split: str | None = None,
    overrides: Sequence[str] = (),
    dump_predictions: str | os.PathLike[str] | None = None,
    user_field: str | None = None,
    click_task: str = "ctr",
    conversion_task: str = "cvr",
    progress: bool = True,
) -> dict[str, Any]:
    """Load a trained run (stage-1 model plus its prompt-tuned tasks) and :func:`evaluate` it.

    The model, resolved config and tasks come from
    ``mptrec.pipeline.tasks.union.load_run_for_eval(run_dir, checkpoint, device)``. This rank reads
    its part of ``split`` (rows split over ranks by the loader, no shuffling). A ``user_field``
    that is not a model input is read too and removed before the model sees the batch.
    Collective when a process group is initialised.

    Args:
        run_dir: the stage-1 run directory.
        checkpoint: ``best``, ``last``, a checkpoint name or a path.
        device: device of this rank.
        data: shards folder (default: the run's ``data.path``).
        split: split to score (default: the run's ``data.test_split``).
        overrides: ``--set`` overrides applied to the run config (e.g. ``data.batch_size=8192``).
        dump_predictions: Parquet file for every row's labels and logits (rank 0 writes it).
        user_field: sparse field holding a user id, for GAUC (Ali-CCP: ``101``).
        click_task: click task name for ``cvr_on_clicks``.
        conversion_task: conversion task name for ``cvr_on_clicks``.
        progress: tqdm bar on rank 0.

    Returns:
        The :func:`evaluate` report; ``predictions`` is relative to ``run_dir`` when inside it.

    Raises:
        EvalSetupError: the run loader is not available.
    """
    import dataclasses

    from mptrec.data_loaders.layout import read_schema, resolve_features
    from mptrec.pipeline.build import make_dataset, resolve_run_features
    from mptrec.pipeline.config import RunConfig
    from mptrec.pipeline.strict import apply_overrides, from_dict, to_dict

    try:
        from mptrec.data_loaders.dataset import make_dataloader
    except ImportError as e:
        raise EvalSetupError(f"mptrec.data_loaders.dataset (make_dataloader) cannot be imported: {e}") from e
    model, cfg, tasks = _load_run(run_dir, checkpoint, device)
    if overrides:
        cfg = from_dict(RunConfig, apply_overrides(to_dict(cfg), overrides, "--set"), source="--set")
    if data:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=data))
    data_dir = cfg.data.path
    split = split or cfg.data.test_split
    schema = read_schema(data_dir)
    features = resolve_run_features(cfg, schema)
    user_is_input = True
    if user_field is not None and user_field not in {f.name for f in features if f.kind == "sparse"}:
        extra = resolve_features(schema, embedding_dim=cfg.features.embedding_dim, include=[user_field],
                                 use_dense=False)
        if not extra:
            raise ValueError(f"user field {user_field!r} is not a sparse feature of {data_dir}/schema.json")
        features, user_is_input = features + extra, False
    distributed = is_distributed(None)
    dataset = make_dataset(cfg.data, split, features, [t.label_spec() for t in tasks],
                           rank=dist.get_rank() if distributed else 0,
                           world_size=dist.get_world_size() if distributed else 1)
    report = evaluate(
        model, make_dataloader(dataset, cfg.data.num_workers), [t.name for t in tasks], device=device,
        dump_predictions=dump_predictions, user_field=user_field, user_field_is_input=user_is_input,
        click_task=click_task, conversion_task=conversion_task, checkpoint=checkpoint,
        data=str(data_dir), split=split, progress=progress)
    if dump_predictions is not None:
        report["predictions"] = _relative_to(Path(dump_predictions), Path(run_dir))
    return report
