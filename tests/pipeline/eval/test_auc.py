from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from mptrec.pipeline.eval.auc import (
    ScoreBuffer,
    binary_metrics,
    exact_auc,
    gather_for_auc,
    grouped_auc,
    grouped_auc_details,
    roc_curve,
)
from tests.dist import run_multiprocess


def _random(n: int, distinct: int, seed: int, pos_rate: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, distinct, n).astype(np.float32) if distinct else rng.standard_normal(n)
    labels = (rng.random(n) < pos_rate).astype(np.int64)
    labels[0], labels[-1] = 0, 1  # both classes
    return scores, labels


@pytest.mark.parametrize(("n", "distinct"), [(2, 0), (10, 2), (1000, 3), (1000, 50), (5000, 0), (20000, 2)])
def test_exact_auc_equals_sklearn_with_and_without_ties(n: int, distinct: int) -> None:
    for seed in range(3):
        s, y = _random(n, distinct, seed)
        assert exact_auc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


@pytest.mark.parametrize("distinct", [50, 0])
def test_exact_auc_equals_torchmetrics_binary_auroc(distinct: int) -> None:
    """A second, independent oracle: torchmetrics' unbinned BinaryAUROC (ties included)."""
    from torchmetrics.classification import BinaryAUROC

    g = np.random.default_rng(7)
    n = 20_000
    # scores in [0, 1]: torchmetrics applies a float32 sigmoid to anything else, which creates ties
    s = g.integers(0, distinct, n) / distinct if distinct else g.random(n)
    y = (g.random(n) < 0.2 + 0.6 * s).astype(np.int64)
    oracle = BinaryAUROC(thresholds=None)(torch.tensor(s), torch.tensor(y)).item()
    assert exact_auc(s, y) == pytest.approx(oracle, abs=1e-6)  # float32 counts in torchmetrics


def test_exact_auc_hand_cases() -> None:
    assert exact_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert exact_auc([1.0, 1.0, 1.0, 1.0], [0, 1, 0, 1]) == 0.5  # all tied
    assert exact_auc([3, 2, 1], [0, 0, 1]) == 0.0
    assert exact_auc(torch.tensor([0.5, 0.5, 0.9]), torch.tensor([1.0, 0.0, 1.0])) == 0.75


def test_exact_auc_large_is_exact_and_fast() -> None:
    rng = np.random.default_rng(0)
    n = 1_000_000
    y = rng.random(n) < 0.05
    s = (rng.standard_normal(n) + y).astype(np.float32)
    s[::7] = np.round(s[::7], 1)  # heavy ties in a seventh of the rows
    t = time.perf_counter()
    auc = exact_auc(s, y)
    elapsed = time.perf_counter() - t
    assert auc == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    assert elapsed < 2.0, elapsed  # ~0.07 s alone on one core; generous on a shared machine


def test_single_class_is_undefined_not_half() -> None:
    assert exact_auc([0.1, 0.9, 0.3], [1, 1, 1]) is None
    assert exact_auc([0.1, 0.9], [0, 0]) is None
    assert exact_auc(np.zeros(0), np.zeros(0)) is None
    m = binary_metrics(np.array([0.0, 1.0]), np.array([0, 0]))
    assert m["auc"] is None and m["calibration"] is None
    assert json.loads(json.dumps(m))["auc"] is None  # JSON null


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="row 1 is"):
        exact_auc([0.1, float("nan")], [0, 1])
    with pytest.raises(ValueError, match="labels must be 0 or 1; row 2"):
        exact_auc([0.1, 0.2, 0.3], [0, 1, 2])
    with pytest.raises(ValueError, match="3 rows but labels has 2"):
        exact_auc([0.1, 0.2, 0.3], [0, 1])


def test_binary_metrics_against_hand_computation() -> None:
    x = np.array([-2.0, 0.0, 1.5, 3.0])
    y = np.array([0, 1, 0, 1])
    m = binary_metrics(torch.tensor(x), torch.tensor(y))
    p = 1 / (1 + np.exp(-x))
    expected_ll = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    assert m["logloss"] == pytest.approx(expected_ll, rel=1e-12)
    assert m["calibration"] == pytest.approx(p.mean() / y.mean(), rel=1e-12)
    assert m["auc"] == pytest.approx(roc_auc_score(y, x))
    assert (m["n"], m["positives"], m["positive_rate"]) == (4, 2, 0.5)


