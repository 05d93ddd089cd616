"""Statistics for comparing two models' ROC-AUCs on the same rows, and over several seeds.

Used by the accuracy benchmark to say whether model A's AUC beats model B's by more than noise:

* :func:`delong`: DeLong, DeLong & Clarke-Pearson (1988) test of two correlated AUCs (both
  models scored on the same rows), computed with the O(n log n) midrank algorithm of Sun & Xu
  (2014, "Fast implementation of DeLong's algorithm for comparing the areas under correlated
  receiver operating characteristic curves", IEEE SPL 21(11)). Ties count one half, exactly.
* :func:`paired_bootstrap`: a stratified paired bootstrap of the AUC difference (every replicate
  resamples positives and negatives separately, the same rows for both models); each replicate's
  AUC is exact (ties count one half) and computed without sorting, from resampling counts.
* :func:`combine_seeds`: the mean AUC difference over several training seeds, with a CI from
  the seeds' bootstrap replicates averaged index-wise and one from the DeLong standard errors.
* :func:`compare`: both tests of one seed, in the form :func:`combine_seeds` takes.
* :func:`auc` and :func:`seed_summary`: the exact AUC (``mptrec.pipeline.eval.auc.exact_auc``) and a
  mean/std/count over seeds.

:func:`auc`, :func:`midranks` and :func:`delong` (and the input checks the bootstrap shares) live in
:mod:`mptrec.bench.delong` and are re-exported here; this module holds the bootstrap and the seeds.

Only numpy and the standard library (``math.erfc`` for p-values, ``statistics.NormalDist`` for
normal quantiles). CIs are normal-approximation (DeLong) or percentile (bootstrap) intervals at
``level`` (default 0.95); percentiles use numpy's default linear interpolation.

Example:
    >>> rng = np.random.default_rng(0)
    >>> y = rng.integers(0, 2, 2000)
    >>> better, worse = y + rng.normal(0, 1, 2000), y + rng.normal(0, 2, 2000)
    >>> r = delong(y, better, worse)
    >>> r["diff"] > 0 and r["ci_low"] > 0 and r["p_value"] < 1e-6
    True
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from mptrec.bench.delong import FloatArray, _paired_inputs, _two_sided_p, _z_critical, auc, delong, midranks

__all__ = ["auc", "combine_seeds", "compare", "delong", "midranks", "paired_bootstrap", "seed_summary"]

IntArray = npt.NDArray[np.int64]

# replicates per vectorised block of the bootstrap (bounds memory at ~ block * rows * 8 bytes)
_BLOCK_ELEMENTS = 1 << 20


# --------------------------------------------------------------------------------------------
# Paired bootstrap
# --------------------------------------------------------------------------------------------


def _bootstrap_aucs(
    pos_scores: FloatArray, neg_scores: FloatArray, pos_idx: IntArray, neg_idx: IntArray
) -> FloatArray:
    """Exact AUC of each resample: positives ``pos_scores[pos_idx[r]]``, negatives ``neg_scores[neg_idx[r]]``.

    No sort per replicate: the negatives are sorted once; a resample of them is a count per
    sorted negative, whose running sum gives, for every original positive, how many resampled
    negatives score below it (``L``) and at most equal to it (``R``). Twice the Mann-Whitney U
    is then ``sum_i c_i (L_i + R_i)`` over the positives' resampling counts ``c_i``, in int64.

    Args:
        pos_scores: shape (m,) scores of the positives.
        neg_scores: shape (n,) scores of the negatives.
        pos_idx: shape (B, m_r) indices into ``pos_scores`` (each row one replicate).
        neg_idx: shape (B, n_r) indices into ``neg_scores``.

    Returns:
        shape (B,) AUCs.
    """
    m, n = pos_scores.shape[0], neg_scores.shape[0]
    reps = pos_idx.shape[0]
    m_r, n_r = pos_idx.shape[1], neg_idx.shape[1]
    neg_order = np.argsort(neg_scores, kind="stable")
    neg_sorted = neg_scores[neg_order]
    rank_of = np.empty(n, dtype=np.int64)
    rank_of[neg_order] = np.arange(n)
    # negatives strictly below / at most equal to each positive, as positions in the sorted order
    lo = np.searchsorted(neg_sorted, pos_scores, side="left")
    hi = np.searchsorted(neg_sorted, pos_scores, side="right")
    offsets = np.arange(reps, dtype=np.int64)[:, None]
    neg_counts = np.bincount((rank_of[neg_idx] + offsets * n).ravel(), minlength=reps * n).reshape(reps, n)
    below = np.zeros((reps, n + 1), dtype=np.int64)
    np.cumsum(neg_counts, axis=1, out=below[:, 1:])
    pos_counts = np.bincount((pos_idx + offsets * m).ravel(), minlength=reps * m).reshape(reps, m)
    twice_u = (pos_counts * (below[:, lo] + below[:, hi])).sum(axis=1)
    return twice_u / (2.0 * m_r * n_r)


def paired_bootstrap(
    y: npt.ArrayLike,
    p_a: npt.ArrayLike,
    p_b: npt.ArrayLike,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Stratified paired bootstrap of ``AUC(A) - AUC(B)`` with a percentile interval.

    Every replicate draws the positives with replacement (as many as there are) and, separately,
    the negatives, so it always holds both classes; both models are scored on the same resampled
    rows. The replicates' AUCs are exact (ties count one half), vectorised over blocks of
    replicates (no Python loop per row or per replicate).

    Replicate ``k`` uses the same rows for any scores given the same labels, ``n_boot`` and
    ``seed``: seeds of a model that share test rows should use the same bootstrap ``seed`` so
    that :func:`combine_seeds` averages replicates over the same resampled rows.

    Args:
        y: shape (n,) labels in {0, 1}; at least 1 row of each class.
        p_a: shape (n,) scores of model A.
        p_b: shape (n,) scores of model B on the same rows.
        n_boot: number of replicates.
        seed: seed of the resampling (``numpy.random.default_rng``).
        level: confidence level of the percentile interval.

    Returns:
        ``auc_a``, ``auc_b``, ``diff`` (on all rows, not resampled), ``mean_diff`` and ``se``
        (mean and std, ddof 1, of the replicates), ``ci_low``/``ci_high`` (the ``(1 - level) / 2``
        and ``(1 + level) / 2`` percentiles of the replicates), ``level``, ``n_boot``, ``seed``,
        ``replicates`` (shape (n_boot,) float64 array of the replicates' differences).

    Example:
        >>> rng = np.random.default_rng(1)
        >>> y = rng.integers(0, 2, 500)
        >>> r = paired_bootstrap(y, y + rng.normal(0, 1, 500), rng.normal(0, 1, 500), n_boot=200)
        >>> round(r["diff"], 4), r["replicates"].shape, bool(r["ci_low"] > 0)
        (0.3105, (200,), True)
    """
    _z_critical(level)  # validates level
    if n_boot < 2:
        raise ValueError(f"n_boot must be at least 2, got {n_boot}")
    labels, a, b = _paired_inputs(y, p_a, p_b, min_per_class=1)
    m = int(np.count_nonzero(labels))
    n = labels.shape[0] - m
    rng = np.random.default_rng(seed)
    block = max(1, _BLOCK_ELEMENTS // (m + n))
    reps_a = np.empty(n_boot, dtype=np.float64)
    reps_b = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, block):
        size = min(block, n_boot - start)
        pos_idx = rng.integers(0, m, size=(size, m), dtype=np.int64)
        neg_idx = rng.integers(0, n, size=(size, n), dtype=np.int64)
        reps_a[start:start + size] = _bootstrap_aucs(a[labels], a[~labels], pos_idx, neg_idx)
        reps_b[start:start + size] = _bootstrap_aucs(b[labels], b[~labels], pos_idx, neg_idx)
    replicates = reps_a - reps_b
    low, high = np.percentile(replicates, [50.0 * (1.0 - level), 50.0 * (1.0 + level)])
    auc_a, auc_b = auc(labels, a), auc(labels, b)
    return {
        "auc_a": auc_a,
        "auc_b": auc_b,
        "diff": auc_a - auc_b,
        "mean_diff": float(replicates.mean()),
        "se": float(replicates.std(ddof=1)),
        "ci_low": float(low),
        "ci_high": float(high),
        "level": level,
        "n_boot": n_boot,
        "seed": seed,
        "replicates": replicates,
    }


