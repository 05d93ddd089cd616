from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mptrec.data_loaders.census import convert_census, read_census
from mptrec.data_loaders.layout import parse_split_spec, read_schema, resolve_features
from mptrec.data_loaders.schema import CENSUS_DENSE, CENSUS_SPARSE, DataError

DEV = "census/census-income.test.dev.data.gz"
SUBSET = "census/census-income.data.subset.gz"
SPLIT = parse_split_spec("train=0.8,valid=0.1,test=0.1")


def _totals(schema: dict) -> dict[str, int]:
    out: dict[str, int] = {}
    for st in schema["stats"].values():
        for k, v in st.items():
            out[k] = out.get(k, 0) + v
    return out


def _split_table(d: Path, split: str) -> pa.Table:
    s = read_schema(d)
    return pa.concat_tables([pq.read_table(d / f) for f in s["splits"][split]["files"]])


def test_dev_file_rows_label_rates_and_layout(shared_data: Path, tmp_path: Path) -> None:
    schema = convert_census([shared_data / DEV], tmp_path, split=SPLIT, seed=1, shards=2)
    tot = _totals(schema)
    assert tot["rows"] == 79_810
    assert round(100 * tot["income_positives"] / tot["rows"], 2) == 6.20
    assert round(100 * tot["marital_positives"] / tot["rows"], 2) == 43.33
    assert tot["education_label_positives"] == 7_858  # "Bachelors degree(BA AB BS)" count in the data README
    assert [schema["stats"][s]["rows"] for s in ("train", "valid", "test")] == [63_848, 7_981, 7_981]
    feats = resolve_features(read_schema(tmp_path), embedding_dim=4)
    dense = [f for f in feats if f.kind == "dense"]
    sparse = [f for f in feats if f.kind == "sparse"]
    assert [f.name for f in dense] == list(CENSUS_DENSE) and [f.name for f in sparse] == list(CENSUS_SPARSE)
    assert len(dense) + 4 * len(sparse) == 127
    assert "marital_stat" not in {f.name for f in feats} and "income_50k" not in {f.name for f in feats}
    assert {f.name: f.num_embeddings for f in sparse}["education"] == 18  # 17 values + id 0
    train = _split_table(tmp_path, "train")
    for c in CENSUS_DENSE:
        x = train.column(c).to_numpy()
        assert x.min() == 0.0 and x.max() == 1.0, c
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    assert "?" not in vocab["fields"]["country_self"]
    assert schema["labels"]["education"]["values"] == list(range(18))


def test_training_subset_as_extra_train_rows(shared_data: Path, tmp_path: Path) -> None:
    only = convert_census(
        [shared_data / SUBSET], tmp_path / "subset", split={"train": 1.0}, seed=0, keep_instance_weight=False
    )
    t = only["stats"]["train"]
    assert t["rows"] == 2_086
    assert round(100 * t["income_positives"] / 2_086, 2) == 5.47
    assert round(100 * t["marital_positives"] / 2_086, 2) == 43.38
    assert "instance_weight" not in {f["name"] for f in only["features"]}
    assert "DROPPED" in only["notes"]
    both = convert_census(
        [shared_data / SUBSET],
        tmp_path / "both",
        split=SPLIT,
        seed=2,
        assigned=[("train", shared_data / SUBSET)],
    )
    assert both["stats"]["train"]["rows"] == 1_669 + 2_086
    again = convert_census(
        [shared_data / SUBSET],
        tmp_path / "again",
        split=SPLIT,
        seed=2,
        shards=3,
        assigned=[("train", shared_data / SUBSET)],
    )
    assert again["stats"] == both["stats"]  # deterministic for a seed, whatever the shard count


def _write_uci(path: Path, rows: list[list[str]]) -> Path:
    with gzip.open(path, "wt") as fh:
        for r in rows:
            fh.write(", ".join(r) + "\n")
    return path


def test_vocabulary_is_fitted_on_train_only_and_unseen_maps_to_zero(
    shared_data: Path, tmp_path: Path
) -> None:
    cols = read_census(shared_data / SUBSET)
    rows = [[str(cols[c][i]) for c in cols] for i in range(40)]
    odd = [list(r) for r in rows[:3]]
    for r in odd:
        r[34] = "Atlantis"  # country_self, never seen in training
    train = _write_uci(tmp_path / "train.gz", rows)
    valid = _write_uci(tmp_path / "valid.gz", odd)
    convert_census([train], tmp_path / "out", split={"train": 1.0}, seed=0, assigned=[("valid", valid)])
    v = _split_table(tmp_path / "out", "valid")
    assert v.column("country_self").to_pylist() == [0, 0, 0]
    assert (
        v.column("education").to_pylist()
        == _split_table(tmp_path / "out", "train").column("education").to_pylist()[:3]
    )


def test_bad_census_lines(tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("1, 2, 3\n")
    with pytest.raises(DataError, match=r"short.txt:1: 3 fields, expected 42"):
        read_census(short)
    cols = ["0"] * 41 + ["maybe"]
    bad = _write_uci(tmp_path / "bad.gz", [cols])
    with pytest.raises(DataError, match=r"bad.gz:1: column 'income_50k': value 'maybe'"):
        convert_census([bad], tmp_path / "o", split={"train": 1.0}, seed=0)
    with pytest.raises(DataError, match="must contain 'train'"):
        convert_census([bad], tmp_path / "o2", split={"valid": 1.0}, seed=0)
