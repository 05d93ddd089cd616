"""Offline evaluation: score every row exactly once on 1..N ranks, then exact metrics per task.

The report (``mptrec eval --out FILE``, :func:`write_report_json`) is one JSON object:

.. code-block:: text

    {"tasks": {task: {"auc", "logloss", "calibration", "n", "positives", "positive_rate"}},
     "world_size": int, "checkpoint": str | null, "data": str | null, "split": str | null,
     "created": ISO-8601 UTC, "rows": int,
     "timing": {"score_s": float, "metrics_s": float, "dump_s": float},
     "predictions": path | null,
     # only when tasks named `click_task` and `conversion_task` (default "ctr", "cvr") exist:
     "cvr_on_clicks": {same keys as a task; the conversion task on rows with click label 1},
     # only when a user (group) field is given:
     "user_field": str, "gauc": {task: float | null}, "gauc_groups": {task: int}}

``auc`` is ``null`` for a single-class task, ``calibration`` is ``null`` without positives (see
:func:`mptrec.pipeline.eval.auc.binary_metrics`).

Predictions (``dump_predictions``): rank 0 writes ONE Parquet file holding every rank's rows,
sorted by ``sample_id``, atomically (temporary file, then rename). Columns: ``sample_id``
(int64), then per task ``label_<task>`` (int8) and ``logit_<task>`` (float32; the probability
is ``sigmoid(logit)``), and ``group`` (int64) when a user field is given.

Distributed: under ``DistributedModelParallel`` the sharded forward holds collectives, so every
rank must call the model the same number of times although ranks may own different numbers of
batches. :func:`mptrec.pipeline.distributed.lockstep` all-reduces a "has a batch" flag each step
and, on a rank out of data, yields a filler batch (its last batch, or a one-row copy of another
rank's first batch when it had none) whose outputs are discarded. Every rank computes the metrics over the
all-gathered rows and returns the same report.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from tqdm import tqdm

from mptrec.data_loaders.batch import Batch
from mptrec.io import atomic_write, atomic_write_json
from mptrec.pipeline.distributed import is_distributed, lockstep
from mptrec.pipeline.eval.auc import ScoreBuffer, binary_metrics, grouped_auc_details

__all__ = [
    "evaluate",
    "write_predictions",
    "write_report_json",
]

ScoringFn = Callable[[torch.Tensor, KeyedJaggedTensor], Mapping[str, torch.Tensor]]


def _groups_of(kjt: KeyedJaggedTensor, key: str) -> torch.Tensor:
    if key not in kjt.keys():
        raise KeyError(f"user field {key!r} is not a sparse feature of the batch; keys: {kjt.keys()}")
    jt = kjt[key]
    lengths = jt.lengths()
    if lengths.numel() and not bool((lengths == 1).all()):
        row = int(torch.nonzero(lengths != 1)[0])
        raise ValueError(f"user field {key!r} needs exactly one id per row; row {row} has "
                         f"{int(lengths[row])}")
    return jt.values().long()


def _drop_key(kjt: KeyedJaggedTensor, key: str) -> KeyedJaggedTensor:
    keep = [i for i, k in enumerate(kjt.keys()) if k != key]
    return kjt.permute(keep)


def _score(
    model: ScoringFn, batch: Batch, device: torch.device, task_names: Sequence[str],
    user_field: str | None, user_field_is_input: bool,
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    kjt = batch.sparse_features
    groups = None
    if user_field is not None:
        groups = _groups_of(kjt, user_field)
        if not user_field_is_input:
            kjt = _drop_key(kjt, user_field)
    out = model(batch.dense_features.to(device), kjt.to(device))
    missing = [t for t in task_names if t not in out]
    if missing:
        raise KeyError(f"the model returned no logits for task(s) {missing}; it returned {sorted(out)}")
    logits = {}
    for t in task_names:
        x = out[t].reshape(-1)
        if x.shape[0] != batch.batch_size:
            raise ValueError(f"the model's {t!r} logits have {x.shape[0]} values for {batch.batch_size} rows")
        logits[t] = x
    return logits, groups


def _check_labels(batch: Batch, task_names: Sequence[str]) -> None:
    missing = [t for t in task_names if t not in batch.labels]
    if missing:
        raise KeyError(f"the batch has no labels for task(s) {missing}; it has {sorted(batch.labels)}")


def _sample_ids(batch: Batch) -> torch.Tensor:
    ids = batch.sample_ids
    return ids if ids.numel() == batch.batch_size else torch.full((batch.batch_size,), -1, dtype=torch.long)


def _collect(model: ScoringFn, batches: Iterable[Batch], task_names: Sequence[str], device: torch.device,
             user_field: str | None, user_field_is_input: bool, group: dist.ProcessGroup | None,
             show: bool) -> ScoreBuffer:
    buf = ScoreBuffer(task_names, keep_ids=True, keep_groups=user_field is not None)
    with torch.no_grad(), tqdm(desc="eval", unit="batch", file=sys.stderr, disable=not show) as bar:
        for batch, real in lockstep(batches, group=group):
            if real:
                _check_labels(batch, task_names)
            logits, groups = _score(model, batch, device, task_names, user_field, user_field_is_input)
            if real:
                buf.update(logits, batch.labels, _sample_ids(batch), groups)
                bar.update(1)
    return buf


def _check_unique(ids: np.ndarray) -> None:
    known = ids[ids >= 0]
    uniq, counts = np.unique(known, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1]
        raise RuntimeError(f"{dup.shape[0]} sample_ids were scored more than once (e.g. {dup[:5].tolist()}): "
                           "the loader read some rows on several ranks or workers")


def _metrics(rows: Mapping[str, torch.Tensor], task_names: Sequence[str], user_field: str | None,
             click_task: str, conversion_task: str) -> dict[str, Any]:
    logits = rows["logits"].numpy()
    labels = rows["labels"].numpy()
    col = {t: i for i, t in enumerate(task_names)}
    out: dict[str, Any] = {"tasks": {t: binary_metrics(logits[:, i], labels[:, i]) for t, i in col.items()}}
    if click_task in col and conversion_task in col:
        clicked = labels[:, col[click_task]] == 1
        j = col[conversion_task]
        out["cvr_on_clicks"] = binary_metrics(logits[clicked, j], labels[clicked, j])
    if user_field is not None:
        groups = rows["groups"].numpy()
        details = {t: grouped_auc_details(logits[:, i], labels[:, i], groups) for t, i in col.items()}
        out["user_field"] = user_field
        out["gauc"] = {t: d[0] for t, d in details.items()}
        out["gauc_groups"] = {t: d[1] for t, d in details.items()}
    return out


def evaluate(
    model: ScoringFn,
    batches: Iterable[Batch],
    task_names: Sequence[str],
    *,
    device: torch.device | str = "cpu",
    dump_predictions: str | os.PathLike[str] | None = None,
    user_field: str | None = None,
    user_field_is_input: bool = True,
    click_task: str = "ctr",
    conversion_task: str = "cvr",
    checkpoint: str | None = None,
    data: str | None = None,
    split: str | None = None,
    group: dist.ProcessGroup | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score every row of ``batches`` once (on every rank) and compute exact metrics per task.

    Collective when a process group is initialised: every rank of ``group`` must call it.

    Args:
        model: ``model(dense (B, D), kjt) -> {task: logits (B,)}`` (``MultiTaskModel``,
            ``NewTaskModel``, a DMP-wrapped one, or any callable). ``nn.Module`` s are put
            in eval mode for the call and restored afterwards.
        batches: this rank's batches (e.g. a ``ShardDataset`` split over ranks).
        task_names: tasks to evaluate; each needs a model output and a batch label.
        device: device the inputs are moved to.
        dump_predictions: write every row's labels and logits to this Parquet file (rank 0).
        user_field: sparse feature holding one group (user) id per row; adds GAUC per task.
        user_field_is_input: whether the model takes ``user_field`` as an input; if False it
            is removed from the KJT before the model sees it.
        click_task: name of the click task for ``cvr_on_clicks``.
        conversion_task: name of the conversion task for ``cvr_on_clicks``.
        checkpoint: recorded in the report.
        data: recorded in the report (the shards folder).
        split: recorded in the report.
        group: process group (default: the world).
        progress: show a tqdm bar on rank 0.

    Returns:
        The report (schema in the module docstring); the same on every rank.
    """
    if not task_names:
        raise ValueError("evaluate needs at least one task")
    distributed = is_distributed(group)
    rank = dist.get_rank(group) if distributed else 0
    world = dist.get_world_size(group) if distributed else 1
    dev = torch.device(device)
    was_training = model.training if isinstance(model, nn.Module) else False
    if isinstance(model, nn.Module):
        model.eval()
    t0 = time.perf_counter()
    try:
        buf = _collect(model, batches, task_names, dev, user_field, user_field_is_input, group,
                       show=progress and rank == 0)
    finally:
        if isinstance(model, nn.Module):
            model.train(was_training)
    t1 = time.perf_counter()
    rows = buf.gather(group)
    ids = rows["sample_ids"].numpy()
    _check_unique(ids)
    report: dict[str, Any] = _metrics(rows, task_names, user_field, click_task, conversion_task)
    t2 = time.perf_counter()
    if dump_predictions is not None and rank == 0:
        write_predictions(rows, task_names, dump_predictions)
    report.update(
        world_size=world, checkpoint=checkpoint, data=data, split=split,
        created=datetime.now(UTC).isoformat(timespec="seconds"), rows=int(ids.shape[0]),
        timing={"score_s": round(t1 - t0, 4), "metrics_s": round(t2 - t1, 4),
                "dump_s": round(time.perf_counter() - t2, 4)},
        predictions=str(dump_predictions) if dump_predictions is not None else None,
    )
    return report


