from __future__ import annotations

import pickle

import numpy as np
import pyarrow as pa
import pytest
import torch

from mptrec.data_loaders.packing import PackedBatches
from mptrec.data_loaders.schema import DataError, FeatureSpec, LabelSpec
from mptrec.data_loaders.table_checks import check_table, fix_ids
from mptrec.data_loaders.to_batch import (
    SAMPLE_ID_COLUMN,
    gather_arrays,
    list_rows_index,
    table_to_arrays,
    table_to_batch,
)
from tests.data_loaders.shards import tiny_table

FEATS = [
    FeatureSpec("x", kind="dense"),
    FeatureSpec("f", num_embeddings=10, embedding_dim=4),
    FeatureSpec("g", num_embeddings=5, embedding_dim=4, multivalent=True),
]
LABELS = [LabelSpec("y", "y"), LabelSpec("s3", "s", (3,))]


def test_docstring_example() -> None:
    t = pa.table({"x": pa.array([0.5, 1.0], pa.float32()), "f": [3, 1], "y": pa.array([0, 1], pa.int8())})
    feats = [FeatureSpec("x", kind="dense"), FeatureSpec("f", num_embeddings=4, embedding_dim=4)]
    b = table_to_batch(t, feats, [LabelSpec("y", "y")])
    assert b.sparse_features.values().tolist() == [3, 1] and b.labels["y"].tolist() == [0.0, 1.0]
    assert b.sample_ids.tolist() == [0, 1]


def test_kjt_is_built_key_major_from_lengths() -> None:
    t = pa.table(
        {
            "x": pa.array([1.0, 2.0, 3.0], pa.float32()),
            "f": [1, 2, 3],
            "g": pa.array([[4], [], [0, 1]], pa.list_(pa.int64())),
            "y": pa.array([1, 0, 1], pa.int8()),
            "s": [3, 1, 2],
            SAMPLE_ID_COLUMN: [7, 8, 9],
        }
    )
    b = table_to_batch(t, FEATS, LABELS)
    kjt = b.sparse_features
    assert kjt.keys() == ["f", "g"] and kjt.stride() == 3
    assert kjt.values().tolist() == [1, 2, 3, 4, 0, 1] and kjt.values().dtype == torch.int64
    assert kjt.lengths().tolist() == [1, 1, 1, 1, 0, 2]
    assert kjt["g"].to_dense()[2].tolist() == [0, 1]
    assert b.dense_features.tolist() == [[1.0], [2.0], [3.0]]
    assert b.labels["s3"].tolist() == [1.0, 0.0, 0.0] and b.sample_ids.tolist() == [7, 8, 9]


def test_fix_ids_policies() -> None:
    ids = np.array([0, 4, 7, -1], dtype=np.int64)
    assert fix_ids(ids, 5, "hash", "w", "c").tolist() == [0, 4, 2, 4]
    assert fix_ids(ids, 5, "clip", "w", "c").tolist() == [0, 4, 4, 0]
    with pytest.raises(DataError, match=r"w: column 'c': id 7 outside \[0, 5\) \(oov_policy='error'"):
        fix_ids(ids, 5, "error", "w", "c")


def test_check_table_accepts_good_rows_and_names_bad_ones() -> None:
    t = tiny_table(20)
    check_table(t, FEATS, LABELS, {"s": [1, 2, 3]}, "error", "here")
    bad = t.set_column(1, "f", pa.array(np.full(20, 12), pa.int64()))
    with pytest.raises(DataError, match=r"here: column 'f': id 12 outside \[0, 10\)"):
        check_table(bad, FEATS, LABELS, {"s": [1, 2, 3]}, "error", "here")
    check_table(bad, FEATS, LABELS, {"s": [1, 2, 3]}, "hash", "here")  # ids are fixed later, not an error


