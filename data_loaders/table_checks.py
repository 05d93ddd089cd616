"""The per-table input checks (nulls, NaN/inf, labels, ids) and the out-of-vocabulary policy.

No file I/O. Run on each row group the loader reads (:mod:`mptrec.data_loaders.dataset`) and by
``mptrec data validate`` (:mod:`mptrec.data_loaders.validate`); the conversion to a batch
(:mod:`mptrec.data_loaders.to_batch`) applies :func:`fix_ids`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from mptrec.data_loaders.schema import DataError, FeatureSpec, LabelSpec, OovPolicy

OOV_POLICIES: tuple[str, ...] = ("error", "hash", "clip")

#: ``pa.Table`` or ``pa.RecordBatch`` (pyarrow ships no type stubs).
Table: TypeAlias = Any


def column_numpy(col: pa.Array | pa.ChunkedArray) -> npt.NDArray[Any]:
    """A column (array or chunked) as one numpy array (a copy where Arrow cannot share it)."""
    return np.asarray(col.to_numpy(zero_copy_only=False) if isinstance(col, pa.Array) else col.to_numpy())


def fix_ids(
    ids: npt.NDArray[np.int64], num_embeddings: int, policy: OovPolicy, where: str, column: str
) -> npt.NDArray[np.int64]:
    """Apply the out-of-vocabulary policy to ids of one feature.

    Args:
        ids: int64 ids.
        num_embeddings: table size; valid ids are ``[0, num_embeddings)``.
        policy: ``error`` (raise), ``hash`` (``id mod num_embeddings``) or ``clip`` (into
            ``[0, num_embeddings - 1]``).
        where: location for the error message (file, row group).
        column: column name for the error message.

    Returns:
        Ids that are all valid table rows.

    Raises:
        DataError: ``policy == "error"`` and an id is out of range.
    """
    if ids.size == 0:
        return ids
    lo, hi = int(ids.min()), int(ids.max())
    if lo >= 0 and hi < num_embeddings:
        return ids
    if policy == "hash":
        return np.mod(ids, num_embeddings)
    if policy == "clip":
        return np.clip(ids, 0, num_embeddings - 1)
    bad = hi if hi >= num_embeddings else lo
    raise DataError(
        f"{where}: column {column!r}: id {bad} outside [0, {num_embeddings}) "
        f"(oov_policy={policy!r}; use 'hash' or 'clip', or a larger num_embeddings)"
    )


def _first_bad(mask: npt.NDArray[np.bool_]) -> int:
    return int(np.flatnonzero(mask)[0])


def check_table(
    table: Table,
    features: Sequence[FeatureSpec],
    labels: Sequence[LabelSpec],
    label_values: Mapping[str, Sequence[int]],
    oov_policy: OovPolicy,
    where: str,
) -> None:
    """Check the values of one table (nulls, NaN, labels, ids under ``oov_policy="error"``).

    Fast path with pyarrow compute kernels (no conversion); the offending row is located only
    when a check fails.

    Args:
        table: rows read from a shard.
        features: the features read.
        labels: the labels read.
        label_values: label column -> allowed raw values (schema.json ``labels``).
        oov_policy: ids out of range are an error only under ``"error"``.
        where: location for messages, e.g. ``"train/part-00000.parquet row group 3"``.

    Raises:
        DataError: naming ``where``, the column and the bad value.
    """
    for f in features:
        col = table.column(f.column)
        if col.null_count:
            raise DataError(f"{where}: column {f.column!r}: {col.null_count} null value(s)")
        if f.kind == "dense":
            if pc.all(pc.is_finite(col)).as_py() is False:
                x = column_numpy(col)
                i = _first_bad(~np.isfinite(x))
                raise DataError(
                    f"{where}: dense column {f.column!r}: {x[i]} at row {i} (NaN/inf not allowed)"
                )
        elif oov_policy == "error":
            ids = pc.list_flatten(col) if f.multivalent else col
            mm = pc.min_max(ids)
            lo, hi = mm["min"].as_py(), mm["max"].as_py()
            if lo is not None and (lo < 0 or hi >= f.num_embeddings):
                fix_ids(np.array([lo, hi], dtype=np.int64), f.num_embeddings, "error", where, f.column)
    for lab in labels:
        col = table.column(lab.column)
        if col.null_count:
            raise DataError(f"{where}: label column {lab.column!r}: {col.null_count} null value(s)")
        allowed = list(label_values.get(lab.column, (0, 1))) if lab.positive_values else [0, 1]
        if pc.all(pc.is_in(col, value_set=pa.array(allowed, col.type))).as_py() is False:
            y = column_numpy(col)
            i = _first_bad(~np.isin(y, allowed))
            raise DataError(
                f"{where}: label column {lab.column!r} (task {lab.name!r}): value {y[i]} at row {i} "
                f"is not in {allowed}"
            )
