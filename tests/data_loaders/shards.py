"""Tiny hand-made shard folders for the loader tests (bad data on purpose, no checks)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def tiny_table(n: int, start: int = 0, seed: int = 0) -> pa.Table:
    """Rows of a small schema: dense x, sparse f (ids < 10), list g (ids < 5), labels y and s."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(0, 3, n)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    return pa.table(
        {
            "x": pa.array(np.arange(start, start + n, dtype=np.float32)),
            "f": pa.array(rng.integers(0, 10, n), pa.int64()),
            "g": pa.ListArray.from_arrays(
                pa.array(offsets), pa.array(rng.integers(0, 5, int(lens.sum())), pa.int64())
            ),
            "y": pa.array(rng.integers(0, 2, n), pa.int8()),
            "s": pa.array(rng.integers(1, 4, n), pa.int64()),
        }
    )


TINY_FEATURES: list[dict[str, Any]] = [
    {"name": "x", "column": "x", "kind": "dense"},
    {"name": "f", "column": "f", "kind": "sparse", "num_embeddings": 10, "multivalent": False},
    {"name": "g", "column": "g", "kind": "sparse", "num_embeddings": 5, "multivalent": True},
]


def write_tiny(
    root: Path,
    tables: list[pa.Table],
    row_group_size: int = 10,
    split: str = "train",
    features: list[dict[str, Any]] | None = None,
) -> Path:
    """A shard folder with one file per table (no checks: tests write bad data on purpose)."""
    (root / split).mkdir(parents=True, exist_ok=True)
    files = []
    for i, t in enumerate(tables):
        name = f"{split}/part-{i:05d}.parquet"
        pq.write_table(t, root / name, row_group_size=row_group_size)
        files.append(name)
    schema = {
        "dataset": "tiny",
        "version": 1,
        "features": features or TINY_FEATURES,
        "labels": {"y": {"values": [0, 1]}, "s": {"values": [1, 2, 3]}},
        "splits": {split: {"files": files, "rows": [t.num_rows for t in tables]}},
    }
    (root / "schema.json").write_text(json.dumps(schema))
    return root
