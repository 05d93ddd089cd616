"""Shards -> a serving artifact's inputs: torch, numpy and pyarrow only (the serving path).

Shards are read the way :class:`mptrec.data_loaders.dataset.ShardDataset` reads them: the split's
row groups in ``schema.json`` file order (:func:`split_units`; ``mptrec predict`` deals them
round-robin over the scoring processes), each row's ``sample_id`` being its index within the
split. :func:`check_shards` first checks the shards declare the model's inputs as the training
data did; :func:`table_inputs` turns rows into the program's ``(dense, values, lengths)``. Bad
input raises :class:`~mptrec.pipeline.serve.artifact.ArtifactError` naming the file, the field
and the value. Like :mod:`mptrec.pipeline.serve.artifact`, this module imports nothing of the
training code.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from mptrec.columns import column_type_fits
from mptrec.io import read_json
from mptrec.pipeline.serve.artifact import (
    SCHEMA_KEYS,
    ArtifactError,
    Manifest,
    SparseInput,
    require_field,
    vocab_digest,
)

__all__ = ["Unit", "check_shards", "input_columns", "read_unit", "split_units", "table_inputs"]


@dataclass(frozen=True)
class Unit:
    """One row group to score: shard file, row group, ``sample_id`` of its first row, rows."""

    file: Path
    row_group: int
    first_row: int
    rows: int


def _read_schema(data_dir: Path) -> dict[str, Any]:
    path = data_dir / "schema.json"
    if not data_dir.is_dir():
        raise ArtifactError(f"{data_dir}: no such shard folder")
    schema = read_json(path, ArtifactError,
                       f"{path}: missing; {data_dir} is not a shard folder written by `mptrec data`")
    if not isinstance(schema, dict):
        raise ArtifactError(f"{path}: the top level is not an object")
    require_field(schema, "features", list, str(path))
    require_field(schema, "splits", dict, str(path))
    return schema


def check_shards(manifest: Manifest, data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Check that the shards' ``schema.json`` declares the model's inputs as the training data did.

    Args:
        manifest: the artifact's manifest.
        data_dir: the shard folder (with ``schema.json``).

    Returns:
        The shards' schema.

    Raises:
        ArtifactError: naming ``schema.json``, the feature, the field and both values.
    """
    root = Path(data_dir)
    schema = _read_schema(root)
    path = root / "schema.json"
    declared = {f.get("name"): f for f in schema["features"] if isinstance(f, dict)}
    for want in manifest.schema_features:
        name = want.get("name")
        have = declared.get(name)
        if have is None:
            raise ArtifactError(f"{path}: feature {name!r}, an input of the model, is not declared "
                                f"(model manifest {manifest.path})")
        have = {"column": name, "multivalent": False, **have}
        for key in SCHEMA_KEYS:
            if have.get(key) != want.get(key):
                raise ArtifactError(f"{path}: feature {name!r} field {key!r} is {have.get(key)!r}, the model "
                                    f"was trained with {want.get(key)!r} ({manifest.path})")
    vocab = vocab_digest(root, schema)
    if vocab != manifest.vocab_sha256:
        raise ArtifactError(f"{path}: vocabulary file sha256 {str(vocab)[:12]}... differs from the training "
                            f"data's {str(manifest.vocab_sha256)[:12]}... ({manifest.path}): the ids mean "
                            "other values")
    return schema


def input_columns(manifest: Manifest) -> dict[str, str]:
    """Column -> expected kind (``dense``, ``int`` or ``multi``) of the program's inputs."""
    out = {c: "dense" for c in manifest.dense}
    out.update({f.column: "multi" if f.multivalent else "int" for f in manifest.sparse})
    return out