# --------------------------------------------------------------------------------------------
# One seed, several seeds
# --------------------------------------------------------------------------------------------


def compare(
    y: npt.ArrayLike,
    p_a: npt.ArrayLike,
    p_b: npt.ArrayLike,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, dict[str, Any]]:
    """Both tests of one seed: ``{"delong": delong(...), "bootstrap": paired_bootstrap(...)}``.

    Example:
        >>> y = [0, 0, 1, 1, 0, 1]
        >>> r = compare(y, [0.1, 0.4, 0.35, 0.8, 0.2, 0.9], [0.3, 0.2, 0.6, 0.7, 0.1, 0.5], n_boot=50)
        >>> sorted(r), r["delong"]["diff"] == r["bootstrap"]["diff"]
        (['bootstrap', 'delong'], True)
    """
    return {
        "delong": delong(y, p_a, p_b, level=level),
        "bootstrap": paired_bootstrap(y, p_a, p_b, n_boot=n_boot, seed=seed, level=level),
    }


def seed_summary(values: Sequence[float] | npt.ArrayLike) -> tuple[float, float | None, int]:
    """Mean, sample standard deviation (ddof 1) and count of per-seed values.

    Args:
        values: one finite value per seed (at least one).

    Returns:
        ``(mean, std, n)``; ``std`` is ``None`` for a single value (undefined, never 0).

    Example:
        >>> mean, std, n = seed_summary([0.70, 0.72, 0.74])
        >>> round(mean, 12), round(std, 12), n
        (0.72, 0.02, 3)
        >>> seed_summary([0.7])
        (0.7, None, 1)
    """
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError("seed_summary needs at least one value")
    if not np.isfinite(arr).all():
        raise ValueError(f"seed_summary needs finite values, got {arr.tolist()}")
    n = int(arr.size)
    return float(arr.mean()), (float(arr.std(ddof=1)) if n > 1 else None), n


