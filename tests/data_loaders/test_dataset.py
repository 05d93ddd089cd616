from __future__ import annotations

import logging
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
from mptrec.data_loaders.schema import DataError, LabelSpec
from tests.data_loaders.shards import tiny_table, write_tiny

LABELS = [LabelSpec("ctr", "click"), LabelSpec("cvr", "purchase"), LabelSpec("t3", "301", (1, 3))]
TINY_LABELS = [LabelSpec("y", "y"), LabelSpec("s3", "s", (3,))]


def _ds(data_dir: Path, split: str = "train", **kw: object) -> ShardDataset:
    feats = resolve_features(read_schema(data_dir), embedding_dim=4)
    args: dict[str, object] = {"batch_size": 512, "labels": LABELS}
    args.update(kw)
    return ShardDataset(data_dir, split, features=feats, **args)  # type: ignore[arg-type]


def _truth(data_dir: Path, split: str = "train") -> pa.Table:
    schema = read_schema(data_dir)
    return pa.concat_tables([pq.read_table(data_dir / f) for f in schema["splits"][split]["files"]])


def _ids(batches: list[Batch]) -> np.ndarray:
    return torch.cat([b.sample_ids for b in batches]).numpy() if batches else np.zeros(0, np.int64)


def _check_content(batches: list[Batch], truth: pa.Table) -> None:
    for b in batches:
        ids = pa.array(b.sample_ids.numpy())
        rows = truth.take(ids)
        jt = b.sparse_features.to_dict()
        np.testing.assert_array_equal(jt["205"].values().numpy(), rows.column("205").to_numpy())
        np.testing.assert_array_equal(
            jt["210"].lengths().numpy(), pc.list_value_length(rows.column("210")).to_numpy()
        )
        np.testing.assert_array_equal(
            jt["210"].values().numpy(), pc.list_flatten(rows.column("210")).to_numpy()
        )
        np.testing.assert_array_equal(b.labels["ctr"].numpy(), rows.column("click").to_numpy())
        np.testing.assert_array_equal(b.labels["t3"].numpy(), (rows.column("301").to_numpy() != 2))


@pytest.mark.slow  # DataLoader worker processes
@pytest.mark.parametrize(("shuffle", "buffer"), [(False, 0), (True, 0), (True, 3000)])
def test_every_row_once_across_two_ranks_and_two_workers(synth_dir: Path, shuffle: bool, buffer: int) -> None:
    truth = _truth(synth_dir)
    seen = []
    for rank in range(2):
        ds = _ds(synth_dir, rank=rank, world_size=2, shuffle=shuffle, shuffle_buffer=buffer, seed=3)
        ds.set_epoch(1)
        batches = list(make_dataloader(ds, num_workers=2))
        assert len(batches) == ds.num_batches(2)
        _check_content(batches, truth)
        seen.append(_ids(batches))
    assert len(set(seen[0]) & set(seen[1])) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(truth.num_rows))
    # row groups of 1,000 rows: in file order a batch of 512 is one run; shuffled, rows are mixed
    in_order = np.mean(np.concatenate([np.diff(ids) == 1 for ids in seen]))
    assert in_order > 0.99 if not shuffle else in_order < 0.01


def test_in_process_reading_matches_the_files(synth_dir: Path) -> None:
    ds = _ds(synth_dir, "valid", batch_size=300)
    batches = list(ds)
    assert [b.batch_size for b in batches[:-1]] == [300] * (len(batches) - 1)
    np.testing.assert_array_equal(_ids(batches), np.arange(ds.num_rows))  # no shuffle: file order
    _check_content(batches, _truth(synth_dir, "valid"))
    assert batches[0].dense_features.shape == (300, 0)
    assert batches[0].sparse_features.keys()[:2] == ["101", "121"]


def test_shuffle_is_deterministic_per_epoch_and_changes_between_epochs(synth_dir: Path) -> None:
    def order(epoch: int, seed: int = 3) -> np.ndarray:
        ds = _ds(synth_dir, shuffle=True, shuffle_buffer=2500, seed=seed)
        ds.set_epoch(epoch)
        return _ids(list(ds))

    a, b = order(0), order(0)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, order(1))
    assert not np.array_equal(a, order(0, seed=4))
    np.testing.assert_array_equal(np.sort(a), np.sort(order(1)))
    assert not np.array_equal(a, np.sort(a))


@pytest.mark.slow  # DataLoader worker processes
def test_set_epoch_reaches_persistent_workers(synth_dir: Path) -> None:
    ds = _ds(synth_dir, shuffle=True, seed=5)
    loader = make_dataloader(ds, num_workers=2, persistent_workers=True)
    got = []
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        got.append(_ids(list(loader)))
    fresh = []
    for epoch in (0, 1):
        ds2 = _ds(synth_dir, shuffle=True, seed=5)
        ds2.set_epoch(epoch)
        fresh.append(_ids(list(make_dataloader(ds2, num_workers=2, persistent_workers=False))))
    np.testing.assert_array_equal(got[0], fresh[0])
    np.testing.assert_array_equal(got[1], fresh[1])
    assert not np.array_equal(got[0], got[1])