def split_units(manifest: Manifest, data_dir: str | os.PathLike[str], split: str,
                schema: Mapping[str, Any]) -> list[Unit]:
    """Every row group of ``split`` (file order), each shard's footer checked against the manifest.

    Raises:
        ArtifactError: no such split, a missing or unreadable shard, a row count that differs
            from ``schema.json``, a missing column or one of the wrong type.
    """
    root = Path(data_dir)
    splits = schema["splits"]
    if split not in splits:
        raise ArtifactError(f"{root / 'schema.json'}: no split {split!r} (splits: {sorted(splits)})")
    spec = splits[split]
    files, rows = spec.get("files", []), spec.get("rows", [])
    if not isinstance(files, list) or not isinstance(rows, list) or len(files) != len(rows):
        raise ArtifactError(f"{root / 'schema.json'}: split {split!r} needs lists 'files' and 'rows' "
                            "of one length")
    wanted = input_columns(manifest)
    units: list[Unit] = []
    first = 0
    for name, expected in zip(files, rows):
        path = root / str(name)
        try:
            meta = pq.ParquetFile(path).metadata
            arrow_schema = meta.schema.to_arrow_schema()
        except (OSError, pa.ArrowException) as e:
            raise ArtifactError(f"{path}: missing or unreadable Parquet shard: {e}") from e
        if meta.num_rows != int(expected):
            raise ArtifactError(f"{path}: holds {meta.num_rows} rows, schema.json says {expected}")
        for col, kind in wanted.items():
            if col not in arrow_schema.names:
                raise ArtifactError(f"{path}: column {col!r}, an input of the model, is missing")
            t = arrow_schema.field(col).type
            if not column_type_fits(t, kind):
                want = {"multi": "list<int64>", "dense": "float", "int": "int64"}[kind]
                raise ArtifactError(f"{path}: column {col!r} has type {t}, the model expects {want}")
        row = first
        for rg in range(meta.num_row_groups):
            n = meta.row_group(rg).num_rows
            if n:
                units.append(Unit(path, rg, row, n))
            row += n
        first += int(expected)
    return units


def _numpy(col: pa.ChunkedArray | pa.Array) -> npt.NDArray[Any]:
    return np.asarray(col.to_numpy(zero_copy_only=False) if isinstance(col, pa.Array) else col.to_numpy())


def _fix_ids(ids: npt.NDArray[np.int64], f: SparseInput, policy: str, where: str) -> npt.NDArray[np.int64]:
    if ids.size == 0:
        return ids
    lo, hi = int(ids.min()), int(ids.max())
    if lo >= 0 and hi < f.num_embeddings:
        return ids
    if policy == "hash":
        return np.mod(ids, f.num_embeddings)
    if policy == "clip":
        return np.clip(ids, 0, f.num_embeddings - 1)
    bad = hi if hi >= f.num_embeddings else lo
    raise ArtifactError(f"{where}: column {f.column!r}: id {bad} outside [0, {f.num_embeddings}) "
                        f"(the run's oov_policy is 'error')")


def table_inputs(manifest: Manifest, table: Any, where: str) -> tuple[torch.Tensor, list[torch.Tensor],
                                                                          list[torch.Tensor]]:
    """The program's inputs for the rows of ``table`` (a ``pyarrow.Table`` or ``RecordBatch``).

    Args:
        manifest: the artifact's manifest.
        table: the rows (at least the input columns).
        where: location for messages (file and row group).

    Returns:
        ``(dense (B, D_dense), values per sparse feature, lengths per sparse feature)``.

    Raises:
        ArtifactError: a null, a NaN/inf in a dense column, an id out of range under ``error``.
    """
    n = table.num_rows
    dense = np.empty((n, len(manifest.dense)), dtype=np.float32)
    for j, c in enumerate(manifest.dense):
        col = table.column(c)
        if col.null_count:
            raise ArtifactError(f"{where}: column {c!r}: {col.null_count} null value(s)")
        dense[:, j] = _numpy(col)
    if not np.isfinite(dense).all():
        i, j = np.argwhere(~np.isfinite(dense))[0]
        raise ArtifactError(f"{where}: dense column {manifest.dense[j]!r}: {dense[i, j]} at row {i} "
                            "(NaN/inf)")
    values, lengths = [], []
    for f in manifest.sparse:
        col = table.column(f.column)
        if col.null_count:
            raise ArtifactError(f"{where}: column {f.column!r}: {col.null_count} null value(s)")
        if f.multivalent:
            lens = _numpy(pc.list_value_length(col)).astype(np.int64)
            col = pc.list_flatten(col)
        else:
            lens = np.ones(n, dtype=np.int64)
        ids = _fix_ids(_numpy(col).astype(np.int64, copy=False), f, manifest.oov_policy, where)
        values.append(torch.from_numpy(ids if ids.flags.writeable and ids.flags.c_contiguous else ids.copy()))
        lengths.append(torch.from_numpy(lens))
    return torch.from_numpy(dense), values, lengths


def read_unit(unit: Unit, columns: Sequence[str]) -> Any:
    """The rows of one row group (only ``columns``)."""
    try:
        pf = pq.ParquetFile(unit.file)
        return pf.read_row_group(unit.row_group, columns=list(columns), use_threads=False)
    except (OSError, pa.ArrowException) as e:
        raise ArtifactError(f"{unit.file} row group {unit.row_group}: cannot read: {e}") from e


