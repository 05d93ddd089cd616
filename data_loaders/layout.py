"""The shard layout on disk: ``schema.json`` reading and writing, splits, and the shard writer.

No torch here. Layout (see :mod:`mptrec.data_loaders.schema`)::

    DIR/schema.json
    DIR/{train,valid,test}/part-00000.parquet ...

Example:
    >>> spec = parse_split_spec("train=0.8,valid=0.1,test=0.1")
    >>> assign_splits(10, spec, seed=0).tolist().count(0)
    8
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq

from mptrec.data_loaders.schema import DataError, FeatureSpec
from mptrec.io import atomic_write_json, read_json

SCHEMA_FILE = "schema.json"
SCHEMA_VERSION = 1
#: Rows per Parquet row group written by the converters and the generator: small enough that a
#: split of ~70k rows (Census train) has several, which the ranks and DataLoader workers share
#: and a shuffled epoch permutes (the loader's unit of work), large enough to read fast.
DEFAULT_ROW_GROUP_SIZE = 16_384
_SPLIT_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


# --------------------------------------------------------------------------------------------
# schema.json
# --------------------------------------------------------------------------------------------


def write_schema(data_dir: str | os.PathLike[str], schema: Mapping[str, Any]) -> Path:
    """Write ``DIR/schema.json`` atomically (:func:`mptrec.io.atomic_write_json`).

    Args:
        data_dir: the shard folder.
        schema: the schema object (see the module docstring of ``schema.py``).

    Returns:
        The path written.
    """
    return atomic_write_json(Path(data_dir) / SCHEMA_FILE, schema, indent=1, sort_keys=False)


def _require(cond: bool, path: Path, what: str) -> None:
    if not cond:
        raise DataError(f"{path}: invalid schema: {what}")


def _check_features(features: list[Any], path: Path) -> None:
    names: set[str] = set()
    for i, f in enumerate(features):
        _require(isinstance(f, dict) and isinstance(f.get("name"), str), path, f"features[{i}] has no name")
        _require(f["name"] not in names, path, f"feature {f['name']!r} declared twice")
        names.add(f["name"])
        f.setdefault("column", f["name"])
        kind = f.get("kind")
        _require(
            kind in ("sparse", "dense"),
            path,
            f"feature {f['name']!r}: kind {kind!r} is not 'sparse' or 'dense'",
        )
        if kind == "sparse":
            n = f.get("num_embeddings")
            _require(
                isinstance(n, int) and n > 0,
                path,
                f"feature {f['name']!r}: num_embeddings {n!r} is not a positive int",
            )
            f.setdefault("multivalent", False)


def _check_labels_and_splits(schema: dict[str, Any], path: Path, data_dir: Path) -> None:
    for col, spec in schema["labels"].items():
        vals = spec.get("values") if isinstance(spec, dict) else None
        ok = isinstance(vals, list) and bool(vals) and all(isinstance(v, int) for v in vals)
        _require(ok, path, f"label column {col!r}: 'values' must be a non-empty list of ints")
    for split, spec in schema["splits"].items():
        ok = (
            isinstance(spec, dict)
            and isinstance(spec.get("files"), list)
            and isinstance(spec.get("rows"), list)
        )
        _require(ok, path, f"split {split!r} needs lists 'files' and 'rows'")
        _require(
            len(spec["files"]) == len(spec["rows"]), path, f"split {split!r}: files and rows differ in length"
        )
        for f in spec["files"]:
            _require((data_dir / f).is_file(), path, f"split {split!r}: shard file {f} does not exist")


def read_schema(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate ``DIR/schema.json``.

    Args:
        data_dir: the shard folder.

    Returns:
        The schema object.

    Raises:
        DataError: naming the file and the problem (missing file, bad JSON, missing keys, a
            shard file listed but absent, ...).
    """
    path = Path(data_dir) / SCHEMA_FILE
    schema = read_json(path, DataError,
                       f"{path}: no schema.json (not a shard folder written by `mptrec data`)")
    _require(isinstance(schema, dict), path, "top level is not an object")
    _require(
        schema.get("version") == SCHEMA_VERSION,
        path,
        f"version {schema.get('version')!r}, expected {SCHEMA_VERSION}",
    )
    for key, kind in (("dataset", str), ("features", list), ("labels", dict), ("splits", dict)):
        _require(isinstance(schema.get(key), kind), path, f"key {key!r} missing or not a {kind.__name__}")
    _check_features(schema["features"], path)
    _check_labels_and_splits(schema, path, Path(data_dir))
    return dict(schema)


