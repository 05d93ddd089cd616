"""mptrec.bench.stats and .delong: DeLong against an O(n^2) reference, the bootstrap, seed combining."""

from __future__ import annotations

import doctest
import math
import time

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mptrec.bench import delong as delong_half
from mptrec.bench import stats
from mptrec.bench.stats import (
    auc,
    combine_seeds,
    compare,
    delong,
    midranks,
    paired_bootstrap,
    seed_summary,
)


def _slow_delong(y: np.ndarray, p_a: np.ndarray, p_b: np.ndarray) -> dict[str, float]:
    """DeLong et al. (1988) from the definition: psi over every (positive, negative) pair."""

    def components(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = p[y == 1][:, None]
        z = p[y == 0][None, :]
        psi = (x > z) + 0.5 * (x == z)
        return psi.mean(axis=1), psi.mean(axis=0)  # V10 per positive, V01 per negative

    v10_a, v01_a = components(p_a)
    v10_b, v01_b = components(p_b)
    m, n = v10_a.shape[0], v01_a.shape[0]
    s10 = np.cov(np.stack([v10_a, v10_b]))  # ddof 1
    s01 = np.cov(np.stack([v01_a, v01_b]))
    s = s10 / m + s01 / n
    return {"auc_a": v10_a.mean(), "auc_b": v10_b.mean(), "diff": v10_a.mean() - v10_b.mean(),
            "se": math.sqrt(s[0, 0] + s[1, 1] - 2 * s[0, 1]), "se_a": math.sqrt(s[0, 0]),
            "se_b": math.sqrt(s[1, 1])}


def _tied_case(seed: int, n: int = 400) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(np.int64)
    p_a = np.round(y + rng.normal(0, 1.0, n), 1)  # ~60 distinct values: many ties, across classes
    p_b = np.round(0.5 * y + rng.normal(0, 1.0, n), 0)  # ~8 distinct values
    return y, p_a, p_b


def _simulate(rng: np.random.Generator, n: int, noise_a: float, noise_b: float | None) -> tuple:
    y = rng.integers(0, 2, n)
    p_a = y + rng.normal(0, noise_a, n)
    p_b = rng.normal(0, 1, n) if noise_b is None else y + rng.normal(0, noise_b, n)
    return y, p_a, p_b


# ---------------------------------------------------------------------------------------------
# AUC and midranks
# ---------------------------------------------------------------------------------------------


def test_midranks_match_the_definition() -> None:
    x = np.random.default_rng(3).integers(0, 20, 300).astype(np.float64)
    expected = (x[:, None] > x[None, :]).sum(1) + ((x[:, None] == x[None, :]).sum(1) + 1) / 2
    np.testing.assert_array_equal(midranks(x), expected)


def test_auc_equals_sklearn_and_rejects_one_class() -> None:
    y, p_a, p_b = _tied_case(0)
    assert auc(y, p_a) == pytest.approx(roc_auc_score(y, p_a), abs=1e-15)
    assert auc(y, p_b) == pytest.approx(roc_auc_score(y, p_b), abs=1e-15)
    with pytest.raises(ValueError, match="fewer than two classes"):
        auc([1, 1, 1], [0.1, 0.2, 0.3])


# ---------------------------------------------------------------------------------------------
# DeLong
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_delong_matches_the_quadratic_definition_with_ties(seed: int) -> None:
    y, p_a, p_b = _tied_case(seed)
    assert len(np.unique(p_b)) < 15 and len(np.unique(p_a)) < len(p_a) // 3  # ties, really
    fast = delong(y, p_a, p_b)
    slow = _slow_delong(y, p_a, p_b)
    for key in ("auc_a", "auc_b", "diff", "se", "se_a", "se_b"):
        assert fast[key] == pytest.approx(slow[key], abs=1e-10), key
    assert fast["auc_a"] == pytest.approx(roc_auc_score(y, p_a), abs=1e-12)
    assert fast["auc_b"] == pytest.approx(roc_auc_score(y, p_b), abs=1e-12)
    assert fast["se"] > 0.01
    z95 = 1.959963984540054
    assert fast["ci_low"] == pytest.approx(fast["diff"] - z95 * fast["se"], abs=1e-12)
    assert fast["ci_high"] == pytest.approx(fast["diff"] + z95 * fast["se"], abs=1e-12)
    assert fast["p_value"] == pytest.approx(math.erfc(abs(fast["diff"] / fast["se"]) / math.sqrt(2)))
    assert (fast["positives"], fast["negatives"]) == (int(y.sum()), len(y) - int(y.sum()))


def test_delong_level_sets_the_interval_width() -> None:
    y, p_a, p_b = _tied_case(0)
    r = delong(y, p_a, p_b, level=0.5)
    assert (r["ci_high"] - r["ci_low"]) / 2 == pytest.approx(0.6744897501960817 * r["se"], rel=1e-12)
    with pytest.raises(ValueError, match="level"):
        delong(y, p_a, p_b, level=1.0)


def test_identical_predictions_give_zero_difference_and_p_one() -> None:
    y, p_a, _ = _tied_case(4)
    for p_b in (p_a.copy(), 3 * p_a + 1):  # identical, and identically ranked
        r = delong(y, p_a, p_b)
        assert (r["diff"], r["se"], r["z"], r["p_value"]) == (0.0, 0.0, 0.0, 1.0)
        assert (r["ci_low"], r["ci_high"]) == (0.0, 0.0)
        b = paired_bootstrap(y, p_a, p_b, n_boot=50)
        assert np.all(b["replicates"] == 0.0) and (b["ci_low"], b["ci_high"]) == (0.0, 0.0)


def test_perfect_against_reversed_has_zero_se_and_p_zero() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    r = delong(y, y.astype(float), -y.astype(float))
    assert (r["diff"], r["se"], r["p_value"], r["z"]) == (1.0, 0.0, 0.0, math.inf)


def test_a_clearly_better_model_is_detected() -> None:
    y, p_a, p_b = _simulate(np.random.default_rng(10), 2000, noise_a=1.0, noise_b=None)
    r = delong(y, p_a, p_b)
    assert r["ci_low"] > 0 and r["p_value"] < 1e-6
    b = paired_bootstrap(y, p_a, p_b, n_boot=500)
    assert b["ci_low"] > 0
    # and the other way round
    r = delong(y, p_b, p_a)
    assert r["ci_high"] < 0 and r["p_value"] < 1e-6


def test_equally_good_models_are_covered_by_the_interval() -> None:
    rng = np.random.default_rng(20)
    covered = []
    for _ in range(50):
        y, p_a, p_b = _simulate(rng, 600, noise_a=1.0, noise_b=1.0)
        r = delong(y, p_a, p_b)
        covered.append(r["ci_low"] <= 0.0 <= r["ci_high"])
    assert 0.85 <= np.mean(covered) <= 1.0, np.mean(covered)


def test_delong_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="at least 2 positive"):
        delong([0, 0, 1], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1])
    with pytest.raises(ValueError, match="shape"):
        delong([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="0 or 1"):
        delong([0, 2, 0, 1], [0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="finite"):
        delong([0, 1, 0, 1], [0.1, np.nan, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4])


# ---------------------------------------------------------------------------------------------
# Paired bootstrap
# ---------------------------------------------------------------------------------------------


def test_bootstrap_replicate_aucs_are_exact() -> None:
    y, p_a, _ = _tied_case(5, n=300)
    pos, neg = p_a[y == 1], p_a[y == 0]
    rng = np.random.default_rng(0)
    pos_idx = rng.integers(0, len(pos), size=(20, len(pos)))
    neg_idx = rng.integers(0, len(neg), size=(20, len(neg)))
    fast = stats._bootstrap_aucs(pos, neg, pos_idx, neg_idx)
    for r in range(20):
        scores = np.concatenate([pos[pos_idx[r]], neg[neg_idx[r]]])
        labels = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
        assert fast[r] == pytest.approx(roc_auc_score(labels, scores), abs=1e-14)


def test_bootstrap_is_stratified_seeded_and_summarised() -> None:
    rng = np.random.default_rng(6)
    y = (rng.random(200) < 0.03).astype(int)  # ~6 positives: unstratified replicates would lack some
    y[:2] = 1
    p_a, p_b = y + rng.normal(0, 1, 200), rng.normal(0, 1, 200)
    r = paired_bootstrap(y, p_a, p_b, n_boot=300, seed=3)
    reps = r["replicates"]
    assert reps.shape == (300,) and np.isfinite(reps).all()
    assert r["mean_diff"] == pytest.approx(reps.mean()) and r["se"] == pytest.approx(reps.std(ddof=1))
    assert (r["ci_low"], r["ci_high"]) == tuple(np.percentile(reps, [2.5, 97.5]))
    assert r["diff"] == pytest.approx(roc_auc_score(y, p_a) - roc_auc_score(y, p_b), abs=1e-14)
    np.testing.assert_array_equal(paired_bootstrap(y, p_a, p_b, n_boot=300, seed=3)["replicates"], reps)
    assert not np.array_equal(paired_bootstrap(y, p_a, p_b, n_boot=300, seed=4)["replicates"], reps)


def test_bootstrap_interval_width_matches_delong() -> None:
    # correlated models (a shared error term), as two models of the same data: an unpaired
    # bootstrap would give an interval ~1.7x DeLong's here
    rng = np.random.default_rng(30)
    y = rng.integers(0, 2, 3000)
    shared = rng.normal(0, 1, 3000)
    p_a, p_b = y + shared + rng.normal(0, 0.5, 3000), y + shared + rng.normal(0, 0.8, 3000)
    r = compare(y, p_a, p_b, n_boot=1000, seed=0)
    width_delong = r["delong"]["ci_high"] - r["delong"]["ci_low"]
    width_boot = r["bootstrap"]["ci_high"] - r["bootstrap"]["ci_low"]
    assert 1 / 1.3 < width_boot / width_delong < 1.3, (width_boot, width_delong)
    assert r["bootstrap"]["mean_diff"] == pytest.approx(r["delong"]["diff"], abs=0.2 * r["delong"]["se"])


def test_bootstrap_of_8k_rows_1000_replicates_is_fast() -> None:
    y, p_a, p_b = _simulate(np.random.default_rng(40), 8000, noise_a=1.0, noise_b=1.2)
    start = time.perf_counter()
    paired_bootstrap(y, p_a, p_b, n_boot=1000)
    assert time.perf_counter() - start < 5.0


# ---------------------------------------------------------------------------------------------
# Seeds
# ---------------------------------------------------------------------------------------------


def test_combine_seeds_hand_computed() -> None:
    per_seed = [
        {"delong": {"diff": 0.01, "se": 0.003, "level": 0.5},
         "bootstrap": {"diff": 0.01, "se": 0.1, "replicates": np.array([0.0, 0.1, 0.2, 0.3, 0.4])}},
        {"delong": {"diff": 0.03, "se": 0.004, "level": 0.5},
         "bootstrap": {"diff": 0.03, "se": 0.1, "replicates": np.array([0.2, 0.1, 0.0, 0.1, 0.2])}},
    ]
    r = combine_seeds(per_seed)
    assert r["n_seeds"] == 2 and r["level"] == 0.5
    assert r["mean_diff"] == pytest.approx(0.02) and r["std_diff"] == pytest.approx(0.02 / math.sqrt(2))
    d = r["delong"]
    assert d["mean_diff"] == pytest.approx(0.02) and d["se"] == pytest.approx(0.0025)  # sqrt(9+16)e-3 / 2
    assert d["ci_low"] == pytest.approx(0.02 - 0.6744897501960817 * 0.0025)
    assert d["ci_high"] == pytest.approx(0.02 + 0.6744897501960817 * 0.0025)
    b = r["bootstrap"]
    np.testing.assert_allclose(b["replicates"], [0.1, 0.1, 0.1, 0.2, 0.3])
    assert b["mean_diff"] == pytest.approx(0.16)
    assert (b["ci_low"], b["ci_high"]) == pytest.approx((0.1, 0.2))  # 25th and 75th percentiles
    assert combine_seeds(per_seed, level=0.95)["delong"]["ci_high"] == pytest.approx(
        0.02 + 1.959963984540054 * 0.0025)


def test_combine_seeds_from_real_results_and_bare_ones() -> None:
    rng = np.random.default_rng(50)
    runs = [compare(*_simulate(rng, 1000, noise_a=1.0, noise_b=1.2), n_boot=200, seed=s) for s in range(3)]
    r = combine_seeds(runs)
    diffs = [run["delong"]["diff"] for run in runs]
    assert r["mean_diff"] == pytest.approx(np.mean(diffs))
    assert r["delong"]["se"] == pytest.approx(math.sqrt(sum(x["delong"]["se"] ** 2 for x in runs)) / 3)
    np.testing.assert_allclose(r["bootstrap"]["replicates"],
                               np.mean([x["bootstrap"]["replicates"] for x in runs], axis=0))
    only_delong = combine_seeds([run["delong"] for run in runs])
    assert only_delong["bootstrap"] is None and only_delong["delong"] == r["delong"]
    only_boot = combine_seeds([run["bootstrap"] for run in runs])
    assert only_boot["delong"] is None and only_boot["bootstrap"]["ci_low"] == r["bootstrap"]["ci_low"]
    with pytest.raises(ValueError, match="need all or none"):
        combine_seeds([runs[0], runs[1]["delong"]])
    with pytest.raises(ValueError, match="at least one"):
        combine_seeds([])


def test_seed_summary() -> None:
    mean, std, n = seed_summary([0.70, 0.72, 0.74])
    assert (mean, std, n) == (pytest.approx(0.72), pytest.approx(0.02), 3)
    assert seed_summary([0.5]) == (0.5, None, 1)
    with pytest.raises(ValueError):
        seed_summary([])


def test_docstring_examples_run() -> None:
    results = [doctest.testmod(m, optionflags=doctest.NORMALIZE_WHITESPACE) for m in (stats, delong_half)]
    assert sum(r.attempted for r in results) >= 20 and not any(r.failed for r in results), results
