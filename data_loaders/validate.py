"""Check a split's shards before a run writes anything: metadata, statistics and rows.

``mptrec train`` calls :func:`validate_dataset` before it creates the run folder, so a bad shard
(a null or out-of-range label, a NaN dense value, a negative or out-of-vocabulary id, a
corrupt or truncated file) fails the run at start with one line naming the file, the row group
and the column, and leaves nothing behind.

What is checked, for every shard of the split (the footers were already read by
:class:`~mptrec.data_loaders.dataset.ShardDataset`: readable, row count as declared, every
column present with its type):

1. every row group's column statistics (cheap, read from the footer): no nulls in any column
   read; integer ids inside ``[0, num_embeddings)`` (under ``oov_policy="error"``); label
   values inside the declared range;
2. the rows themselves with the loader's own check (:func:`~mptrec.data_loaders.table_checks.
   check_table`: nulls, NaN/inf, ids, labels): every row group when the split has at most
   :data:`FULL_SCAN_ROWS` rows (a full scan, about a second per million rows), else the first
   row group of every shard; page CRC checksums (written by the converters) are verified, so a
   damaged page is reported instead of decoded.

Beyond :data:`FULL_SCAN_ROWS` a value the statistics cannot show (a NaN in a dense column, a
label value between two allowed ones) can still surface in a later row group during training;
the loader then raises the same :class:`DataError`, and the run keeps only what ``--resume``
needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mptrec.data_loaders.schema import DataError, FeatureSpec, LabelSpec
from mptrec.data_loaders.table_checks import check_table

__all__ = ["FULL_SCAN_ROWS", "validate_dataset", "validate_split"]

#: Splits with at most this many rows are read in full before training (else: first row group
#: of every shard plus every row group's statistics).
FULL_SCAN_ROWS = 2_000_000


def _stat_problem(stats: Any, column: str, *, lo: int | None, hi: int | None, what: str) -> str:
    """A problem visible in one column chunk's statistics ("" when none or no statistics)."""
    if stats is None:
        return ""
    if stats.has_null_count and stats.null_count:
        return f"{what} {column!r}: {stats.null_count} null value(s)"
    if not stats.has_min_max or lo is None or hi is None:
        return ""
    try:
        vmin, vmax = int(stats.min), int(stats.max)
    except (TypeError, ValueError):
        return ""
    if vmin < lo:
        return f"{what} {column!r}: value {vmin} is below {lo} (allowed [{lo}, {hi}])"
    if vmax > hi:
        return f"{what} {column!r}: value {vmax} is above {hi} (allowed [{lo}, {hi}])"
    return ""


def _checks(ds: Any) -> dict[str, tuple[str, int | None, int | None]]:
    """Column -> (what, lowest, highest allowed) for the statistics check (non-list columns)."""
    out: dict[str, tuple[str, int | None, int | None]] = {}
    f: FeatureSpec
    for f in ds.features:
        if f.kind == "dense":
            out[f.column] = ("dense column", None, None)
        elif not f.multivalent:
            bounded = ds.oov_policy == "error"
            out[f.column] = ("column", 0 if bounded else None, f.num_embeddings - 1 if bounded else None)
    lab: LabelSpec
    for lab in ds.labels:
        allowed = list(ds.label_values.get(lab.column, (0, 1))) if lab.positive_values else [0, 1]
        out[lab.column] = ("label column", min(allowed), max(allowed))
    return out


def validate_split(ds: Any, *, full_scan_rows: int = FULL_SCAN_ROWS) -> dict[str, int]:
    """Check the row groups a :class:`ShardDataset` will read (see the module docstring).

    Args:
        ds: a ``ShardDataset`` (its files, row-group units, features, labels, policies).
        full_scan_rows: read every row group when the split has at most this many rows.

    Returns:
        ``{"row_groups": checked by statistics, "row_groups_read": read and checked}``.

    Raises:
        DataError: naming the shard file, the row group and the column.
    """
    checks = _checks(ds)
    full = ds.num_rows <= full_scan_rows
    read_files: set[int] = set()
    counted = {"row_groups": 0, "row_groups_read": 0}
    metas: dict[int, Any] = {}
    for unit in ds.units:
        path = ds.files[unit.file]
        where = f"{path} row group {unit.row_group}"
        try:
            if unit.file not in metas:
                metas[unit.file] = pq.ParquetFile(path, page_checksum_verification=True)
            pf = metas[unit.file]
            rg = pf.metadata.row_group(unit.row_group)
            for j in range(rg.num_columns):
                chunk = rg.column(j)
                spec = checks.get(chunk.path_in_schema)
                if spec is not None:
                    problem = _stat_problem(chunk.statistics, chunk.path_in_schema, lo=spec[1], hi=spec[2],
                                            what=spec[0])
                    if problem:
                        raise DataError(f"{where}: {problem}")
            counted["row_groups"] += 1
            if full or unit.file not in read_files:
                read_files.add(unit.file)
                table = pf.read_row_group(unit.row_group, columns=ds.columns, use_threads=False)
                check_table(table.slice(0, unit.rows), ds.features, ds.labels, ds.label_values,
                            ds.oov_policy, where)
                counted["row_groups_read"] += 1
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{where}: cannot read: {str(e).splitlines()[0] if str(e) else e!r}") from e
    return counted


def validate_dataset(datasets: Sequence[Any], *, full_scan_rows: int = FULL_SCAN_ROWS) -> dict[str, int]:
    """:func:`validate_split` on each dataset (skipped for ``on_error="skip"`` ones); summed counts."""
    total = {"row_groups": 0, "row_groups_read": 0}
    for ds in datasets:
        if ds is None or ds.on_error != "raise":
            continue
        for k, v in validate_split(ds, full_scan_rows=full_scan_rows).items():
            total[k] += v
    return total