def test_row_slices_and_packing_round_trip() -> None:
    t = tiny_table(50).append_column(SAMPLE_ID_COLUMN, pa.array(np.arange(100, 150)))
    arrays = table_to_arrays(t, FEATS, LABELS)
    slices = arrays.row_slices(16)
    assert [s.num_rows for s in slices] == [16, 16, 16, 2]
    direct = [s.materialize().to_batch() for s in slices]
    want = [table_to_batch(t.slice(i, 16), FEATS, LABELS) for i in range(0, 50, 16)]
    packed = pickle.loads(pickle.dumps(PackedBatches(slices)))
    for got in (direct, packed.unpack()):
        for a, b in zip(got, want):
            assert torch.equal(a.dense_features, b.dense_features)
            assert torch.equal(a.sparse_features.values(), b.sparse_features.values())
            assert torch.equal(a.sparse_features.lengths(), b.sparse_features.lengths())
            assert a.sparse_features.length_per_key() == b.sparse_features.length_per_key()
            assert all(torch.equal(a.labels[k], b.labels[k]) for k in b.labels)
            assert torch.equal(a.sample_ids, b.sample_ids)
            assert a.sparse_features.values().dtype == torch.int64
    assert packed.num_rows == 50


def _assert_same_arrays(a: object, b: object) -> None:
    for name in ("keys", "multi", "length_per_key", "label_names"):
        assert getattr(a, name) == getattr(b, name), name
    for name in ("dense", "values", "lengths", "labels", "sample_ids"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        np.testing.assert_array_equal(x, y, err_msg=name)


def test_list_rows_index_matches_a_per_row_loop() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 30))
        lengths = rng.integers(0, 4, n).astype(np.int32)  # empty lists included
        rows = rng.permutation(n) if rng.random() < 0.5 else rng.integers(0, n, int(rng.integers(0, 40)))
        starts = np.concatenate([[0], np.cumsum(lengths)])
        want = [i for r in rows for i in range(starts[r], starts[r] + lengths[r])]
        got_lengths, index = list_rows_index(lengths, rows.astype(np.int64))
        assert index.tolist() == want and got_lengths.tolist() == lengths[rows].tolist()


@pytest.mark.parametrize("policy", ["error", "hash"])
def test_gather_arrays_equals_decoding_the_taken_rows(policy: str) -> None:
    # two tables (empty lists, a 2-chunk one), rows in any order, one segment empty
    a = tiny_table(30, seed=1).append_column(SAMPLE_ID_COLUMN, pa.array(np.arange(30)))
    b = pa.concat_tables([tiny_table(12, 30, seed=2), tiny_table(13, 42, seed=3)])
    b = b.append_column(SAMPLE_ID_COLUMN, pa.array(np.arange(30, 55)))
    small = [
        FeatureSpec("f", num_embeddings=7, embedding_dim=4),
        FeatureSpec("g", num_embeddings=3, embedding_dim=4, multivalent=True),
    ]
    feats = FEATS if policy == "error" else [FEATS[0], *small]  # "hash": ids >= 7 and >= 3 wrap
    rng = np.random.default_rng(5)
    segments = [(a, rng.permutation(30)[:17]), (b, np.zeros(0, np.int64)), (b, rng.permutation(25))]
    taken = pa.concat_tables([t.take(pa.array(r, pa.int64())) for t, r in segments])
    want = table_to_arrays(taken, feats, LABELS, oov_policy=policy)  # type: ignore[arg-type]
    got = gather_arrays(segments, feats, LABELS, oov_policy=policy)  # type: ignore[arg-type]
    _assert_same_arrays(got, want)
    assert got.sample_ids.tolist() == [*segments[0][1].tolist(), *(30 + segments[2][1]).tolist()]
    if policy == "error":
        with pytest.raises(DataError, match="column 'f'"):
            gather_arrays(segments, [FeatureSpec("f", num_embeddings=3, embedding_dim=4)], LABELS)
    else:
        assert got.values.max() < 7 and got.values[got.length_per_key[0] :].max() < 3
        assert got.values[: got.length_per_key[0]].tolist() != taken.column("f").to_pylist()  # ids wrapped