def test_logloss_is_stable_for_extreme_logits() -> None:
    m = binary_metrics(np.array([1000.0, -1000.0, 1000.0]), np.array([1, 0, 0]))
    assert m["logloss"] == pytest.approx(1000.0 / 3)
    assert math.isfinite(m["calibration"])
    empty = binary_metrics(np.zeros(0), np.zeros(0))
    assert empty == {"auc": None, "logloss": None, "calibration": None, "n": 0, "positives": 0,
                     "positive_rate": None}


def test_grouped_auc_against_per_group_sklearn() -> None:
    rng = np.random.default_rng(1)
    n = 4000
    g = rng.integers(0, 60, n)
    s = rng.integers(0, 6, n).astype(np.float64)
    y = rng.integers(0, 2, n)
    y[g == 5] = 1  # a single-class group is skipped
    num = den = 0.0
    used = 0
    for u in np.unique(g):
        m = g == u
        if y[m].min() != y[m].max():
            num += m.sum() * roc_auc_score(y[m], s[m])
            den += m.sum()
            used += 1
    value, groups = grouped_auc_details(s, y, g)
    assert value == pytest.approx(num / den, abs=1e-12)
    assert groups == used
    assert grouped_auc(s, y, np.zeros(n, dtype=np.int64)) == pytest.approx(roc_auc_score(y, s))
    assert grouped_auc([0.1, 0.2], [1, 1], [0, 1]) is None


def test_roc_curve_matches_sklearn() -> None:
    s, y = _random(3000, 40, 3)
    fpr, tpr = roc_curve(s, y)
    sk_fpr, sk_tpr, _ = sk_roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    fpr2, tpr2 = roc_curve(s, y, max_points=10)
    assert len(fpr2) <= 10 and fpr2[0] == 0 and fpr2[-1] == 1 and tpr2[-1] == 1


def test_score_buffer_local() -> None:
    buf = ScoreBuffer(["a", "b"], keep_ids=True)
    buf.update({"a": torch.tensor([0.1, 0.9]), "b": torch.tensor([0.3, 0.2])},
               {"a": torch.tensor([0.0, 1.0]), "b": torch.tensor([1.0, 1.0])}, torch.tensor([4, 7]))
    assert len(buf) == 2
    assert buf.compute_auc() == {"a": 1.0, "b": None}
    assert buf.local()["sample_ids"].tolist() == [4, 7]
    with pytest.raises(KeyError, match=r"lack task\(s\) \['b'\]"):
        buf.update({"a": torch.zeros(1)}, {"a": torch.zeros(1), "b": torch.zeros(1)}, torch.tensor([0]))
    with pytest.raises(ValueError, match="pass sample_ids"):
        buf.update({"a": torch.zeros(1), "b": torch.zeros(1)}, {"a": torch.zeros(1), "b": torch.zeros(1)})


# ---- multi-process exact merge ---------------------------------------------------------------

def _rank_slice(rank: int, world_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Uneven split of a fixed data set over ranks; the last rank of a 4-rank world gets 0 rows."""
    s, y = _random(3001, 7, 11)
    if world_size == 1:
        return s, y
    cuts = {2: [0, 1000, 3001], 4: [0, 500, 2200, 3001, 3001]}[world_size]
    return s[cuts[rank]:cuts[rank + 1]], y[cuts[rank]:cuts[rank + 1]]


def _gathered_auc(rank: int, world_size: int) -> tuple[float | None, int, float | None]:
    s, y = _rank_slice(rank, world_size)
    gs, gy = gather_for_auc(torch.from_numpy(s), torch.from_numpy(y).float())
    buf = ScoreBuffer(["t", "single"])
    buf.update({"t": torch.from_numpy(s), "single": torch.from_numpy(s)},
               {"t": torch.from_numpy(y).float(), "single": torch.ones(len(y))})
    metrics = buf.compute()
    assert metrics["t"]["auc"] == exact_auc(gs, gy)
    return exact_auc(gs, gy), int(gs.shape[0]), metrics["single"]["auc"]


@pytest.mark.parametrize("world_size", [1, pytest.param(2, marks=pytest.mark.slow),
                                        pytest.param(4, marks=pytest.mark.slow)])
def test_distributed_auc_equals_sklearn(world_size: int) -> None:
    s, y = _random(3001, 7, 11)
    expected = roc_auc_score(y, s)
    if world_size == 1:
        results = [_gathered_auc(0, 1)]
    else:
        results = run_multiprocess(_gathered_auc, world_size)
    for auc, n, single in results:
        assert auc == pytest.approx(expected, abs=1e-12)
        assert n == 3001
        assert single is None


def test_docstring_examples_run() -> None:
    import doctest

    import mptrec.pipeline.eval.auc as auc_module

    result = doctest.testmod(auc_module)
    assert result.attempted >= 4 and result.failed == 0