def test_max_rows_drop_last_and_num_batches(synth_dir: Path) -> None:
    ds = _ds(synth_dir, max_rows=2_500, batch_size=400, drop_last=True)
    batches = list(ds)
    assert ds.num_rows == 2_500 and len(batches) == ds.num_batches(0) == 6
    assert all(b.batch_size == 400 for b in batches)
    assert _ids(batches).max() < 2_500
    ds = _ds(synth_dir, max_rows=2_500, batch_size=400)
    assert sum(b.batch_size for b in ds) == 2_500 and ds.num_batches(0) == 7


def test_tiny_table_labels_lengths_and_dense(tmp_path: Path) -> None:
    t = tiny_table(25)
    d = write_tiny(tmp_path, [t])
    feats = resolve_features(read_schema(d), embedding_dim=4)
    assert [f.name for f in feats] == ["x", "f", "g"] and feats[2].pooling == "mean"
    (b,) = list(ShardDataset(d, "train", features=feats, labels=TINY_LABELS, batch_size=100))
    np.testing.assert_array_equal(b.dense_features[:, 0].numpy(), np.arange(25, dtype=np.float32))
    assert b.labels["s3"].tolist() == (t.column("s").to_numpy() == 3).astype(np.float32).tolist()
    lengths = b.sparse_features.lengths().numpy()
    assert lengths[:25].tolist() == [1] * 25
    assert lengths[25:].tolist() == pc.list_value_length(t.column("g")).to_pylist()


# ------------------------------------------------------------------------ out-of-vocabulary ids


def _oov_ds(d: Path, policy: str) -> ShardDataset:
    feats = resolve_features(read_schema(d), embedding_dim=4, overrides={"f": (0, 5)})
    return ShardDataset(d, "train", features=feats, labels=TINY_LABELS, batch_size=100, oov_policy=policy)  # type: ignore[arg-type]


def test_oov_error_names_file_row_group_column_and_value(tmp_path: Path) -> None:
    d = write_tiny(tmp_path, [tiny_table(40)])
    with pytest.raises(
        DataError, match=r"part-00000.parquet row group 0: column 'f': id \d outside \[0, 5\)"
    ):
        list(_oov_ds(d, "error"))


@pytest.mark.parametrize("policy", ["hash", "clip"])
def test_oov_hash_and_clip_keep_ids_in_range(tmp_path: Path, policy: str) -> None:
    t = tiny_table(40)
    d = write_tiny(tmp_path, [t])
    (b,) = list(_oov_ds(d, policy))
    raw = t.column("f").to_numpy()
    want = raw % 5 if policy == "hash" else np.minimum(raw, 4)
    np.testing.assert_array_equal(b.sparse_features["f"].values().numpy(), want)


# ------------------------------------------------------------------------ bad input


def _read_all(d: Path, **kw: object) -> ShardDataset:
    feats = resolve_features(read_schema(d), embedding_dim=4)
    ds = ShardDataset(d, "train", features=feats, labels=TINY_LABELS, batch_size=8, **kw)  # type: ignore[arg-type]
    list(ds)
    return ds


def _with(t: pa.Table, name: str, values: pa.Array) -> pa.Table:
    return t.set_column(t.column_names.index(name), name, values)


def test_missing_column(tmp_path: Path) -> None:
    d = write_tiny(tmp_path, [tiny_table(20).drop_columns(["y"])])
    with pytest.raises(DataError, match=r"train/part-00000.parquet: column 'y' missing"):
        _read_all(d)


def test_wrong_type(tmp_path: Path) -> None:
    t = tiny_table(20)
    d = write_tiny(tmp_path, [_with(t, "f", pc.cast(t.column("f"), pa.float64()))])
    with pytest.raises(DataError, match=r"part-00000.parquet: column 'f' has type double, expected int64"):
        _read_all(d)


def test_label_outside_zero_one(tmp_path: Path) -> None:
    y = np.zeros(30, np.int8)
    y[23] = 2
    d = write_tiny(tmp_path, [_with(tiny_table(30), "y", pa.array(y))])
    with pytest.raises(
        DataError,
        match=r"part-00000.parquet row group 2: label column 'y' \(task 'y'\): "
        r"value 2 at row 3 is not in \[0, 1\]",
    ):
        _read_all(d)


def test_raw_label_code_outside_declared_values(tmp_path: Path) -> None:
    s = np.full(20, 2, np.int64)
    s[4] = 7
    d = write_tiny(tmp_path, [_with(tiny_table(20), "s", pa.array(s))])
    with pytest.raises(
        DataError,
        match=r"row group 0: label column 's' \(task 's3'\): value 7 at row 4 "
        r"is not in \[1, 2, 3\]",
    ):
        _read_all(d)


