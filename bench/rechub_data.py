"""The data half of the torch-rechub peer reference (``bench/rechub_reference.py``).

Argument parsing, ``schema.json``, the Parquet shards of ``mptrec data convert --format census``
read into arrays (rows in file order, ids checked against each vocabulary) and atomic writes of
the results and predictions. Only numpy and pyarrow, so tests can import it without torch-rechub,
and no ``mptrec`` import: the reference runs as a script in its own venv
(``scripts/rechub_env.sh``), where this file is ``bench.rechub_data``.
``mptrec.bench.rechub_reference`` re-exports every name.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

MODELS = ("shared_bottom", "mmoe", "ple", "single_income", "single_marital", "single_education")
# single-task models: the label each one learns
SINGLE_TASK_LABEL = {
    "single_income": "income",
    "single_marital": "marital",
    "single_education": "education_label",
}
# Multi-task models learn T1 income + T2 marital (the paper's Table 2 stage 1, as in
# configs/census_pretrain.toml and rechub's own examples/ranking/run_census.py); --tasks changes it.
DEFAULT_TASKS = ("income", "marital")
SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Feature:
    """One input column of the converted data (``schema.json`` ``features`` entry)."""

    name: str
    column: str
    kind: str  # "dense" or "sparse"
    vocab: int | None = None  # number of ids of a sparse feature


@dataclass
class SplitArrays:
    """One split as arrays: inputs by feature name, labels by label column, in file order."""

    x: dict[str, np.ndarray]
    y: dict[str, np.ndarray]
    rows: int


# --------------------------------------------------------------------------- arguments


def _names(values: Sequence[str] | None) -> list[str]:
    """Flatten ``["a,b", "c"]`` into ``["a", "b", "c"]`` (both spellings are accepted)."""
    out: list[str] = []
    for v in values or ():
        out += [s.strip() for s in v.split(",") if s.strip()]
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="torch-rechub 0.9.0 reference: Census-income AUC on mptrec's converted splits.")
    p.add_argument("--data", required=True, type=Path,
                   help="folder from `mptrec data convert --format census` (schema.json, train/valid/test)")
    p.add_argument("--seed", required=True, type=int, help="seeds torch, numpy, random and the shuffling")
    p.add_argument("--models", nargs="+", default=[",".join(MODELS)],
                   help=f"comma- or space-separated subset of {','.join(MODELS)} (default: all)")
    p.add_argument("--tasks", nargs="+", default=[",".join(DEFAULT_TASKS)],
                   help="label columns of the multi-task models (default: income,marital)")
    p.add_argument("--exclude", nargs="*", default=[], help="feature names to drop, e.g. education")
    p.add_argument("--out", required=True, type=Path, help="result JSON (written atomically)")
    p.add_argument("--predictions", type=Path, default=None,
                   help="folder for per-model test predictions, MODEL.parquet: row + one column per task")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--patience", type=int, default=5,
                   help="stop after this many epochs without a better validation AUC sum")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4,
                   help="Adam weight decay (1e-4: rechub's examples/ranking/run_census.py default)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and normalise the arguments (list options flattened and checked)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.models = _names(args.models)
    args.tasks = _names(args.tasks)
    args.exclude = _names(args.exclude)
    bad = [m for m in args.models if m not in MODELS]
    if bad or not args.models:
        parser.error(f"--models: unknown {bad or 'empty list'}; choose from {', '.join(MODELS)}")
    if len(set(args.models)) != len(args.models):
        parser.error(f"--models: repeated name in {args.models}")
    if not args.tasks or len(set(args.tasks)) != len(args.tasks):
        parser.error(f"--tasks: need distinct label names, got {args.tasks}")
    for name in ("epochs", "patience", "batch_size", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


# --------------------------------------------------------------------------- data


def load_schema(data: Path) -> dict[str, Any]:
    path = Path(data) / "schema.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --data must be a folder made by `mptrec data convert`")
    return json.loads(path.read_text())


def select_features(schema: dict[str, Any], exclude: Sequence[str] = ()) -> list[Feature]:
    """The schema's input features in schema order, minus ``exclude`` (each must exist)."""
    feats = []
    for f in schema["features"]:
        kind = f["kind"]
        if kind not in ("dense", "sparse"):
            raise ValueError(f"feature {f['name']!r}: kind {kind!r} is not supported (dense or sparse)")
        if kind == "sparse" and f.get("multivalent", False):
            raise ValueError(f"feature {f['name']!r}: multivalent sparse features are not supported")
        vocab = int(f["num_embeddings"]) if kind == "sparse" else None
        feats.append(Feature(f["name"], f.get("column", f["name"]), kind, vocab))
    unknown = sorted(set(exclude) - {f.name for f in feats})
    if unknown:
        raise ValueError(f"--exclude: unknown feature(s) {unknown}; features are {[f.name for f in feats]}")
    kept = [f for f in feats if f.name not in set(exclude)]
    if not kept:
        raise ValueError("no input feature left after --exclude")
    return kept


