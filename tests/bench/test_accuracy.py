"""bench/accuracy.py: predictions are aligned by row, paired comparisons, the Markdown report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mptrec.bench.accuracy import Harness, compare, load_predictions
from mptrec.bench.accuracy_report import markdown
from mptrec.bench.stats import auc


def _ours(path: Path, y: np.ndarray, logit: np.ndarray, order: np.ndarray) -> Path:
    table = pa.table({"sample_id": order, "label_income": y[order], "logit_income": logit[order]})
    pq.write_table(table, path)
    return path


def test_our_dumps_and_peer_dumps_are_aligned_by_row(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500).astype(np.int8)
    good = y + rng.normal(0, 1.0, 500)
    ours = load_predictions(_ours(tmp_path / "ours.parquet", y, good, rng.permutation(500)))
    assert np.array_equal(ours["income"][0], y) and np.allclose(ours["income"][1], good.astype(np.float32))
    order = rng.permutation(500)
    peer_p = 1 / (1 + np.exp(-(y + rng.normal(0, 3.0, 500))))
    pq.write_table(pa.table({"row": order, "income": peer_p[order]}), tmp_path / "peer.parquet")
    peer = load_predictions(tmp_path / "peer.parquet", ours)
    assert np.allclose(peer["income"][1], peer_p)
    cmp = compare([ours], [peer], "income", n_boot=200)
    assert cmp["mean_diff"] == pytest.approx(auc(y, good) - auc(y, peer_p), abs=1e-6)
    assert cmp["bootstrap"]["ci_low"] > 0  # the much better model wins with an interval above 0
    with pytest.raises(ValueError, match="no labels"):
        load_predictions(tmp_path / "peer.parquet")
    short = {"income": (y[:10], good[:10])}
    with pytest.raises(ValueError, match="different rows"):
        compare([ours], [short], "income")


def test_failed_job_names_its_log_and_done_jobs_are_skipped(tmp_path: Path) -> None:
    h = Harness(tmp_path, ["python3"])
    done = tmp_path / "done.txt"
    done.write_text("x")
    h.run(["false"], done, "skipped")  # already done: not run
    with pytest.raises(RuntimeError, match=r"boom: exit 3; last lines of .*boom.log"):
        h.run(["python3", "-c", "import sys; print('oops'); sys.exit(3)"], tmp_path / "never", "boom")
    assert "oops" in (tmp_path / "logs" / "boom.log").read_text()


def test_markdown_tables() -> None:
    ci = {"mean_diff": 0.001, "bootstrap": {"ci_low": -0.002, "ci_high": 0.004}}
    cell = {"mean": 0.94, "std": 0.001, "per_seed": [0.94], "n": 1}
    res = {"command": "x", "date": "d", "machine": "m", "wall_s": 60, "census_seeds": [1],
           "census": {"t2": {m: {"income": cell, "marital": cell} for m in ("mmoe", "mptrec")},
                      "t3": {"mptrec": cell, "scratch": cell}, "peers": {},
                      "t2_vs_mptrec": {"mmoe": {"income": ci, "marital": ci}},
                      "t3_vs_mptrec": {"scratch": ci}},
           "aliccp": {"1000000": {"train_rows": 800000, "tasks": {
               "ctr": {"test_auc": 0.76, "gap": 0.05, "bayes_auc": 0.81, "inputs_auc": 0.80}},
               "planted_reference": {"ctr": {"test_auc": 0.79, "gap": 0.02}}}}}
    text = markdown(res)
    assert "| mmoe | 0.9400 ± 0.0010 | +0.0010 [-0.0020, +0.0040] |" in text
    assert "| scratch | 0.9400 ± 0.0010 | +0.0010 [-0.0020, +0.0040] |" in text
    assert "| 1,000,000 | 800,000 | 0.7600 (+0.0500) | - | - |" in text
    assert "| ↳ planted form, fitted (what the rows allow) | | 0.7900 (+0.0200) | - | - |" in text
