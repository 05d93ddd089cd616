from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import mptrec.data_loaders.aliccp_raw as raw
from mptrec.data_loaders.aliccp_raw import convert_aliccp_raw
from mptrec.data_loaders.aliccp_raw_lines import count_lines
from mptrec.data_loaders.layout import assign_splits, read_schema
from mptrec.data_loaders.schema import ALICCP_FIELDS, ALICCP_MULTI_FIELDS, DataError

SPLIT = {"train": 0.75, "valid": 0.25}


def _feats(pairs: list[tuple[str, int]]) -> str:
    return "\x01".join(f"{f}\x02{i}\x03{0.5:.1f}" for f, i in pairs)


def write_raw(d: Path, n: int = 300, seed: int = 0) -> tuple[Path, dict[str, list], list[tuple]]:
    """A tiny raw Tianchi-format pair; returns the skeleton path, the common rows and the skeleton rows."""
    rnd = random.Random(seed)
    d.mkdir(parents=True, exist_ok=True)
    common: dict[str, list] = {}
    with open(d / "common_features_train.csv", "w") as fh:
        for k in range(6):
            pairs = [("101", 5000 + k), ("121", rnd.randint(1, 4)), ("122", 7), ("129", rnd.randint(1, 2))]
            pairs += [("109_14", 50 + j) for j in range(k % 3 + 1)] + [
                ("150_14", rnd.randint(60, 64)) for _ in range(2)
            ]
            common[f"k{k}"] = pairs
            fh.write(f"k{k},{len(pairs)},{_feats(pairs)}\n")
    rows = []
    with open(d / "sample_skeleton_train.csv", "w") as fh:
        for r in range(n):
            click = int(rnd.random() < 0.3)
            buy = int(rnd.random() < 0.3) if click else int(r % 97 == 5)  # a few purchases without click
            pairs = [
                ("205", rnd.randint(1, 40)),
                ("206", rnd.randint(1, 6)),
                ("301", rnd.choice([11, 12, 13])),
                ("210", rnd.randint(1, 9)),
                ("210", rnd.randint(1, 9)),
                ("999", 1),
            ]
            if r % 50 == 0:
                pairs += [("205", 3), ("121", 99), ("109_14", 77)]  # repeated single, overridden, list merge
            rows.append((r, click, buy, f"k{r % 6}", pairs))
            fh.write(f"{r},{click},{buy},k{r % 6},{len(pairs)},{_feats(pairs)}\n")
    return d / "sample_skeleton_train.csv", common, rows


def reference(common: dict[str, list], rows: list[tuple], min_count: int, seed: int, drop: bool) -> dict:
    """A plain re-implementation of the documented semantics, per split."""
    codes = assign_splits(len(rows), SPLIT, seed)
    merged = []
    counts: dict[str, Counter] = {f: Counter() for f in ALICCP_FIELDS}
    for (_, click, buy, key, pairs), code in zip(rows, codes):
        if drop and click == 0 and buy == 1:
            continue
        feats: dict[str, list[str]] = {}
        for f, i in pairs:
            feats.setdefault(f, []).append(str(i))
        if code == 0:  # documented: skeleton ids count even when the common row overrides them
            for f, vs in feats.items():
                if f in counts:
                    counts[f].update(vs if f in ALICCP_MULTI_FIELDS else vs[-1:])
        for f, i in common[key]:
            if f in ALICCP_MULTI_FIELDS:
                feats.setdefault(f, []).append(str(i))
        singles = {f: str(i) for f, i in common[key] if f not in ALICCP_MULTI_FIELDS}
        for f, v in singles.items():
            feats[f] = [v]  # common wins
        merged.append((int(code), click, buy, feats))
        if code == 0:
            for f, i in common[key]:
                counts[f][str(i)] += 1
    vocab = {
        f: {v: i + 1 for i, v in enumerate(sorted((v for v, c in cnt.items() if c >= min_count), key=int))}
        for f, cnt in counts.items()
    }
    out: dict[str, dict[str, list]] = {
        s: {c: [] for c in ["click", "purchase", *ALICCP_FIELDS]} for s in SPLIT
    }
    for code, click, buy, feats in merged:
        col = out[list(SPLIT)[code]]
        col["click"].append(click)
        col["purchase"].append(buy)
        for f in ALICCP_FIELDS:
            ids = [vocab[f].get(v, 0) for v in feats.get(f, [])]
            col[f].append(ids if f in ALICCP_MULTI_FIELDS else (ids[-1] if ids else 0))
    return {"out": out, "sizes": {f: len(v) + 1 for f, v in vocab.items()}}


