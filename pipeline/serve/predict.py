"""``mptrec predict``: batch-score Parquet shards with an exported artifact, on 1..N processes.

Needs torch, numpy, pyarrow and tqdm only: it imports :mod:`mptrec.pipeline.serve.artifact` and
nothing of the training code, builds no KeyedJaggedTensor and, on one process, no process group.

Work split: the split's row groups (``schema.json`` file order) are dealt round-robin over the
processes (``units[rank::world]``, the rule of ``ShardDataset``); each process scores its row
groups in batches of ``batch_size`` rows and writes its rows to a part file; the last step (the
parent of ``--nproc`` workers, or rank 0 of a torchrun job after a barrier) checks that every
``sample_id`` of the split is there exactly once, sorts by ``sample_id`` and writes ONE Parquet
file atomically (temporary file, then rename). Columns: ``sample_id`` (int64), then per task
``<task>_prob`` and ``<task>_logit`` (float32; ``prob = sigmoid(logit)``).

Everything that can be checked before scoring is (the manifest and its format version, the
shards' schema against the manifest, every shard's footer and column types): a bad input raises
:class:`~mptrec.pipeline.serve.artifact.ArtifactError` and nothing is written.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from mptrec.io import atomic_write
from mptrec.pipeline.serve.artifact import Artifact, ArtifactError, Manifest, load_artifact, read_manifest
from mptrec.pipeline.serve.shard_inputs import (
    Unit,
    check_shards,
    input_columns,
    read_unit,
    split_units,
    table_inputs,
)

__all__ = [
    "PredictError", "PredictPlan", "merge_parts", "plan_predict", "predict", "score_part", "score_units",
]

DEFAULT_BATCH_SIZE = 8192
PathLike = str | os.PathLike[str]


class PredictError(RuntimeError):
    """A scoring job that did not complete (a process failed, rows missing); nothing was written."""


@dataclass(frozen=True)
class PredictPlan:
    """A checked scoring job: the artifact folder, its manifest, the row groups to score, the output."""

    model_dir: Path
    manifest: Manifest
    units: list[Unit]
    out: Path
    batch_size: int

    @property
    def rows(self) -> int:
        """Rows of the split."""
        return sum(u.rows for u in self.units)

    @property
    def parts_dir(self) -> Path:
        """Where the processes write their rows (beside ``out``; the same path on every rank)."""
        return self.out.with_name(f".{self.out.name}.parts")


def plan_predict(model_dir: PathLike, data_dir: PathLike, out: PathLike, *, split: str = "test",
                 batch_size: int = DEFAULT_BATCH_SIZE) -> PredictPlan:
    """Check the artifact, the shards and their agreement; list the row groups.

    Raises:
        ArtifactError: see the module docstring.
    """
    if batch_size < 1:
        raise ArtifactError(f"--batch-size {batch_size}: must be >= 1")
    manifest = read_manifest(model_dir)
    schema = check_shards(manifest, data_dir)
    units = split_units(manifest, data_dir, split, schema)
    return PredictPlan(Path(model_dir), manifest, units, Path(out), batch_size)


def score_units(artifact: Artifact, units: Sequence[Unit], batch_size: int,
                bar: Any | None = None) -> dict[str, np.ndarray]:
    """Score row groups: ``sample_id`` (n,) and per task ``<task>_logit`` (n,) float32 arrays."""
    m = artifact.manifest
    cols = list(input_columns(m))
    ids: list[np.ndarray] = []
    logits: dict[str, list[np.ndarray]] = {t: [] for t in m.tasks}
    for u in units:
        table = read_unit(u, cols)
        where = f"{u.file} row group {u.row_group}"
        for a in range(0, table.num_rows, batch_size):
            part = table.slice(a, batch_size)
            out = artifact.logits(*table_inputs(m, part, where))
            for t in m.tasks:
                logits[t].append(out[t].reshape(-1).numpy())
            ids.append(np.arange(u.first_row + a, u.first_row + a + part.num_rows, dtype=np.int64))
            if bar is not None:
                bar.update(part.num_rows)
    empty = np.zeros(0, dtype=np.float32)
    result = {"sample_id": np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)}
    for t in m.tasks:
        result[f"{t}_logit"] = np.concatenate(logits[t]) if logits[t] else empty
    return result


def _part_path(plan: PredictPlan, rank: int) -> Path:
    return plan.parts_dir / f"part-{rank:05d}.parquet"


def score_part(plan: PredictPlan, rank: int, world: int, *, threads: int = 0, progress: bool = True) -> int:
    """Score this process's share (``units[rank::world]``) and write it as a part file.

    Args:
        plan: from :func:`plan_predict`.
        rank: this process.
        world: number of processes.
        threads: torch threads (0: leave as is).
        progress: show a tqdm bar (the caller passes it for rank 0 only).

    Returns:
        Rows scored.
    """
    if threads > 0:
        torch.set_num_threads(threads)
    artifact = load_artifact(plan.model_dir)
    mine = plan.units[rank::world]
    total = sum(u.rows for u in mine)
    desc = "predict" if world == 1 else f"predict (rank 0 of {world})"
    with tqdm(total=total, desc=desc, unit="row", unit_scale=True, file=sys.stderr,
              disable=not progress) as bar:
        cols = score_units(artifact, mine, plan.batch_size, bar)
    table = pa.table({k: pa.array(v) for k, v in cols.items()})
    atomic_write(_part_path(plan, rank), lambda tmp: pq.write_table(table, tmp))
    return int(cols["sample_id"].shape[0])


def merge_parts(plan: PredictPlan, world: int) -> int:
    """Join the part files into ``plan.out`` (sorted by ``sample_id``), atomically; remove the parts.

    Returns:
        Rows written.

    Raises:
        PredictError: a part is missing, or a ``sample_id`` is absent or scored twice.
    """
    tables = []
    for r in range(world):
        path = _part_path(plan, r)
        if not path.is_file():
            raise PredictError(f"{path}: missing; process {r} of {world} did not finish (see its error)")
        tables.append(pq.read_table(path))
    table = pa.concat_tables(tables)
    ids = table.column("sample_id").to_numpy()
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    if ids.shape[0] != plan.rows or (ids.size and not np.array_equal(ids, np.arange(plan.rows))):
        raise PredictError(f"{plan.parts_dir}: {ids.shape[0]} rows scored for {plan.rows} in the split, or "
                           "some sample_id is missing or scored twice")
    cols: dict[str, Any] = {"sample_id": pa.array(ids, type=pa.int64())}
    for t in plan.manifest.tasks:
        logit = table.column(f"{t}_logit").to_numpy()[order].astype(np.float32, copy=False)
        cols[f"{t}_prob"] = pa.array(torch.sigmoid(torch.from_numpy(logit)).numpy())
        cols[f"{t}_logit"] = pa.array(logit)
    atomic_write(plan.out, lambda tmp: pq.write_table(pa.table(cols), tmp))
    shutil.rmtree(plan.parts_dir, ignore_errors=True)
    return int(ids.shape[0])


def _spawned(plan: PredictPlan, rank: int, world: int, threads: int, progress: bool) -> int:
    return score_part(plan, rank, world, threads=threads, progress=progress and rank == 0)


def predict(model_dir: PathLike, data_dir: PathLike, out: PathLike, *,
            split: str = "test", nproc: int = 1, batch_size: int = DEFAULT_BATCH_SIZE, threads: int = 0,
            progress: bool = True, rank: int = 0, world: int = 1,
            barrier: Callable[[], None] | None = None) -> dict[str, Any]:
    """Score every row of a split once and write ``out`` (see the module docstring).

    Two ways to use several processes: ``nproc > 1`` spawns local worker processes (no process
    group: the parent merges their parts); or a launcher (torchrun) runs this function on
    ``world`` ranks with a ``barrier`` (rank 0 merges).

    Args:
        model_dir: the artifact folder.
        data_dir: the shard folder (with ``schema.json``).
        out: output Parquet file.
        split: the split to score.
        nproc: local worker processes (with ``world == 1`` only).
        batch_size: rows per program call.
        threads: torch threads per process (0: the current number, divided among ``nproc``).
        progress: tqdm bar (rank 0).
        rank: this rank of a launched job.
        world: ranks of a launched job.
        barrier: synchronises the ranks of a launched job (required when ``world > 1``).

    Returns:
        ``{"rows", "seconds", "rows_per_s", "out", "processes", "tasks"}`` (rows and rows/s are
        0 on ranks other than 0 of a launched job).

    Raises:
        ArtifactError: bad input (nothing written).
    """
    if nproc < 1 or (nproc > 1 and world > 1):
        raise ArtifactError(f"--nproc {nproc}: must be >= 1, and 1 under a launcher ({world} ranks)")
    if world > 1 and barrier is None:
        raise ValueError("predict on several ranks needs a barrier")
    plan = plan_predict(model_dir, data_dir, out, split=split, batch_size=batch_size)
    t0 = time.perf_counter()
    if barrier is not None and world > 1:
        if rank == 0:
            shutil.rmtree(plan.parts_dir, ignore_errors=True)
            plan.parts_dir.mkdir(parents=True)
        barrier()
        try:
            score_part(plan, rank, world, threads=threads, progress=progress and rank == 0)
        finally:
            barrier()
        rows = merge_parts(plan, world) if rank == 0 else 0
    else:
        shutil.rmtree(plan.parts_dir, ignore_errors=True)
        plan.parts_dir.mkdir(parents=True)
        try:
            if nproc == 1:
                score_part(plan, 0, 1, threads=threads, progress=progress)
            else:
                per = threads or max(1, torch.get_num_threads() // nproc)
                ctx = mp.get_context("spawn")
                with ProcessPoolExecutor(max_workers=nproc, mp_context=ctx) as pool:
                    jobs = [pool.submit(_spawned, plan, r, nproc, per, progress) for r in range(nproc)]
                    for j in jobs:
                        j.result()
            rows = merge_parts(plan, nproc)
        finally:
            shutil.rmtree(plan.parts_dir, ignore_errors=True)
    seconds = time.perf_counter() - t0
    return {"rows": rows, "seconds": round(seconds, 3), "rows_per_s": rows / seconds if rows else 0.0,
            "out": str(plan.out), "processes": max(nproc, world), "tasks": plan.manifest.tasks}
