from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from mptrec.data_loaders.aliccp import convert_aliccp_csv, convert_aliccp_paddle
from mptrec.data_loaders.dataset import ShardDataset
from mptrec.data_loaders.layout import read_schema, resolve_features
from mptrec.data_loaders.schema import ALICCP_FIELDS, DataError, LabelSpec

A = "aliccp/"
ALL = {"train": 1.0}


def _table(d: Path, split: str = "train") -> pa.Table:
    s = read_schema(d)
    return pa.concat_tables([pq.read_table(d / f) for f in s["splits"][split]["files"]])


def test_torchrechub_csv(shared_data: Path, tmp_path: Path) -> None:
    s = convert_aliccp_csv(
        [shared_data / A / "torchrechub_ali_ccp_train_sample.csv"],
        tmp_path,
        split=ALL,
        seed=0,
        assigned=[("valid", shared_data / A / "torchrechub_ali_ccp_val_sample.csv")],
    )
    assert s["stats"]["train"] == {"rows": 100, "click_positives": 7, "purchase_positives": 1}
    assert s["stats"]["valid"] == {"rows": 50, "click_positives": 3, "purchase_positives": 1}
    kinds = Counter(f["kind"] for f in s["features"])
    assert kinds == {"sparse": 23, "dense": 8}
    assert s["features"][0]["name"] == "D109_14"  # dense first
    assert {f["name"] for f in s["features"] if f["kind"] == "sparse"} == set(ALICCP_FIELDS)
    assert set(_table(tmp_path).column("301").to_pylist()) == {1}
    feats = resolve_features(read_schema(tmp_path), embedding_dim=4)
    ds = ShardDataset(tmp_path, "valid", features=feats, labels=[LabelSpec("ctr", "click")], batch_size=64)
    (b,) = list(ds)
    assert b.dense_features.shape == (50, 8) and b.labels["ctr"].sum() == 3


def test_scenariowise_csv_has_three_scenarios(shared_data: Path, tmp_path: Path) -> None:
    s = convert_aliccp_csv(
        [shared_data / A / "scenariowiserec_ali_ccp_train_sample.csv"], tmp_path, split=ALL, seed=0
    )
    assert Counter(_table(tmp_path).column("301").to_pylist()) == {1: 69, 2: 19, 3: 12}
    assert s["labels"]["301"]["values"] == [0, 1, 2, 3]


def test_paddlerec_aitm_csv_and_drop_option(shared_data: Path, tmp_path: Path) -> None:
    path = shared_data / A / "paddlerec_aitm_train_sample.csv"
    s = convert_aliccp_csv([path], tmp_path / "a", split={"train": 0.5, "valid": 0.5}, seed=1, shards=2)
    rows = {
        k: sum(v[k] for v in s["stats"].values() if isinstance(v, dict))
        for k in ("rows", "click_positives", "purchase_positives")
    }
    assert rows == {"rows": 48, "click_positives": 3, "purchase_positives": 3}
    assert Counter(
        pa.concat_tables([_table(tmp_path / "a", sp) for sp in ("train", "valid")]).column("301").to_pylist()
    ) == {2: 31, 3: 17}
    assert {f["name"]: f["num_embeddings"] for f in s["features"]}["205"] > 400_000  # global AITM ids kept
    d = convert_aliccp_csv([path], tmp_path / "b", split=ALL, seed=1, drop_purchase_without_click=True)
    assert d["stats"]["train"]["rows"] == 46 and d["stats"]["dropped_purchase_without_click"] == 2
    # the T3 label of the spec: 301 == 2 -> 0, else 1
    feats = resolve_features(read_schema(tmp_path / "b"), embedding_dim=4, exclude=["301"])
    (b,) = list(
        ShardDataset(
            tmp_path / "b", "train", features=feats, labels=[LabelSpec("t3", "301", (1, 3))], batch_size=100
        )
    )
    raw = pacsv.read_csv(path).to_pydict()
    kept = [v for v, c, p in zip(raw["301"], raw["click"], raw["purchase"]) if not (c == 0 and p == 1)]
    assert int(b.labels["t3"].sum()) == sum(v != 2 for v in kept)
    assert "301" not in b.sparse_features.keys()


def test_paddlerec_esmm_text(shared_data: Path, tmp_path: Path) -> None:
    s = convert_aliccp_paddle(
        [shared_data / A / "paddlerec_esmm_train_small.txt"], tmp_path, split=ALL, seed=0
    )
    assert s["stats"]["train"] == {"rows": 10, "click_positives": 2, "purchase_positives": 1}
    assert s["stats"]["multi_value_rows_last_kept"] == {"853": 1}
    t = _table(tmp_path)
    assert t.schema.field("210").type == pa.list_(pa.int64())
    lens = [len(x) for x in t.column("150_14").to_pylist()]
    assert lens == [191] * 10
    ne = {f["name"]: f["num_embeddings"] for f in s["features"]}
    assert ne["126"] == 1 and ne["301"] == 2 and ne["205"] == 11  # 126 absent; 301 always one value
    assert set(t.column("301").to_pylist()) == {1}


def test_bad_aliccp_inputs(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("click,purchase,101,extra\n0,0,1,2\n")
    with pytest.raises(DataError, match=r"bad.csv: unknown column 'extra'"):
        convert_aliccp_csv([bad], tmp_path / "o", split=ALL, seed=0)
    bad.write_text("click,purchase,101\n3,0,1\n")
    with pytest.raises(DataError, match=r"bad.csv: label column 'click' holds 3"):
        convert_aliccp_csv([bad], tmp_path / "o", split=ALL, seed=0)
    txt = tmp_path / "bad.txt"
    txt.write_text("1,0,0,101:5,205\n")
    with pytest.raises(DataError, match=r"bad.txt:1: token '205' is not field:id"):
        convert_aliccp_paddle([txt], tmp_path / "p", split=ALL, seed=0)
