from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from mptrec.data_loaders.layout import read_schema
from mptrec.data_loaders.schema import ALICCP_MULTI_FIELDS, ALICCP_VOCAB_SIZES, DataError
from mptrec.data_loaders.synth import auc, generate_aliccp

SPLIT = {"train": 0.8, "valid": 0.1, "test": 0.1}


def _all(d: Path) -> pa.Table:
    s = read_schema(d)
    return pa.concat_tables([pq.read_table(d / f) for sp in s["splits"].values() for f in sp["files"]])


@pytest.fixture(scope="module")
def fifty_k(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    d = tmp_path_factory.mktemp("s50k")
    return d, generate_aliccp(d, rows=50_000, shards=2, seed=11, split=SPLIT)


def test_schema_holds_real_vocab_sizes_and_bayes_auc(fifty_k: tuple[Path, dict]) -> None:
    d, s = fifty_k
    schema = read_schema(d)
    sizes = {f["name"]: f["num_embeddings"] for f in schema["features"]}
    assert {k: sizes[k] for k in ALICCP_VOCAB_SIZES} == ALICCP_VOCAB_SIZES
    assert sizes["205"] == 467_298 and sizes["101"] == 238_635
    assert {f["name"] for f in schema["features"] if f["multivalent"]} == set(ALICCP_MULTI_FIELDS)
    assert set(schema["bayes_auc"]) == {"click", "purchase", "301"}
    assert all(0.6 < v < 1.0 for v in schema["bayes_auc"].values())
    assert schema["labels"]["301"] == {"values": [1, 2, 3]}
    assert [sum(v["rows"]) for v in schema["splits"].values()] == [40_000, 5_000, 5_000]


def test_input_bayes_auc_lies_between_chance_and_the_full_bayes_auc(fifty_k: tuple[Path, dict]) -> None:
    """Without the user's own effect (101) and field 301 a model cannot reach bayes_auc; the
    planted probabilities with those integrated out score lower on the drawn labels."""
    _, s = fifty_k
    seen, realized = s["bayes_auc_inputs"], s["bayes_auc_realized"]
    assert set(seen) == {"click", "purchase", "301"}
    for k in seen:
        assert 0.55 < seen[k] < realized[k], (k, seen[k], realized[k])
    assert realized["click"] - seen["click"] > 0.003  # the user effect and 301 carry real signal


def test_rates_ids_and_purchase_only_after_click(fifty_k: tuple[Path, dict]) -> None:
    d, s = fifty_k
    t = _all(d)
    click, buy = t.column("click").to_numpy(), t.column("purchase").to_numpy()
    assert abs(click.mean() - 0.04) < 0.006
    assert np.all(buy <= click)
    assert set(np.unique(t.column("301").to_numpy())) == {1, 2, 3}
    assert abs((t.column("301").to_numpy() == 2).mean() - 0.3) < 0.02
    for f in read_schema(d)["features"]:
        col = t.column(f["name"])
        ids = pc.list_flatten(col) if f["multivalent"] else col
        mm = pc.min_max(ids)
        assert mm["min"].as_py() >= 0 and mm["max"].as_py() < f["num_embeddings"], f["name"]
        if f["multivalent"]:
            lens = pc.list_value_length(col).to_numpy()
            assert 1 <= lens.min() and lens.max() <= 8 and lens.mean() < 4


def test_purchase_rate_among_clicks(tmp_path: Path) -> None:
    s = generate_aliccp(
        tmp_path, rows=30_000, shards=1, seed=2, split={"train": 1.0}, click_rate=0.2, purchase_rate=0.1
    )
    st = s["stats"]["train"]
    assert abs(st["click_positives"] / 30_000 - 0.2) < 0.015
    assert abs(st["purchase_positives"] / st["click_positives"] - 0.1) < 0.02


def test_deterministic_and_independent_of_shard_count(tmp_path: Path) -> None:
    a = generate_aliccp(tmp_path / "a", rows=70_000, shards=3, seed=5, split=SPLIT)
    b = generate_aliccp(tmp_path / "b", rows=70_000, shards=5, seed=5, split=SPLIT, row_group_size=10_000)
    c = generate_aliccp(tmp_path / "c", rows=70_000, shards=3, seed=6, split=SPLIT)
    assert _all(tmp_path / "a").equals(_all(tmp_path / "b"))
    assert a["bayes_auc"] == b["bayes_auc"] and a["bayes_auc"] != c["bayes_auc"]
    assert not _all(tmp_path / "a").equals(_all(tmp_path / "c"))
    assert len(b["splits"]["train"]["files"]) == 5


def test_exact_auc() -> None:
    s = np.array([0.1, 0.4, 0.35, 0.8])
    y = np.array([0.0, 0.0, 1.0, 1.0])
    assert auc(s, y, 1 - y) == pytest.approx(0.75)
    assert auc(np.array([1.0, 1.0]), np.array([1.0, 0.0]), np.array([0.0, 1.0])) == pytest.approx(0.5)


def test_bad_options(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="click-rate must be in"):
        generate_aliccp(tmp_path, rows=10, shards=1, seed=0, split=SPLIT, click_rate=1.5)
    with pytest.raises(DataError, match="rows must be positive"):
        generate_aliccp(tmp_path, rows=0, shards=1, seed=0, split=SPLIT)