def resolve_features(
    schema: Mapping[str, Any],
    *,
    embedding_dim: int,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    use_dense: bool = True,
    overrides: Mapping[str, tuple[int, int]] | None = None,
) -> list[FeatureSpec]:
    """Turn the schema's feature declarations into :class:`FeatureSpec` s.

    Args:
        schema: from :func:`read_schema`.
        embedding_dim: default embedding width of sparse features.
        include: feature names to use (empty: all).
        exclude: feature names to drop.
        use_dense: keep dense features.
        overrides: feature name -> (embedding_dim, num_embeddings); 0 keeps the default.

    Returns:
        Dense features first, then sparse ones, each group in schema order. Multi-valued
        features pool with ``mean``, single-valued ones with ``sum``.

    Raises:
        DataError: an unknown name in ``include``, ``exclude`` or ``overrides``.
    """
    overrides = dict(overrides or {})
    declared = [f["name"] for f in schema["features"]]
    for what, names in (("include", include), ("exclude", exclude), ("overrides", list(overrides))):
        unknown = sorted(set(names) - set(declared))
        if unknown:
            raise DataError(f"{what}: unknown feature(s) {unknown}; the schema declares {declared}")
    chosen = [
        f for f in schema["features"] if (not include or f["name"] in include) and f["name"] not in exclude
    ]
    dense = [
        FeatureSpec(name=f["name"], column=f.get("column", f["name"]), kind="dense")
        for f in chosen
        if f["kind"] == "dense" and use_dense
    ]
    sparse = []
    for f in chosen:
        if f["kind"] != "sparse":
            continue
        dim, num = overrides.get(f["name"], (0, 0))
        multi = bool(f.get("multivalent", False))
        sparse.append(
            FeatureSpec(
                name=f["name"],
                column=f.get("column", f["name"]),
                kind="sparse",
                num_embeddings=num or int(f["num_embeddings"]),
                embedding_dim=dim or embedding_dim,
                multivalent=multi,
                pooling="mean" if multi else "sum",
            )
        )
    return dense + sparse


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


def parse_split_spec(text: str) -> dict[str, float]:
    """Parse ``"train=0.8,valid=0.1,test=0.1"`` (fractions summing to 1).

    Args:
        text: comma-separated ``name=fraction`` items.

    Returns:
        Split name -> fraction, in the given order.

    Raises:
        DataError: a malformed item, a bad name, a repeated name, a negative fraction or a sum
            other than 1.
    """
    out: dict[str, float] = {}
    for item in text.split(","):
        name, sep, value = item.strip().partition("=")
        if not sep or not _SPLIT_NAME.match(name):
            raise DataError(f"--split: bad item {item!r} (expected name=fraction, name like 'train')")
        if name in out:
            raise DataError(f"--split: split {name!r} given twice in {text!r}")
        try:
            frac = float(value)
        except ValueError as e:
            raise DataError(f"--split: fraction {value!r} of {name!r} is not a number") from e
        if not 0.0 <= frac <= 1.0:
            raise DataError(f"--split: fraction {frac} of {name!r} is outside [0, 1]")
        out[name] = frac
    if abs(sum(out.values()) - 1.0) > 1e-6:
        raise DataError(f"--split: fractions of {text!r} sum to {sum(out.values())}, not 1")
    return out


def split_bounds(n: int, fractions: Mapping[str, float]) -> list[int]:
    """Cumulative row bounds of each split: split i gets ``bounds[i+1] - bounds[i]`` rows."""
    cum = np.cumsum([0.0, *fractions.values()])
    bounds = [int(round(c * n)) for c in cum]
    bounds[-1] = n
    return bounds


def assign_splits(n: int, fractions: Mapping[str, float], seed: int) -> npt.NDArray[np.int8]:
    """Deterministically assign each of ``n`` rows to a split (exact counts).

    Args:
        n: number of rows.
        fractions: from :func:`parse_split_spec`.
        seed: seed of the permutation.

    Returns:
        int8 array of split indices (in the order of ``fractions``), one per row.
    """
    perm = np.random.default_rng(seed).permutation(n)
    codes = np.empty(n, dtype=np.int8)
    bounds = split_bounds(n, fractions)
    for i in range(len(fractions)):
        codes[perm[bounds[i] : bounds[i + 1]]] = i
    return codes


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------


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


def file_crc32(path: str | os.PathLike[str]) -> int:
    """CRC-32 of a file's bytes (recorded per shard in schema.json ``splits.<split>.crc32``)."""
    crc = 0
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            crc = zlib.crc32(block, crc)
    return crc


def verify_shard_files(data_dir: str | os.PathLike[str], schema: Mapping[str, Any],
                       splits: Sequence[str]) -> int:
    """Check every shard of ``splits`` against the CRC-32 schema.json records (when it does).

    Run before any Parquet footer is parsed: a damaged footer can abort pyarrow's reader (an
    uncatchable C++ ``terminate``), so a changed file is reported here, by name, instead.

    Returns:
        The number of files checked.

    Raises:
        DataError: naming the file whose bytes are not those written by the converter.
    """
    checked = 0
    for split in splits:
        spec = schema["splits"].get(split)
        crcs = spec.get("crc32") if isinstance(spec, Mapping) else None
        if not isinstance(crcs, list) or len(crcs) != len(spec["files"]):
            continue
        for name, want in zip(spec["files"], crcs):
            path = Path(data_dir) / name
            try:
                got = file_crc32(path)
            except OSError as e:
                raise DataError(f"{path}: cannot read: {e}") from e
            if got != want:
                raise DataError(f"{path}: damaged or changed since it was written (crc32 {got:08x}, "
                                f"schema.json records {int(want):08x}); convert the data again")
            checked += 1
    return checked


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