def test_positive_values_must_be_declared(tmp_path: Path) -> None:
    d = write_tiny(tmp_path, [tiny_table(20)])
    feats = resolve_features(read_schema(d), embedding_dim=4)
    with pytest.raises(DataError, match=r"positive_values \[9\] not among column 's'"):
        ShardDataset(d, "train", features=feats, labels=[LabelSpec("t", "s", (9,))], batch_size=4)
    with pytest.raises(DataError, match=r"column 'f' is not a declared label source"):
        ShardDataset(d, "train", features=feats, labels=[LabelSpec("t", "f", (1,))], batch_size=4)


def test_nan_in_dense_feature(tmp_path: Path) -> None:
    x = np.arange(20, dtype=np.float32)
    x[15] = np.nan
    d = write_tiny(tmp_path, [_with(tiny_table(20), "x", pa.array(x))])
    with pytest.raises(DataError, match=r"row group 1: dense column 'x': nan at row 5"):
        _read_all(d)


def test_null_in_sparse_column(tmp_path: Path) -> None:
    f = pa.array([1, None] + [2] * 18, pa.int64())
    d = write_tiny(tmp_path, [_with(tiny_table(20), "f", f)])
    with pytest.raises(DataError, match=r"row group 0: column 'f': 1 null value"):
        _read_all(d)


def test_empty_shard(tmp_path: Path) -> None:
    d = write_tiny(tmp_path, [tiny_table(20), tiny_table(0)])
    with pytest.raises(DataError, match=r"part-00001.parquet: empty shard \(0 rows\)"):
        _read_all(d)


def test_row_count_mismatch(tmp_path: Path) -> None:
    d = write_tiny(tmp_path, [tiny_table(20)])
    pq.write_table(tiny_table(12), d / "train/part-00000.parquet")
    with pytest.raises(
        DataError,
        match=r"part-00000.parquet: row count mismatch: the file has 12 rows, "
        r"schema.json says 20",
    ):
        _read_all(d)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_shard(tmp_path: Path, damage: str) -> None:
    d = write_tiny(tmp_path, [tiny_table(20)])
    path = d / "train/part-00000.parquet"
    data = path.read_bytes()
    path.write_bytes(b"not parquet at all" * 10 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(DataError, match=r"part-00000.parquet: corrupt or unreadable Parquet shard"):
        _read_all(d)


def test_unknown_split_and_bad_schema(tmp_path: Path) -> None:
    d = write_tiny(tmp_path, [tiny_table(20)])
    with pytest.raises(DataError, match=r"no split 'valid'"):
        ShardDataset(d, "valid", features=[], labels=[], batch_size=1)
    (d / "schema.json").write_text("{not json")
    with pytest.raises(DataError, match=r"schema.json: not valid JSON"):
        read_schema(d)
    with pytest.raises(DataError, match=r"no schema.json"):
        read_schema(tmp_path / "nowhere")


def test_skip_counts_and_logs_bad_shards_and_row_groups(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    y = np.zeros(30, np.int8)
    y[12] = 5  # row group 1 of shard 1
    d = write_tiny(
        tmp_path, [tiny_table(30), _with(tiny_table(30, 30), "y", pa.array(y)), tiny_table(30, 60)]
    )
    (d / "train/part-00002.parquet").write_bytes(b"garbage")
    feats = resolve_features(read_schema(d), embedding_dim=4)
    with caplog.at_level(logging.WARNING):
        ds = ShardDataset(d, "train", features=feats, labels=TINY_LABELS, batch_size=8, on_error="skip")
        ids = _ids(list(ds))
    assert ds.num_skipped == 2 and ds.num_skipped_rows == 40
    assert sorted(ids.tolist()) == list(range(30)) + list(range(30, 40)) + list(range(50, 60))
    assert "corrupt or unreadable" in caplog.text and "value 5 at row 2" in caplog.text


@pytest.mark.slow  # DataLoader worker processes
def test_skip_counter_is_shared_with_workers(tmp_path: Path) -> None:
    tables = [tiny_table(30, 30 * i, seed=i) for i in range(4)]
    y = np.zeros(30, np.int8)
    y[0] = 9
    tables[3] = _with(tables[3], "y", pa.array(y))
    d = write_tiny(tmp_path, tables)
    feats = resolve_features(read_schema(d), embedding_dim=4)
    ds = ShardDataset(d, "train", features=feats, labels=TINY_LABELS, batch_size=8, on_error="skip")
    ids = _ids(list(make_dataloader(ds, num_workers=2)))
    assert ds.num_skipped == 1 and ds.num_skipped_rows == 10 and len(ids) == 110
