"""The shard layout on disk: ``schema.json`` reading and writing, splits, shard checksums.

The shard writer (Parquet files, output folders) is :mod:`mptrec.data_loaders.shard_writer`.
No torch here. Layout (see :mod:`mptrec.data_loaders.schema`)::

    DIR/schema.json
    DIR/{train,valid,test}/part-00000.parquet ...

Example:
    >>> spec = parse_split_spec("train=0.8,valid=0.1,test=0.1")
    >>> assign_splits(10, spec, seed=0).tolist().count(0)
    8
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

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
# Shard checksums
# --------------------------------------------------------------------------------------------


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