def _split(d: Path, split: str) -> pa.Table:
    s = read_schema(d)
    return pa.concat_tables([pq.read_table(d / f) for f in s["splits"][split]["files"]])


@pytest.mark.parametrize("drop", [False, True])
def test_raw_matches_reference_semantics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, drop: bool) -> None:
    skel, common, rows = write_raw(tmp_path / "raw")
    monkeypatch.setattr(raw, "CHUNK_ROWS", 37)  # several chunks, so the vectorised merge is exercised
    s = convert_aliccp_raw(
        [skel],
        tmp_path / "out",
        split=SPLIT,
        seed=4,
        shards=2,
        min_count=3,
        drop_purchase_without_click=drop,
        row_group_size=25,
    )
    ref = reference(common, rows, min_count=3, seed=4, drop=drop)
    assert {f["name"]: f["num_embeddings"] for f in s["features"]} == ref["sizes"]
    for split in SPLIT:
        got = _split(tmp_path / "out", split).to_pydict()
        for c, want in ref["out"][split].items():
            assert got[c] == want, (split, c)
        assert s["stats"][split]["rows"] == len(ref["out"][split]["click"])
        assert s["stats"][split]["click_positives"] == sum(ref["out"][split]["click"])
    assert s["stats"]["dropped_purchase_without_click"] == (
        sum(1 for r in rows if r[1] == 0 and r[2] == 1) if drop else 0
    )
    assert s["stats"]["multi_value_rows_last_kept"]["205"] == 6
    assert s["labels"]["301"]["values"] == [0, 1, 2, 3]
    assert len(s["sources"]) == 2 and all(src["bytes"] > 0 for src in s["sources"])


def test_raw_assigned_test_file_and_line_count(tmp_path: Path) -> None:
    skel, _, rows = write_raw(tmp_path / "raw")
    assert count_lines(skel) == len(rows)
    test_dir = tmp_path / "rawtest"
    test_skel, _, test_rows = write_raw(test_dir, n=40, seed=1)
    s = convert_aliccp_raw(
        [skel], tmp_path / "out", split=SPLIT, seed=0, assigned=[("test", test_skel)], min_count=1
    )
    assert s["stats"]["test"]["rows"] == 40
    assert s["stats"]["train"]["rows"] + s["stats"]["valid"]["rows"] == len(rows)
    assert s["split_spec"]["assigned"] == [["test", str(test_skel)]]


def test_raw_errors_name_file_and_line(tmp_path: Path) -> None:
    skel, _, _ = write_raw(tmp_path / "raw", n=20)
    lines = skel.read_text().splitlines()
    lines[4] = lines[4].replace(",k4,", ",nokey,")
    skel.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"sample_skeleton_train.csv:5: common key 'nokey' not in"):
        convert_aliccp_raw([skel], tmp_path / "o1", split={"train": 1.0}, seed=0)
    parts = lines[4].split(",")
    parts[4] = "2"
    lines[4] = ",".join(parts)
    skel.write_text("\n".join(lines) + "\n")
    with pytest.raises(
        DataError, match=r"sample_skeleton_train.csv:5: feature_num says 2 features, the list has 6"
    ):
        convert_aliccp_raw([skel], tmp_path / "o2", split={"train": 1.0}, seed=0)
    s = convert_aliccp_raw(
        [skel], tmp_path / "o3", split={"train": 1.0}, seed=0, max_bad_lines=1, min_count=1
    )
    assert s["stats"]["bad_lines_skipped"] == 1 and s["stats"]["train"]["rows"] == 19
    lines[6] = "1,2,0,k1,1,205\x0211\x031"
    skel.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r":7: click/buy '2'/'0' are not 0/1"):
        convert_aliccp_raw([skel], tmp_path / "o4", split={"train": 1.0}, seed=0, max_bad_lines=1)
    other = tmp_path / "raw" / "samples.csv"
    other.write_text("")
    with pytest.raises(DataError, match="cannot derive the common-features file name"):
        convert_aliccp_raw([other], tmp_path / "o5", split={"train": 1.0}, seed=0)
