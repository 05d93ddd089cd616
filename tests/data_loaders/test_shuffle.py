"""Row-level shuffling in ``ShardDataset``: rows inside every row group are permuted per epoch.

The orders are checked against ones built here from the dealing rule (``_units_of``) and the
documented seeding (``row_order``), and every batch's content against the files by sample id.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from mptrec.data_loaders.batch import Batch
from mptrec.data_loaders.dataset import ShardDataset, make_dataloader
from mptrec.data_loaders.layout import read_schema, resolve_features
from mptrec.data_loaders.schema import LabelSpec
from tests.data_loaders.shards import tiny_table, write_tiny

TINY_LABELS = [LabelSpec("y", "y"), LabelSpec("s3", "s", (3,))]
ROWS = 300


def _ids(batches: list[Batch]) -> np.ndarray:
    return torch.cat([b.sample_ids for b in batches]).numpy()


@pytest.fixture
def one_group(tmp_path: Path) -> Path:
    """One shard of 300 rows in ONE row group (like the Census training split); ``x`` == row."""
    d = write_tiny(tmp_path, [tiny_table(ROWS, seed=1)], row_group_size=10_000)
    assert pq.ParquetFile(d / "train/part-00000.parquet").metadata.num_row_groups == 1
    return d


def _tiny_ds(d: Path, **kw: object) -> ShardDataset:
    feats = resolve_features(read_schema(d), embedding_dim=4)
    args: dict[str, object] = {"batch_size": 64, "seed": 11}
    args.update(kw)
    return ShardDataset(d, "train", features=feats, labels=TINY_LABELS, **args)  # type: ignore[arg-type]


def _order(d: Path, epoch: int, **kw: object) -> tuple[np.ndarray, list[Batch]]:
    ds = _tiny_ds(d, **kw)
    ds.set_epoch(epoch)
    batches = list(ds)
    return _ids(batches), batches


def _check_tiny_content(batches: list[Batch], truth: pa.Table) -> None:
    """Every row's features and labels are the file's row ``sample_id``."""
    for b in batches:
        ids = b.sample_ids.numpy()
        rows = truth.take(pa.array(ids))
        np.testing.assert_array_equal(b.dense_features[:, 0].numpy(), ids.astype(np.float32))  # x == row
        jt = b.sparse_features.to_dict()
        np.testing.assert_array_equal(jt["f"].values().numpy(), rows.column("f").to_numpy())
        np.testing.assert_array_equal(
            jt["g"].lengths().numpy(), pc.list_value_length(rows.column("g")).to_numpy()
        )
        np.testing.assert_array_equal(jt["g"].values().numpy(), pc.list_flatten(rows.column("g")).to_numpy())
        np.testing.assert_array_equal(b.labels["y"].numpy(), rows.column("y").to_numpy())
        np.testing.assert_array_equal(b.labels["s3"].numpy(), rows.column("s").to_numpy() == 3)


def test_a_single_row_group_is_shuffled_row_by_row_every_epoch(one_group: Path) -> None:
    truth = tiny_table(ROWS, seed=1)
    e0, b0 = _order(one_group, 0, shuffle=True)
    e1, b1 = _order(one_group, 1, shuffle=True)
    for ids, batches in ((e0, b0), (e1, b1)):
        # every row exactly once, in 5 batches of 64 and one of 44
        np.testing.assert_array_equal(np.sort(ids), np.arange(ROWS))
        assert [b.batch_size for b in batches] == [64] * 4 + [44]
        _check_tiny_content(batches, truth)
        assert not np.array_equal(ids, np.arange(ROWS))  # not file order...
        assert np.mean(np.diff(ids) == 1) < 0.05  # ...nor runs of it
        # the first batch draws from the whole row group, not from its first rows
        assert ids[:64].max() > 200 and ids[:64].min() < 100
    assert not np.array_equal(e0, e1)
    assert np.mean(e0 == e1) < 0.05  # a different permutation, not a shifted one


def test_row_order_is_the_same_for_the_same_seed_and_epoch(one_group: Path) -> None:
    a, _ = _order(one_group, 3, shuffle=True)
    b, _ = _order(one_group, 3, shuffle=True)
    np.testing.assert_array_equal(a, b)  # a resumed run re-creates the epoch's batches exactly
    c, _ = _order(one_group, 3, shuffle=True, seed=12)
    assert not np.array_equal(a, c)
    # the order is the documented one: row group 0's permutation seeded by (seed, epoch, file, rg)
    want = np.random.default_rng([11, 3, 0, 0, 2]).permutation(ROWS)
    np.testing.assert_array_equal(a, want)


def test_without_shuffle_rows_come_in_file_order(one_group: Path, tmp_path: Path) -> None:
    for epoch in (0, 1):
        ids, batches = _order(one_group, epoch)
        np.testing.assert_array_equal(ids, np.arange(ROWS))
        _check_tiny_content(batches, tiny_table(ROWS, seed=1))
    # several shards and row groups, smaller than a batch: still file order
    d = write_tiny(
        tmp_path / "many", [tiny_table(95, 0, seed=2), tiny_table(70, 95, seed=3)], row_group_size=20
    )
    ids, batches = _order(d, 1, batch_size=32)
    np.testing.assert_array_equal(ids, np.arange(165))
    _check_tiny_content(batches, pa.concat_tables([tiny_table(95, 0, seed=2), tiny_table(70, 95, seed=3)]))


def _expected_reader_rows(ds: ShardDataset, reader: int, readers: int, epoch: int) -> np.ndarray:
    """Sample ids of one reader in read order, from the dealing rule and ``row_order`` alone."""
    units = ds._units_of(reader, readers, epoch)
    if not units:
        return np.zeros(0, np.int64)
    return np.concatenate([u.first_row + ds.row_order(u, epoch) for u in units])


def _cut(rows: np.ndarray, batch_size: int) -> list[tuple[int, ...]]:
    return [tuple(rows[i : i + batch_size].tolist()) for i in range(0, len(rows), batch_size)]


@pytest.mark.parametrize(
    ("batch_size", "max_rows", "drop_last"), [(7, 0, False), (32, 0, True), (100, 0, False), (32, 133, False)]
)
def test_batches_are_consecutive_cuts_of_the_row_orders(
    tmp_path: Path, batch_size: int, max_rows: int, drop_last: bool
) -> None:
    # row groups of 20 rows (the last of each shard shorter), batches smaller and larger than them
    tables = [tiny_table(95, 0, seed=2), tiny_table(70, 95, seed=3), tiny_table(41, 165, seed=4)]
    d = write_tiny(tmp_path, tables, row_group_size=20)
    truth = pa.concat_tables(tables)
    seen = []
    for world_size in (1, 2):
        for rank in range(world_size):
            ds = _tiny_ds(
                d,
                shuffle=True,
                batch_size=batch_size,
                rank=rank,
                world_size=world_size,
                max_rows=max_rows,
                drop_last=drop_last,
            )
            ds.set_epoch(2)
            batches = list(ds)
            got = [tuple(b.sample_ids.tolist()) for b in batches]
            want = _cut(_expected_reader_rows(ds, rank, world_size, 2), batch_size)
            assert got == (want[:-1] if drop_last and len(want[-1]) < batch_size else want)
            _check_tiny_content(batches, truth)
            assert ds.num_batches(0, 2) == len(batches)
            if world_size == 2:
                seen.append(_ids(batches))
    if not drop_last:
        np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(max_rows or 206))


@pytest.mark.parametrize("max_rows", [0, 133])
def test_shuffle_buffer_mixes_across_row_groups_and_keeps_every_row_once(
    tmp_path: Path, max_rows: int
) -> None:
    tables = [tiny_table(95, 0, seed=2), tiny_table(70, 95, seed=3)]
    d = write_tiny(tmp_path, tables, row_group_size=20)
    n = max_rows or 165
    plain, _ = _order(d, 1, shuffle=True, batch_size=16, max_rows=max_rows)
    ids, batches = _order(d, 1, shuffle=True, batch_size=16, shuffle_buffer=60, max_rows=max_rows)
    np.testing.assert_array_equal(np.sort(ids), np.arange(n))
    _check_tiny_content(batches, pa.concat_tables(tables))
    assert not np.array_equal(ids, plain)
    # without the buffer a batch of 16 spans at most 2 row groups of 20; with it, more
    assert max(len(set(b.sample_ids.numpy() // 20)) for b in batches) > 2
    again, _ = _order(d, 1, shuffle=True, batch_size=16, shuffle_buffer=60, max_rows=max_rows)
    np.testing.assert_array_equal(ids, again)


@pytest.mark.slow  # DataLoader worker processes
def test_two_ranks_two_workers_read_every_row_once_in_the_row_orders(tmp_path: Path) -> None:
    tables = [tiny_table(200, 200 * i, seed=i) for i in range(3)]
    d = write_tiny(tmp_path, tables, row_group_size=45)
    truth = pa.concat_tables(tables)
    seen = []
    for rank in range(2):
        ds = _tiny_ds(d, shuffle=True, batch_size=16, rank=rank, world_size=2)
        ds.set_epoch(1)
        batches = list(make_dataloader(ds, num_workers=2))
        assert len(batches) == ds.num_batches(2)
        _check_tiny_content(batches, truth)
        # each batch is a consecutive cut of one worker's row order (workers interleave batches)
        expected = [c for w in range(2) for c in _cut(_expected_reader_rows(ds, rank * 2 + w, 4, 1), 16)]
        assert sorted(tuple(b.sample_ids.tolist()) for b in batches) == sorted(expected)
        seen.append(_ids(batches))
    ids = np.concatenate(seen)
    np.testing.assert_array_equal(np.sort(ids), np.arange(600))
    assert np.mean(np.diff(ids) == 1) < 0.05