def _method(entry: Mapping[str, Any], name: str) -> Mapping[str, Any] | None:
    """The ``name`` ("delong" or "bootstrap") result of one seed's entry, or None."""
    if name in entry:
        return entry[name]
    is_bootstrap = "replicates" in entry
    if "se" in entry and "diff" in entry and is_bootstrap == (name == "bootstrap"):
        return entry  # a bare delong() or paired_bootstrap() result
    return None


def combine_seeds(per_seed: Sequence[Mapping[str, Any]], level: float | None = None) -> dict[str, Any]:
    """Mean AUC difference over training seeds, with a CI by each of two methods.

    Each entry is one seed's :func:`compare` result (``{"delong": ..., "bootstrap": ...}``),
    or a bare :func:`delong` or :func:`paired_bootstrap` result.

    * bootstrap: the seeds' replicate arrays are averaged index-wise (replicate ``k`` of the mean
      is the mean of every seed's replicate ``k``), and the CI is the percentile interval of
      those averages. Seeds evaluated on different test rows have independent resamples; seeds
      sharing the test rows should use the same bootstrap ``seed`` so that replicate ``k`` holds
      the same rows for all of them (the correlation between seeds is then kept).
    * delong: the mean of the seeds' differences with ``se = sqrt(sum se_i^2) / n_seeds``,
      which assumes independent seeds (each evaluated on its own test rows); seeds sharing the
      test rows are positively correlated and this SE is then too small.

    Args:
        per_seed: one entry per seed (at least one).
        level: confidence level; default: the first entry's ``level``.

    Returns:
        ``n_seeds``, ``level``, ``diffs`` (each seed's full-data difference), ``mean_diff``,
        ``std_diff`` (over seeds, ddof 1; ``None`` for one seed), and ``bootstrap`` and
        ``delong``: dicts with ``mean_diff``, ``se``, ``ci_low``, ``ci_high`` (``delong`` also
        ``p_value``; ``bootstrap`` also ``replicates``, the averaged ones), or ``None`` where the
        entries lack that method.

    Raises:
        ValueError: no entries, an entry has neither method, the entries disagree on which
            methods they hold or on ``n_boot``, or the replicate arrays hold non-finite values.

    Example:
        >>> seeds = [{"delong": {"diff": 0.01, "se": 0.003, "level": 0.95}},
        ...          {"delong": {"diff": 0.03, "se": 0.004, "level": 0.95}}]
        >>> r = combine_seeds(seeds)
        >>> round(r["mean_diff"], 12), round(r["delong"]["se"], 12), r["bootstrap"]
        (0.02, 0.0025, None)
    """
    if not per_seed:
        raise ValueError("combine_seeds needs at least one seed")
    methods: dict[str, list[Mapping[str, Any]]] = {}
    for name in ("delong", "bootstrap"):
        found = [_method(entry, name) for entry in per_seed]
        present = [r for r in found if r is not None]
        if present and len(present) != len(found):
            raise ValueError(f"{len(present)} of {len(found)} seeds have a {name} result; need all or none")
        if present:
            methods[name] = present
    if not methods:
        raise ValueError("combine_seeds: the entries hold neither a delong nor a bootstrap result")
    first = next(iter(methods.values()))
    if level is None:
        level = float(first[0].get("level", 0.95))
    z_crit = _z_critical(level)
    diffs = [float(r["diff"]) for r in first]
    mean_diff, std_diff, n_seeds = seed_summary(diffs)
    out: dict[str, Any] = {"n_seeds": n_seeds, "level": level, "diffs": diffs, "mean_diff": mean_diff,
                           "std_diff": std_diff, "delong": None, "bootstrap": None}
    if "delong" in methods:
        se = math.sqrt(sum(float(r["se"]) ** 2 for r in methods["delong"])) / n_seeds
        mean = float(np.mean([float(r["diff"]) for r in methods["delong"]]))
        out["delong"] = {"mean_diff": mean, "se": se, "ci_low": mean - z_crit * se,
                         "ci_high": mean + z_crit * se, "p_value": _two_sided_p(mean, se)}
    if "bootstrap" in methods:
        arrays = [np.asarray(r["replicates"], dtype=np.float64).reshape(-1) for r in methods["bootstrap"]]
        sizes = sorted({a.shape[0] for a in arrays})
        if len(sizes) != 1:
            raise ValueError(f"the seeds' bootstrap replicate counts differ: {sizes}")
        reps = np.mean(arrays, axis=0)
        if not np.isfinite(reps).all():
            raise ValueError("bootstrap replicates must be finite")
        low, high = np.percentile(reps, [50.0 * (1.0 - level), 50.0 * (1.0 + level)])
        out["bootstrap"] = {"mean_diff": float(reps.mean()),
                            "se": float(reps.std(ddof=1)) if reps.shape[0] > 1 else None,
                            "ci_low": float(low), "ci_high": float(high), "replicates": reps}
    return out
