"""Tiny generated shards for the training tests (and tests that the loop's batch count is right).

`write_tiny_shards` writes a shard folder in the project's layout (schema.json + Parquet row
groups of 64 rows, 2 files per split) from a planted model, so AUCs are well above 0.5:
dense d0, d1; sparse f0 (20 ids), f1 (30), f2 (8); multi-valued m0 (12 ids, 1-3 per row);
labels click and purchase (0/1 int8). Deterministic for a given seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from mptrec.data_loaders.dataset import ShardDataset
from mptrec.data_loaders.layout import read_schema, write_schema
from mptrec.data_loaders.schema import LabelSpec
from mptrec.data_loaders.shard_writer import write_table_splits
from mptrec.pipeline.build import resolve_run_features
from mptrec.pipeline.config import RunConfig, load_config
from mptrec.pipeline.train.pretrain import count_batches

REPO = Path(__file__).resolve().parents[3]
DEBUG_TOML = REPO / "configs" / "debug.toml"
VOCAB = {"f0": 20, "f1": 30, "f2": 8, "m0": 12}


def write_tiny_shards(out: Path, rows: dict[str, int] | None = None, seed: int = 0,
                      row_group_size: int = 64) -> Path:
    rows = rows or {"train": 640, "valid": 256, "test": 128}
    rng = np.random.default_rng(seed)
    n = sum(rows.values())
    w = {k: rng.normal(0, 1, v) for k, v in VOCAB.items()}
    ids = {k: rng.integers(0, v, n) for k, v in VOCAB.items() if k != "m0"}
    m_len = rng.integers(1, 4, n)
    m_vals = rng.integers(0, VOCAB["m0"], int(m_len.sum()))
    m_sum = np.add.reduceat(w["m0"][m_vals], np.concatenate([[0], np.cumsum(m_len)[:-1]]))
    d0, d1 = rng.random(n).astype(np.float32), rng.random(n).astype(np.float32)
    click_logit = 1.5 * (w["f0"][ids["f0"]] + w["f1"][ids["f1"]]) + 0.5 * m_sum + d0 - 0.5
    buy_logit = 1.5 * w["f2"][ids["f2"]] + 1.0 * w["f0"][ids["f0"]] + d1 - 1.5
    click = (rng.random(n) < 1 / (1 + np.exp(-click_logit))).astype(np.int8)
    buy = (rng.random(n) < 1 / (1 + np.exp(-buy_logit))).astype(np.int8)
    offsets = np.concatenate([[0], np.cumsum(m_len)]).astype(np.int32)
    table = pa.table({
        "d0": pa.array(d0), "d1": pa.array(d1),
        "f0": pa.array(ids["f0"], pa.int64()), "f1": pa.array(ids["f1"], pa.int64()),
        "f2": pa.array(ids["f2"], pa.int64()),
        "m0": pa.ListArray.from_arrays(pa.array(offsets), pa.array(m_vals, pa.int64())),
        "click": pa.array(click), "purchase": pa.array(buy),
    })
    names = list(rows)
    codes = np.concatenate([np.full(rows[s], i, dtype=np.int8) for i, s in enumerate(names)])
    out.mkdir(parents=True, exist_ok=True)
    splits, stats = write_table_splits(out, table, codes, names, shards=2, row_group_size=row_group_size,
                                       label_columns=["click", "purchase"])
    features: list[dict[str, Any]] = [{"name": "d0", "kind": "dense"}, {"name": "d1", "kind": "dense"}]
    features += [{"name": k, "kind": "sparse", "num_embeddings": v, "multivalent": k == "m0"}
                 for k, v in VOCAB.items()]
    write_schema(out, {"dataset": "tiny", "version": 1, "features": features,
                       "labels": {"click": {"values": [0, 1]}, "purchase": {"values": [0, 1]}},
                       "splits": splits, "stats": stats, "sources": [], "notes": "tests: planted model"})
    return out


def debug_config(data: Path, out: Path, *overrides: str) -> RunConfig:
    return load_config(DEBUG_TOML, [f"data.path={str(data)!r}", f"out_dir={str(out)!r}", *overrides])


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    return write_tiny_shards(tmp_path / "data")


@pytest.mark.parametrize(("world_size", "workers"), [(1, 0), (2, 0), (3, 0), (2, 2)])
def test_count_batches_matches_the_dataset(tiny_data: Path, tmp_path: Path, world_size: int,
                                           workers: int) -> None:
    cfg = debug_config(tiny_data, tmp_path / "run")
    features = resolve_run_features(cfg, read_schema(tiny_data))
    labels = [LabelSpec("click", "click"), LabelSpec("purchase", "purchase")]
    for rank in range(world_size):
        ds = ShardDataset(tiny_data, "train", features=features, labels=labels, batch_size=48, rank=rank,
                          world_size=world_size, shuffle=True, seed=3)
        for epoch in (0, 1):
            ds.set_epoch(epoch)
            if workers:  # each worker reads its own row groups: emulate the workers one by one
                expected = 0
                for w in range(workers):
                    sub = ShardDataset(tiny_data, "train", features=features, labels=labels, batch_size=48,
                                       rank=rank * workers + w, world_size=world_size * workers,
                                       shuffle=True, seed=3)
                    sub.set_epoch(epoch)
                    expected += sum(1 for _ in sub)
            else:
                expected = sum(1 for _ in ds)
            assert count_batches(ds, epoch, workers) == expected
