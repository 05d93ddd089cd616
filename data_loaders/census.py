"""Census-Income (KDD) UCI line format -> Parquet shards.

All quirks of the file format stay here: ``", "`` separators, values with leading/trailing
spaces (stripped), ``?`` as missing, gzip or plain text.

Decisions (also written to schema.json ``notes``):

* Inputs: the 29 categorical fields of keras-mmoe (``education`` included) as sparse features
  and 11 dense fields (``instance_weight`` included, as the paper's code; a switch drops it),
  so D_in = 11 + 29 * 4 = 127 (126 without ``instance_weight``). ``marital_stat`` and
  ``income_50k`` are label sources and are not inputs. This is exactly the split of the paper's
  ``multitaskrec/data_preprocessing/CensusIncome_process.py`` (BAI-LAB/MPTRec): its 29
  ``sparse_features`` and, as dense, every other column but the two labels. Differences: it
  fits LabelEncoder/MinMaxScaler on each file separately and keeps ``?`` as a category; here
  both are fitted on the training split only and ``?`` is id 0.
* Labels: ``income`` (income_50k == "50000+."), ``marital`` (marital_stat == "Never married"),
  ``education_label`` (education == "Bachelors degree(BA AB BS)"); the ``education`` feature
  column is declared as a label source too (values = its ids) for multi-class or other
  binarisations.
* Categorical ids: fitted on the training split only; ``?`` and values unseen in training map
  to 0. Dense: min-max scaled with the training split's min and max (not clipped, so other
  splits may leave [0, 1]; a constant column becomes 0).
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
from tqdm import tqdm

from mptrec.data_loaders.layout import DEFAULT_ROW_GROUP_SIZE, SCHEMA_VERSION, assign_splits, write_schema
from mptrec.data_loaders.schema import CENSUS_COLUMNS, CENSUS_DENSE, CENSUS_LABELS, CENSUS_SPARSE, DataError
from mptrec.data_loaders.shard_writer import file_sources, staged_out_dir, write_table_splits
from mptrec.data_loaders.vocab import Vocabulary

INCOME_POSITIVE, INCOME_NEGATIVE = "50000+.", "- 50000."
MARITAL_POSITIVE = "Never married"
EDUCATION_POSITIVE = "Bachelors degree(BA AB BS)"
MISSING = "?"


def read_census(path: str | os.PathLike[str]) -> dict[str, npt.NDArray[np.object_]]:
    """Read one UCI Census-Income file (``.gz`` or plain) into stripped string columns.

    Args:
        path: the file.

    Returns:
        Column name (:data:`CENSUS_COLUMNS`) -> object array of stripped strings.

    Raises:
        DataError: a line without 42 fields, naming the file and line.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    rows: list[list[str]] = []
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                parts = [p.strip() for p in line.rstrip("\n").split(",")]
                if len(parts) != len(CENSUS_COLUMNS):
                    raise DataError(f"{path}:{lineno}: {len(parts)} fields, expected {len(CENSUS_COLUMNS)}")
                rows.append(parts)
    except (OSError, UnicodeDecodeError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read: {e}") from e
    if not rows:
        raise DataError(f"{path}: no data rows")
    cols = np.array(rows, dtype=object).T
    return {name: cols[i] for i, name in enumerate(CENSUS_COLUMNS)}


def _dense(values: npt.NDArray[np.object_], column: str, where: Sequence[str]) -> npt.NDArray[np.float64]:
    try:
        return values.astype(np.float64)
    except ValueError:
        for i, v in enumerate(values):
            try:
                float(v)
            except ValueError:
                raise DataError(f"{where[i]}: column {column!r}: value {v!r} is not a number") from None
        raise


def _labels(
    cols: dict[str, npt.NDArray[np.object_]], where: Sequence[str]
) -> dict[str, npt.NDArray[np.int8]]:
    income = cols["income_50k"]
    bad = np.flatnonzero((income != INCOME_POSITIVE) & (income != INCOME_NEGATIVE))
    if bad.size:
        i = int(bad[0])
        raise DataError(
            f"{where[i]}: column 'income_50k': value {income[i]!r} is neither "
            f"{INCOME_POSITIVE!r} nor {INCOME_NEGATIVE!r}"
        )
    return {
        "income": (income == INCOME_POSITIVE).astype(np.int8),
        "marital": (cols["marital_stat"] == MARITAL_POSITIVE).astype(np.int8),
        "education_label": (cols["education"] == EDUCATION_POSITIVE).astype(np.int8),
    }


def _load_pool(paths: Sequence[str | os.PathLike[str]]) -> tuple[dict[str, npt.NDArray[Any]], list[str]]:
    parts = [read_census(p) for p in tqdm(paths, desc="census: read", unit="file", disable=len(paths) < 2)]
    cols = {c: np.concatenate([p[c] for p in parts]) for c in CENSUS_COLUMNS}
    where = [f"{path}:{i + 1}" for path, p in zip(paths, parts) for i in range(len(p["age"]))]
    return cols, where


def _features(dense_cols: Sequence[str], vocab: Vocabulary) -> list[dict[str, Any]]:
    """schema.json ``features``: the dense columns first, then the sparse ones."""
    sparse = [
        {
            "name": c,
            "column": c,
            "kind": "sparse",
            "num_embeddings": vocab.num_embeddings(c),
            "multivalent": False,
        }
        for c in CENSUS_SPARSE
    ]
    return [{"name": c, "column": c, "kind": "dense"} for c in dense_cols] + sparse


def _encode(
    cols: dict[str, npt.NDArray[Any]],
    where: Sequence[str],
    train: npt.NDArray[np.bool_],
    dense_cols: Sequence[str],
) -> tuple[dict[str, Any], Vocabulary, dict[str, list[float]]]:
    """Columns -> arrays: ids from a train-only vocabulary, train min-max scaling, labels."""
    vocab = Vocabulary.fit({c: Counter(cols[c][train].tolist()) for c in CENSUS_SPARSE}, exclude=[MISSING])
    arrays: dict[str, Any] = {}
    scaling: dict[str, list[float]] = {}
    for c in dense_cols:
        x = _dense(cols[c], c, where)
        lo, hi = float(x[train].min()), float(x[train].max())
        scaling[c] = [lo, hi]
        arrays[c] = ((x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)).astype(np.float32)
    for c in CENSUS_SPARSE:
        uniq, inv = np.unique(cols[c], return_inverse=True)
        arrays[c] = np.array([vocab.encode(c, u) for u in uniq], dtype=np.int64)[inv]
    arrays.update(_labels(cols, where))
    return arrays, vocab, scaling


def convert_census(
    inputs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    split: dict[str, float],
    seed: int,
    shards: int = 1,
    assigned: Sequence[tuple[str, str | os.PathLike[str]]] = (),
    keep_instance_weight: bool = True,
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Convert UCI Census-Income files to shards, with train-only vocabulary and scaling.

    Args:
        inputs: files pooled and split by ``split`` (e.g. census-income.test.dev.data.gz).
        out_dir: output shard folder.
        split: split name -> fraction; must contain ``train``.
        seed: seed of the split permutation.
        shards: files per split.
        assigned: (split, file) pairs whose rows all go to that split (not split by fraction),
            e.g. ``("train", "census-income.data.subset.gz")``; a new split name is allowed.
        keep_instance_weight: keep ``instance_weight`` as a dense input (the paper's code does).
        row_group_size: rows per Parquet row group.
        overwrite: replace shards already in ``out_dir``.

    Returns:
        The schema written to ``out_dir/schema.json``.
    """
    if "train" not in split:
        raise DataError(
            f"--split must contain 'train' (vocabulary and scaling are fitted on it), got {split}"
        )
    if not inputs:
        raise DataError("census: no --input files")
    with staged_out_dir(out_dir, overwrite) as out:
        cols, where = _load_pool(inputs)
        codes = assign_splits(len(where), split, seed)
        names = list(split) + [s for s, _ in assigned if s not in split]
        for name, path in assigned:
            extra, extra_where = _load_pool([path])
            cols = {c: np.concatenate([cols[c], extra[c]]) for c in CENSUS_COLUMNS}
            where += extra_where
            codes = np.concatenate([codes, np.full(len(extra_where), names.index(name), np.int8)])
        dense_cols = [c for c in CENSUS_DENSE if keep_instance_weight or c != "instance_weight"]
        arrays, vocab, scaling = _encode(cols, where, codes == names.index("train"), dense_cols)
        table = pa.table(arrays)
        splits_meta, stats = write_table_splits(
            out, table, codes, names, shards, row_group_size, CENSUS_LABELS
        )
        vocab.save(out, extra={"dense_min_max": scaling})
        schema = {
            "dataset": "census",
            "version": SCHEMA_VERSION,
            "features": _features(dense_cols, vocab),
            "labels": {
                "income": {"values": [0, 1]},
                "marital": {"values": [0, 1]},
                "education_label": {"values": [0, 1]},
                "education": {"values": list(range(vocab.num_embeddings("education")))},
            },
            "splits": splits_meta,
            "stats": stats,
            "sources": file_sources(list(inputs) + [p for _, p in assigned]),
            "split_spec": {"fractions": split, "seed": seed, "assigned": [[s, str(p)] for s, p in assigned]},
            "vocab_file": "vocab.json",
            "dense_min_max": scaling,
            "notes": _NOTES + ("" if keep_instance_weight else " instance_weight DROPPED (D_in 126)."),
        }
        write_schema(out, schema)
        return schema

_NOTES = (
    "Census-Income (KDD). Inputs: 11 dense (min-max on train; instance_weight kept as in the "
    "paper's code, D_in = 11 + 29*4 = 127) and the 29 keras-mmoe categorical fields (ids fitted on "
    "the train split only; '?' and unseen values -> 0); the same 11/29 split as the paper's "
    "CensusIncome_process.py. marital_stat and income_50k are label "
    "sources only, never inputs. Labels: income = income_50k == '50000+.', marital = marital_stat "
    "== 'Never married', education_label = education == 'Bachelors degree(BA AB BS)'; the "
    "education feature is also declared as a label source (its ids) and must be excluded from the "
    "inputs of T3 runs (D_in 123)."
)
