"""The shard writer: one split's rows into Parquet files, and all-or-nothing output folders.

No torch here. The layout written (``schema.json``, split folders, the checksums recorded) is
:mod:`mptrec.data_loaders.layout`'s.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq

from mptrec.data_loaders.layout import DEFAULT_ROW_GROUP_SIZE, SCHEMA_FILE, file_crc32
from mptrec.data_loaders.schema import DataError


class SplitWriter:
    """Write one split's rows into ``num_shards`` Parquet files of about equal size.

    Rows arrive in any chunking through :meth:`write`; files are written with row groups of
    ``row_group_size`` rows (the last of each file may be shorter), with a CRC checksum per page
    (a damaged page is then reported by a reader that verifies them, instead of being decoded:
    corrupt pages can abort pyarrow's decoder). Each file is written to a temporary name and
    renamed when complete.

    Args:
        out_dir: the shard folder (the split's sub-folder is created).
        split: split name.
        num_rows: total rows that will be written (known in advance, so shards are equal).
        num_shards: number of files (fewer if ``num_rows`` is smaller).
        schema: Arrow schema of every chunk.
        row_group_size: rows per row group.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        split: str,
        num_rows: int,
        num_shards: int,
        schema: pa.Schema,
        row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
    ) -> None:
        if num_shards <= 0 or row_group_size <= 0:
            raise DataError(f"split {split!r}: num_shards and row_group_size must be positive")
        self.out_dir = Path(out_dir)
        self.split = split
        self.schema = schema
        self.row_group_size = row_group_size
        k = min(num_shards, num_rows)
        self.sizes = [num_rows // k + (1 if i < num_rows % k else 0) for i in range(k)] if k else []
        self.files: list[str] = []
        self.crc32: list[int] = []
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._shard = 0
        self._in_shard = 0
        self._writer: pq.ParquetWriter | None = None
        if k:
            (self.out_dir / split).mkdir(parents=True, exist_ok=True)

    def write(self, table: pa.Table) -> None:
        """Append rows (any number; the chunk is re-cut into row groups)."""
        if table.num_rows == 0:
            return
        if not table.schema.equals(self.schema):
            raise DataError(f"split {self.split!r}: chunk schema {table.schema} != {self.schema}")
        self._pending.append(table)
        self._pending_rows += table.num_rows
        self._drain(final=False)

    def _drain(self, final: bool) -> None:
        while self._pending_rows and self._shard < len(self.sizes):
            left = self.sizes[self._shard] - self._in_shard
            need = min(self.row_group_size, left)
            if self._pending_rows < need and not final:
                return
            need = min(need, self._pending_rows)
            table = pa.concat_tables(self._pending) if len(self._pending) > 1 else self._pending[0]
            chunk, rest = table.slice(0, need), table.slice(need)
            self._pending = [rest] if rest.num_rows else []
            self._pending_rows = rest.num_rows
            self._write_group(chunk)
        if self._pending_rows and self._shard >= len(self.sizes):
            raise DataError(f"split {self.split!r}: more rows than the {sum(self.sizes)} announced")

    def _write_group(self, chunk: pa.Table) -> None:
        if self._writer is None:
            name = f"{self.split}/part-{self._shard:05d}.parquet"
            self.files.append(name)
            self._writer = pq.ParquetWriter(self.out_dir / (name + ".tmp"), self.schema, compression="snappy",
                                            write_page_checksum=True)
        self._writer.write_table(chunk, row_group_size=chunk.num_rows)
        self._in_shard += chunk.num_rows
        if self._in_shard == self.sizes[self._shard]:
            self._writer.close()
            os.replace(self.out_dir / (self.files[-1] + ".tmp"), self.out_dir / self.files[-1])
            self.crc32.append(file_crc32(self.out_dir / self.files[-1]))
            self._writer = None
            self._shard += 1
            self._in_shard = 0

    def close(self) -> dict[str, list[Any]]:
        """Flush, check the row count, and return ``{"files": [...], "rows": [...]}``."""
        self._drain(final=True)
        if self._shard != len(self.sizes):
            raise DataError(
                f"split {self.split!r}: wrote {sum(self.sizes[: self._shard]) + self._in_shard} "
                f"rows, expected {sum(self.sizes)}"
            )
        return {"files": list(self.files), "rows": list(self.sizes), "crc32": list(self.crc32)}



def write_table_splits(
    out_dir: str | os.PathLike[str],
    table: pa.Table,
    codes: npt.NDArray[np.int8],
    names: Sequence[str],
    shards: int,
    row_group_size: int,
    label_columns: Sequence[str],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write an in-memory table's rows to their splits (``codes[i]`` indexes ``names``).

    Args:
        out_dir: the shard folder.
        table: all rows.
        codes: split index of every row.
        names: split names.
        shards: files per split.
        row_group_size: rows per row group.
        label_columns: 0/1 columns whose positives are counted into the stats.

    Returns:
        ``(splits, stats)`` for schema.json: split -> files/rows, and split -> row and positive
        counts.
    """
    splits: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    for i, name in enumerate(names):
        idx = np.flatnonzero(codes == i)
        writer = SplitWriter(out_dir, name, len(idx), shards, table.schema, row_group_size)
        part = table.take(pa.array(idx))
        writer.write(part)
        splits[name] = writer.close()
        stats[name] = {
            "rows": len(idx),
            **{
                f"{c}_positives": int(np.asarray(part.column(c).to_numpy(), dtype=np.int64).sum())
                for c in label_columns
            },
        }
    return splits, stats


def _old_shards(out: Path) -> list[Path]:
    old = [out / SCHEMA_FILE] if (out / SCHEMA_FILE).exists() else []
    return old + sorted(out.glob("*/part-*.parquet"))


def prepare_out_dir(out_dir: str | os.PathLike[str], overwrite: bool) -> Path:
    """Create the output folder; refuse a folder that already holds shards unless ``overwrite``.

    With ``overwrite`` the previous ``schema.json`` and ``*/part-*.parquet`` files are removed
    (nothing else). Writers that may fail should use :func:`staged_out_dir` instead, which
    leaves nothing behind on failure.
    """
    out = Path(out_dir)
    old = _old_shards(out)
    if old and not overwrite:
        raise DataError(f"{out}: already holds shards ({old[0].name}, ...); pass --overwrite")
    for p in old:
        p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


@contextlib.contextmanager
def staged_out_dir(out_dir: str | os.PathLike[str], overwrite: bool) -> Iterator[Path]:
    """Write a shard folder all-or-nothing: yield a staging folder, publish it on success.

    The refusal of a folder that already holds shards (without ``overwrite``) happens at once,
    before anything is read or written. The body writes into a hidden sibling folder
    ``.<out>.staging-<pid>``; when it returns, the previous shards of ``out_dir`` (``schema.json``
    and ``*/part-*.parquet``, with ``overwrite``) are removed and the staged files are moved in,
    ``schema.json`` last. When the body raises, the staging folder and any parent folder
    created for it are removed: a failed conversion leaves no ``--out`` folder and keeps the
    previous shards.

    Args:
        out_dir: the final shard folder.
        overwrite: replace shards already in ``out_dir``.

    Yields:
        The staging folder to write into.
    """
    out = Path(out_dir)
    old = _old_shards(out)
    if old and not overwrite:
        raise DataError(f"{out}: already holds shards ({old[0].name}, ...); pass --overwrite")
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder")
    created = out.parent
    while not created.parent.exists() and created.parent != created:
        created = created.parent
    first_missing = None if out.parent.exists() else created
    stage = out.parent / f".{out.name}.staging-{os.getpid()}"
    try:
        stage.mkdir(parents=True, exist_ok=False)
    except OSError as e:
        raise DataError(f"{out}: cannot create the staging folder {stage}: {e}") from e
    try:
        yield stage
        if not out.exists():
            os.replace(stage, out)
            return
        for p in _old_shards(out):
            p.unlink()
        schema = stage / SCHEMA_FILE
        for entry in sorted(stage.iterdir()):
            if entry == schema:
                continue
            target = out / entry.name
            if entry.is_dir() and target.is_dir():
                for f in sorted(entry.iterdir()):
                    os.replace(f, target / f.name)
            else:
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                os.replace(entry, target)
        if schema.exists():
            os.replace(schema, out / SCHEMA_FILE)
        shutil.rmtree(stage, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if first_missing is not None:
            shutil.rmtree(first_missing, ignore_errors=True)
        raise


def file_sources(paths: Sequence[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """``[{"path": ..., "bytes": ...}]`` for schema.json's ``sources``."""
    return [{"path": str(Path(p).resolve()), "bytes": Path(p).stat().st_size} for p in paths]