def write_predictions(rows: Mapping[str, torch.Tensor], task_names: Sequence[str],
                      path: str | os.PathLike[str]) -> None:
    """Write gathered rows to one Parquet file, sorted by ``sample_id``, atomically.

    Args:
        rows: ``logits`` (n, T), ``labels`` (n, T), ``sample_ids`` (n,), optional ``groups`` (n,)
            as returned by :meth:`ScoreBuffer.gather`.
        task_names: the T tasks, in column order.
        path: destination ``.parquet`` file.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = rows["sample_ids"].numpy()
    if ids.size and (ids < 0).any():
        raise ValueError("dump_predictions needs sample_ids on every batch (Batch.sample_ids is empty)")
    order = np.argsort(ids, kind="stable")
    cols: dict[str, Any] = {"sample_id": pa.array(ids[order], type=pa.int64())}
    logits = rows["logits"].numpy()[order]
    labels = rows["labels"].numpy()[order]
    for i, t in enumerate(task_names):
        cols[f"label_{t}"] = pa.array(labels[:, i].astype(np.int8))
        cols[f"logit_{t}"] = pa.array(logits[:, i].astype(np.float32))
    if "groups" in rows:
        cols["group"] = pa.array(rows["groups"].numpy()[order], type=pa.int64())
    atomic_write(path, lambda tmp: pq.write_table(pa.table(cols), tmp))


def write_report_json(report: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Write an evaluation report as JSON atomically (``None`` becomes ``null``; NaN is refused).

    Args:
        report: the :func:`evaluate` report.
        path: destination file.
    """
    atomic_write_json(path, report, indent=2, allow_nan=False)
