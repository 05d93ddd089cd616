"""Exact ROC-AUC, midranks and DeLong's test of two correlated AUCs, with the input checks.

The half of :mod:`mptrec.bench.stats` that the paired bootstrap and the combination over seeds
build on; ``mptrec.bench.stats`` re-exports :func:`auc`, :func:`midranks` and :func:`delong`, and
callers import them from there.

* :func:`delong`: DeLong, DeLong & Clarke-Pearson (1988) test of two correlated AUCs (both
  models scored on the same rows), computed with the O(n log n) midrank algorithm of Sun & Xu
  (2014, "Fast implementation of DeLong's algorithm for comparing the areas under correlated
  receiver operating characteristic curves", IEEE SPL 21(11)). Ties count one half, exactly.
* :func:`auc`: the exact AUC (``mptrec.pipeline.eval.auc.exact_auc``).
* :func:`midranks`: 1-based ranks with ties given their mean rank.

Only numpy and the standard library (``math.erfc`` for p-values, ``statistics.NormalDist`` for
normal quantiles); CIs are normal-approximation intervals at ``level`` (default 0.95).
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any

import numpy as np
import numpy.typing as npt

from mptrec.pipeline.eval.auc import exact_auc

__all__ = ["auc", "delong", "midranks"]

FloatArray = npt.NDArray[np.float64]


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def _labels(y: npt.ArrayLike) -> npt.NDArray[np.bool_]:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {arr.shape}")
    if arr.dtype == np.bool_:
        return arr
    ok = (arr == 0) | (arr == 1)
    if not ok.all():
        bad = int(np.flatnonzero(~ok)[0])
        raise ValueError(f"labels must be 0 or 1; row {bad} is {arr[bad]!r}")
    return arr.astype(np.bool_)


def _scores(p: npt.ArrayLike, n: int, what: str) -> FloatArray:
    arr = np.asarray(p, dtype=np.float64)
    if arr.shape != (n,):
        raise ValueError(f"{what} must have shape ({n},) like the labels, got {arr.shape}")
    if n and not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise ValueError(f"{what} must be finite; row {bad} is {arr[bad]!r}")
    return arr


def _paired_inputs(
    y: npt.ArrayLike, p_a: npt.ArrayLike, p_b: npt.ArrayLike, min_per_class: int
) -> tuple[npt.NDArray[np.bool_], FloatArray, FloatArray]:
    labels = _labels(y)
    n = labels.shape[0]
    a = _scores(p_a, n, "p_a")
    b = _scores(p_b, n, "p_b")
    pos = int(np.count_nonzero(labels))
    if min(pos, n - pos) < min_per_class:
        raise ValueError(f"need at least {min_per_class} positive and {min_per_class} negative rows, "
                         f"got {pos} and {n - pos}")
    return labels, a, b


def _z_critical(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return NormalDist().inv_cdf(0.5 + level / 2.0)


def _two_sided_p(diff: float, se: float) -> float:
    """Normal two-sided p-value of ``diff / se``; 1 for 0/0 and 0 for a nonzero diff with se 0."""
    if se == 0.0:
        return 1.0 if diff == 0.0 else 0.0
    return math.erfc(abs(diff / se) / math.sqrt(2.0))


# --------------------------------------------------------------------------------------------
# AUC and midranks
# --------------------------------------------------------------------------------------------


def auc(y: npt.ArrayLike, p: npt.ArrayLike) -> float:
    """Exact ROC-AUC, ties counted one half (``mptrec.pipeline.eval.auc.exact_auc``, O(n log n)).

    Args:
        y: shape (n,) labels in {0, 1}.
        p: shape (n,) scores.

    Returns:
        The AUC (equal to ``sklearn.metrics.roc_auc_score(y, p)``).

    Raises:
        ValueError: the rows hold fewer than two classes (AUC undefined), or bad inputs.

    Example:
        >>> auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
        0.75
    """
    labels = _labels(y)
    value = exact_auc(_scores(p, labels.shape[0], "p"), labels)
    if value is None:
        raise ValueError("AUC is undefined: the rows hold fewer than two classes")
    return value


def midranks(x: npt.ArrayLike) -> FloatArray:
    """1-based ranks of ``x`` with ties given the mean of their ranks (one sort, O(n log n)).

    Args:
        x: shape (n,) values.

    Returns:
        shape (n,) float64 midranks (``scipy.stats.rankdata(x, "average")``).

    Example:
        >>> midranks([3.0, 1.0, 3.0, 2.0]).tolist()
        [3.5, 1.0, 3.5, 2.0]
    """
    arr = np.asarray(x)
    n = arr.shape[0]
    order = np.argsort(arr, kind="stable")
    xs = arr[order]
    new = np.ones(n, dtype=np.bool_)
    new[1:] = xs[1:] != xs[:-1]
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:], n)  # block i holds sorted positions starts[i] .. ends[i] - 1
    out = np.empty(n, dtype=np.float64)
    out[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return out


# --------------------------------------------------------------------------------------------
# DeLong
# --------------------------------------------------------------------------------------------


def _placements(labels: npt.NDArray[np.bool_], p: FloatArray) -> tuple[float, FloatArray, FloatArray]:
    """(AUC, V10 per positive, V01 per negative) of one model, by Sun & Xu's midranks.

    ``V10_i = P(score of positive i > score of a random negative)`` (ties one half) and
    ``V01_j = P(score of a random positive > score of negative j)``.
    """
    x, yneg = p[labels], p[~labels]
    m, n = x.shape[0], yneg.shape[0]
    tz = midranks(np.concatenate([x, yneg]))
    tx, ty = midranks(x), midranks(yneg)
    v10 = (tz[:m] - tx) / n
    v01 = 1.0 - (tz[m:] - ty) / m
    value = float((tz[:m].sum() - m * (m + 1) / 2.0) / (m * n))
    return value, v10, v01


def delong(y: npt.ArrayLike, p_a: npt.ArrayLike, p_b: npt.ArrayLike, level: float = 0.95) -> dict[str, Any]:
    """DeLong's test of two correlated ROC-AUCs (both models scored on the same rows).

    The AUC difference's variance is ``var(V10_a - V10_b) / m + var(V01_a - V01_b) / n`` (sample
    variances, ddof 1) over the ``m`` positives' and ``n`` negatives' structural components
    (DeLong et al. 1988), computed with midranks in O(n log n) (Sun & Xu 2014); ties are exact.

    Args:
        y: shape (n,) labels in {0, 1}; at least 2 rows of each class.
        p_a: shape (n,) scores of model A (logits or probabilities).
        p_b: shape (n,) scores of model B on the same rows.
        level: confidence level of the interval.

    Returns:
        ``auc_a``, ``auc_b``, ``se_a``, ``se_b`` (each AUC's DeLong standard error), ``diff``
        (``auc_a - auc_b``), ``se`` (of ``diff``), ``z``, ``ci_low``/``ci_high`` (``diff -/+
        z_crit * se``), ``p_value`` (two-sided, normal), ``level``, ``positives``, ``negatives``.
        With ``se == 0`` (e.g. identical or identically ranked predictions) ``z`` is 0 and
        ``p_value`` 1 when ``diff == 0``; ``z`` is ``inf``/``-inf`` and ``p_value`` 0 otherwise.

    Raises:
        ValueError: shapes differ, a score is not finite, a label is not 0/1, or a class has
            fewer than 2 rows.

    Example:
        >>> r = delong([0, 0, 1, 1, 0, 1], [0.1, 0.4, 0.35, 0.8, 0.2, 0.9], [0.3, 0.2, 0.6, 0.7, 0.1, 0.5])
        >>> r["auc_a"], r["auc_b"], round(r["se"], 4), round(r["p_value"], 3)
        (0.8888888888888888, 1.0, 0.1571, 0.48)
    """
    z_crit = _z_critical(level)
    labels, a, b = _paired_inputs(y, p_a, p_b, min_per_class=2)
    auc_a, v10_a, v01_a = _placements(labels, a)
    auc_b, v10_b, v01_b = _placements(labels, b)
    m, n = v10_a.shape[0], v01_a.shape[0]
    var = float(np.var(v10_a - v10_b, ddof=1) / m + np.var(v01_a - v01_b, ddof=1) / n)
    se = math.sqrt(var)
    diff = auc_a - auc_b
    if se > 0.0:
        z = diff / se
    else:
        z = 0.0 if diff == 0.0 else math.copysign(math.inf, diff)
    return {
        "auc_a": auc_a,
        "auc_b": auc_b,
        "se_a": math.sqrt(float(np.var(v10_a, ddof=1) / m + np.var(v01_a, ddof=1) / n)),
        "se_b": math.sqrt(float(np.var(v10_b, ddof=1) / m + np.var(v01_b, ddof=1) / n)),
        "diff": diff,
        "se": se,
        "z": z,
        "ci_low": diff - z_crit * se,
        "ci_high": diff + z_crit * se,
        "p_value": _two_sided_p(diff, se),
        "level": level,
        "positives": m,
        "negatives": n,
    }