def check_labels(schema: dict[str, Any], labels: Sequence[str]) -> None:
    """Each label must be a binary label column of the schema."""
    declared = schema.get("labels", {})
    for name in labels:
        if name not in declared:
            raise ValueError(f"label {name!r} not in schema labels {sorted(declared)}")
        values = declared[name].get("values")
        if values is not None and sorted(values) != [0, 1]:
            raise ValueError(f"label {name!r} is not binary (values {values})")


def split_files(data: Path, schema: dict[str, Any], split: str) -> list[Path]:
    """The split's Parquet shards in the order the schema lists them (that order defines ``row``)."""
    entry = schema.get("splits", {}).get(split)
    if entry and entry.get("files"):
        files = [Path(data) / f for f in entry["files"]]
    else:
        files = sorted((Path(data) / split).glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no Parquet files for split {split!r} under {data}")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"split {split!r}: missing {missing}")
    return files


def read_split(data: Path, schema: dict[str, Any], split: str, features: Sequence[Feature],
               labels: Sequence[str]) -> SplitArrays:
    """Read one split into arrays: dense float32, sparse int64 ids (checked against the
    vocabulary), labels float32 0/1; rows in file order."""
    columns = [f.column for f in features] + list(labels)
    tables = []
    for path in split_files(data, schema, split):
        names = set(pq.read_schema(path).names)
        missing = [c for c in columns if c not in names]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}")
        tables.append(pq.read_table(path, columns=columns))
    table = pa.concat_tables(tables)
    x: dict[str, np.ndarray] = {}
    for f in features:
        col = table.column(f.column)
        if col.null_count:
            raise ValueError(f"{split}: column {f.column!r} has {col.null_count} nulls")
        arr = col.to_numpy()
        if f.kind == "dense":
            x[f.name] = np.array(arr, dtype=np.float32)  # a writable copy of the Arrow buffer
        else:
            ids = np.array(arr, dtype=np.int64)
            if ids.size and (ids.min() < 0 or ids.max() >= (f.vocab or 0)):
                raise ValueError(f"{split}: feature {f.name!r} has ids in [{ids.min()}, {ids.max()}], "
                                 f"outside its vocabulary of {f.vocab}")
            x[f.name] = ids
    y: dict[str, np.ndarray] = {}
    for name in labels:
        arr = np.asarray(table.column(name).to_numpy(), dtype=np.float32)
        if not np.isin(arr, (0.0, 1.0)).all():
            raise ValueError(f"{split}: label {name!r} has values other than 0/1")
        y[name] = arr
    return SplitArrays(x=x, y=y, rows=table.num_rows)


def read_data(data: Path, schema: dict[str, Any], features: Sequence[Feature],
              labels: Sequence[str]) -> dict[str, SplitArrays]:
    return {s: read_split(data, schema, s, features, labels) for s in SPLITS}


# --------------------------------------------------------------------------- outputs


def write_json_atomic(path: Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def write_predictions(path: Path, probs: dict[str, np.ndarray]) -> None:
    """Test predictions as Parquet: ``row`` (position in the test split, file order) and one
    probability column per task, written to a temp file then renamed into place."""
    path = Path(path)
    n = len(next(iter(probs.values())))
    cols = {"row": pa.array(np.arange(n, dtype=np.int64))}
    for task, p in probs.items():
        if len(p) != n:
            raise ValueError(f"predictions of {task!r}: {len(p)} rows, expected {n}")
        cols[task] = pa.array(np.asarray(p, dtype=np.float64))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(pa.table(cols), tmp)
    os.replace(tmp, path)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
