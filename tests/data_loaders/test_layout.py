from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mptrec.data_loaders.layout import assign_splits, parse_split_spec, read_schema, resolve_features
from mptrec.data_loaders.schema import DataError
from mptrec.data_loaders.shard_writer import SplitWriter, prepare_out_dir
from mptrec.data_loaders.vocab import Vocabulary
from tests.data_loaders.shards import tiny_table, write_tiny


def test_parse_split_spec() -> None:
    assert parse_split_spec("train=0.8,valid=0.1,test=0.1") == {"train": 0.8, "valid": 0.1, "test": 0.1}
    for bad, msg in [
        ("train=0.8,valid=0.1", "sum to"),
        ("train", "bad item"),
        ("Train=1", "bad item"),
        ("train=x", "not a number"),
        ("train=0.5,train=0.5", "given twice"),
        ("train=1.5", "outside"),
    ]:
        with pytest.raises(DataError, match=msg):
            parse_split_spec(bad)


def test_assign_splits_exact_counts_and_deterministic() -> None:
    spec = parse_split_spec("train=0.8,valid=0.1,test=0.1")
    a = assign_splits(1001, spec, seed=3)
    assert Counter(a.tolist()) == {0: 801, 1: 100, 2: 100}
    np.testing.assert_array_equal(a, assign_splits(1001, spec, seed=3))
    assert not np.array_equal(a, assign_splits(1001, spec, seed=4))


def test_split_writer_equal_shards_and_row_groups(tmp_path: Path) -> None:
    t = tiny_table(103)
    w = SplitWriter(tmp_path, "train", 103, 4, t.schema, row_group_size=10)
    for i in range(0, 103, 7):  # arbitrary chunking
        w.write(t.slice(i, 7))
    meta = w.close()
    assert meta["rows"] == [26, 26, 26, 25]
    assert meta["files"] == [f"train/part-{i:05d}.parquet" for i in range(4)]
    pf = pq.ParquetFile(tmp_path / meta["files"][0])
    assert [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)] == [10, 10, 6]
    back = pa.concat_tables([pq.read_table(tmp_path / f) for f in meta["files"]])
    assert back.equals(t)
    assert not list(tmp_path.rglob("*.tmp"))
    short = SplitWriter(tmp_path, "valid", 5, 2, t.schema)
    short.write(t.slice(0, 3))
    with pytest.raises(DataError, match="wrote 3 rows, expected 5"):
        short.close()


def test_prepare_out_dir_refuses_existing_shards(tmp_path: Path) -> None:
    write_tiny(tmp_path, [tiny_table(5)])
    with pytest.raises(DataError, match="already holds shards"):
        prepare_out_dir(tmp_path, overwrite=False)
    prepare_out_dir(tmp_path, overwrite=True)
    assert not (tmp_path / "schema.json").exists() and not list(tmp_path.rglob("*.parquet"))


def test_read_schema_validation(tmp_path: Path) -> None:
    d = write_tiny(tmp_path, [tiny_table(5)])
    schema = json.loads((d / "schema.json").read_text())
    assert read_schema(d)["features"][1]["num_embeddings"] == 10
    for mutate, msg in [
        (lambda s: s.pop("features"), "'features' missing"),
        (lambda s: s["features"].append(dict(s["features"][1])), "declared twice"),
        (lambda s: s["features"][1].update(num_embeddings=0), "num_embeddings 0"),
        (lambda s: s["features"][0].update(kind="weird"), "kind 'weird'"),
        (lambda s: s["labels"]["y"].update(values=[]), "'values'"),
        (lambda s: s["splits"]["train"]["files"].append("train/x.parquet"), "differ in length"),
        (lambda s: s.update(version=2), "version 2"),
    ]:
        bad = json.loads(json.dumps(schema))
        mutate(bad)
        (d / "schema.json").write_text(json.dumps(bad))
        with pytest.raises(DataError, match=msg):
            read_schema(d)


def test_resolve_features(tmp_path: Path) -> None:
    schema = read_schema(write_tiny(tmp_path, [tiny_table(5)]))
    feats = resolve_features(schema, embedding_dim=8, overrides={"g": (4, 7)})
    assert [(f.name, f.kind, f.embedding_dim, f.num_embeddings) for f in feats] == [
        ("x", "dense", 0, 0),
        ("f", "sparse", 8, 10),
        ("g", "sparse", 4, 7),
    ]
    assert [f.name for f in resolve_features(schema, embedding_dim=4, use_dense=False)] == ["f", "g"]
    assert [f.name for f in resolve_features(schema, embedding_dim=4, exclude=["f"])] == ["x", "g"]
    assert [f.name for f in resolve_features(schema, embedding_dim=4, include=["g", "x"])] == ["x", "g"]
    for kw in ({"include": ["nope"]}, {"exclude": ["nope"]}, {"overrides": {"nope": (1, 1)}}):
        with pytest.raises(DataError, match="unknown feature"):
            resolve_features(schema, embedding_dim=4, **kw)  # type: ignore[arg-type]


def test_vocabulary_fit_encode_save(tmp_path: Path) -> None:
    v = Vocabulary.fit(
        {"a": Counter({"10": 3, "9": 5, "100": 1}), "b": Counter({"?": 9, "z": 1, "y": 2})},
        min_count=2,
        exclude=["?"],
    )
    assert v.values == {"a": ["9", "10"], "b": ["y"]}
    assert (v.encode("a", "10"), v.encode("a", "100"), v.encode("b", "?"), v.num_embeddings("a")) == (
        2,
        0,
        0,
        3,
    )
    back = Vocabulary.load(v.save(tmp_path))
    assert back.values == v.values
    with pytest.raises(DataError, match="min_count"):
        Vocabulary.fit({}, min_count=0)
