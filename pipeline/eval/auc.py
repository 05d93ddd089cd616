"""Exact offline metrics: ROC-AUC (Mann-Whitney, ties by average rank), logloss, calibration, GAUC.

No binning and no window: every row counts. TorchRec's ``AUCMetric`` keeps a window
(../shared/stack.md). torchmetrics' ``BinaryAUROC(thresholds=None)`` is exact in principle and is
the independent oracle of this module's tests, but it accumulates its counts in float32, so it is
inexact beyond 2^24 rows (the counts round), it turns scores outside [0, 1] into probabilities
with a float32 sigmoid (which ties distinct large logits), and it has no grouped AUC (GAUC); here
the counts are int64, the sums float64 and the scores are ranked as given. A task whose rows are
all of one class has an undefined AUC, returned as ``None`` (JSON ``null``), never 0.5.

AUC is computed from the scores as given; pass logits rather than probabilities, since
``sigmoid`` in float32 maps distinct large logits to the same probability and creates ties.

Distributed use: every rank collects its own rows, then :func:`gather_for_auc` (or
:meth:`ScoreBuffer.gather`) all-gathers the variable-length arrays so the exact AUC is computed
over the union of all ranks' rows.

Example:
    >>> exact_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    0.75
    >>> exact_auc([0.1, 0.2], [1, 1]) is None
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.distributed as dist

from mptrec.pipeline.distributed import comm_device, is_distributed

__all__ = [
    "ScoreBuffer",
    "binary_metrics",
    "exact_auc",
    "gather_for_auc",
    "gather_rows",
    "grouped_auc",
    "roc_curve",
]

ArrayLike = torch.Tensor | npt.ArrayLike
FloatArray = npt.NDArray[np.float64]


def _to_numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _check_inputs(
    scores: ArrayLike, labels: ArrayLike, what: str = "scores"
) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert to (scores as float, labels as bool) 1-D arrays."""
    s = _to_numpy(scores)
    y = _to_numpy(labels)
    if s.ndim != 1 or y.ndim != 1:
        raise ValueError(f"{what} and labels must be 1-D, got shapes {s.shape} and {y.shape}")
    if s.shape[0] != y.shape[0]:
        raise ValueError(f"{what} has {s.shape[0]} rows but labels has {y.shape[0]}")
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    if s.size and not np.isfinite(s).all():
        bad = int(np.flatnonzero(~np.isfinite(s))[0])
        raise ValueError(f"{what} must be finite; row {bad} is {s[bad]!r}")
    if y.dtype != np.bool_:
        ok = (y == 0) | (y == 1)
        if not ok.all():
            bad = int(np.flatnonzero(~ok)[0])
            raise ValueError(f"labels must be 0 or 1; row {bad} is {y[bad]!r}")
        y = y.astype(np.bool_)
    return s, y


def _tie_blocks(sorted_keys: Sequence[np.ndarray]) -> np.ndarray:
    """Start index of each run of equal keys in lexicographically sorted arrays."""
    n = sorted_keys[0].shape[0]
    change = np.zeros(n, dtype=np.bool_)
    change[:1] = True
    for k in sorted_keys:
        change[1:] |= k[1:] != k[:-1]
    return np.flatnonzero(change)


def _block_counts(y_sorted: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positives, negatives) per block of the sorted labels (int64)."""
    pos = np.add.reduceat(y_sorted.astype(np.int64), starts)
    size = np.diff(np.append(starts, y_sorted.shape[0]))
    return pos, size - pos


def exact_auc(scores: ArrayLike, labels: ArrayLike) -> float | None:
    """Exact ROC-AUC with ties counted as one half (equal to ``sklearn.metrics.roc_auc_score``).

    O(n log n): one sort, then per run of tied scores, ``pos * (negatives below) + pos * neg / 2``
    summed in int64 and divided once by ``P * N``.

    Args:
        scores: shape (n,) scores (logits or probabilities), any float or int dtype; finite.
        labels: shape (n,) labels in {0, 1} (bool, int or float).

    Returns:
        The AUC, or ``None`` when the rows hold fewer than two classes (undefined).

    Raises:
        ValueError: shapes differ, a score is NaN/inf, or a label is not 0/1 (naming the row).
    """
    s, y = _check_inputs(scores, labels)
    n = s.shape[0]
    num_pos = int(np.count_nonzero(y))
    num_neg = n - num_pos
    if num_pos == 0 or num_neg == 0:
        return None
    order = np.argsort(s)
    s_sorted = s[order]
    starts = _tie_blocks([s_sorted])
    pos, neg = _block_counts(y[order], starts)
    neg_below = np.cumsum(neg) - neg
    # twice the Mann-Whitney U statistic, exact in int64 up to ~3e9 rows per class
    twice_u = int(2 * np.dot(pos, neg_below) + np.dot(pos, neg))
    return twice_u / (2.0 * num_pos * num_neg)


def grouped_auc(scores: ArrayLike, labels: ArrayLike, groups: ArrayLike) -> float | None:
    """Group AUC (GAUC): per-group exact AUC, averaged with weights = rows (impressions) per group.

    Only groups holding both classes count (in the AUC and in the weights).

    Args:
        scores: shape (n,) scores.
        labels: shape (n,) labels in {0, 1}.
        groups: shape (n,) integer group ids (e.g. the Ali-CCP user field ``101``).

    Returns:
        The GAUC, or ``None`` when no group has both classes.
    """
    value, _ = grouped_auc_details(scores, labels, groups)
    return value


def grouped_auc_details(scores: ArrayLike, labels: ArrayLike, groups: ArrayLike) -> tuple[float | None, int]:
    """:func:`grouped_auc` and the number of groups that have both classes."""
    s, y = _check_inputs(scores, labels)
    g = _to_numpy(groups)
    if g.shape != s.shape:
        raise ValueError(f"groups has shape {g.shape} but scores has shape {s.shape}")
    if s.size == 0:
        return None, 0
    by_score = np.argsort(s)
    order = by_score[np.argsort(g[by_score], kind="stable")]  # by group, then score (2x lexsort's speed)
    s_sorted, g_sorted = s[order], g[order]
    blocks = _tie_blocks([g_sorted, s_sorted])
    pos, neg = _block_counts(y[order], blocks)
    block_group = g_sorted[blocks]
    new_group = np.ones(blocks.shape[0], dtype=np.bool_)
    new_group[1:] = block_group[1:] != block_group[:-1]
    group_first = np.flatnonzero(new_group)  # first block of each group
    group_index = np.cumsum(new_group) - 1
    neg_excl = np.cumsum(neg) - neg
    neg_below = neg_excl - neg_excl[group_first][group_index]
    twice_u = np.add.reduceat(2 * pos * neg_below + pos * neg, group_first)
    group_pos = np.add.reduceat(pos, group_first)
    group_neg = np.add.reduceat(neg, group_first)
    valid = (group_pos > 0) & (group_neg > 0)
    if not valid.any():
        return None, 0
    size = (group_pos + group_neg)[valid].astype(np.float64)
    auc = twice_u[valid] / (2.0 * group_pos[valid] * group_neg[valid])
    return float(np.dot(size, auc) / size.sum()), int(valid.sum())


def roc_curve(scores: ArrayLike, labels: ArrayLike, max_points: int = 0) -> tuple[FloatArray, FloatArray]:
    """Exact ROC points (one per distinct score, from (0, 0) to (1, 1)).

    Args:
        scores: shape (n,) scores.
        labels: shape (n,) labels in {0, 1}; both classes must be present.
        max_points: keep at most this many points (evenly spaced, ends kept); 0 keeps all.

    Returns:
        (false positive rates, true positive rates), each of shape (m,).
    """
    s, y = _check_inputs(scores, labels)
    order = np.argsort(-s)
    starts = _tie_blocks([s[order]])
    pos, neg = _block_counts(y[order], starts)
    if pos.sum() == 0 or neg.sum() == 0:
        raise ValueError("roc_curve needs both classes")
    tpr = np.concatenate([[0.0], np.cumsum(pos) / pos.sum()])
    fpr = np.concatenate([[0.0], np.cumsum(neg) / neg.sum()])
    if max_points and fpr.shape[0] > max_points:
        keep = np.unique(np.linspace(0, fpr.shape[0] - 1, max_points).round().astype(np.int64))
        fpr, tpr = fpr[keep], tpr[keep]
    return fpr, tpr


def binary_metrics(logits: ArrayLike, labels: ArrayLike) -> dict[str, Any]:
    """AUC, logloss, calibration and counts of one binary task, from logits.

    Args:
        logits: shape (n,) logits (pre-sigmoid scores).
        labels: shape (n,) labels in {0, 1}.

    Returns:
        ``{"auc", "logloss", "calibration", "n", "positives", "positive_rate"}``. ``auc`` is
        ``None`` with fewer than two classes; ``calibration`` (mean predicted probability /
        mean label) is ``None`` without positives; ``logloss`` and ``positive_rate`` are
        ``None`` for zero rows. ``logloss`` is the mean of
        ``max(x, 0) - x*y + log1p(exp(-|x|))`` (stable for any logit).
    """
    x, y = _check_inputs(logits, labels, what="logits")
    x = x.astype(np.float64, copy=False)
    n = int(x.shape[0])
    positives = int(np.count_nonzero(y))
    if n == 0:
        return {"auc": None, "logloss": None, "calibration": None, "n": 0, "positives": 0,
                "positive_rate": None}
    loss = np.maximum(x, 0.0) - x * y + np.log1p(np.exp(-np.abs(x)))
    # sigmoid without overflow: exp(-|x|) is in (0, 1]
    e = np.exp(-np.abs(x))
    prob = np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return {
        "auc": exact_auc(x, y),
        "logloss": float(loss.mean()),
        "calibration": float(prob.sum() / positives) if positives else None,
        "n": n,
        "positives": positives,
        "positive_rate": positives / n,
    }


# --------------------------------------------------------------------------------------------
# Distributed exact merge
# --------------------------------------------------------------------------------------------


def gather_rows(*tensors: torch.Tensor, group: dist.ProcessGroup | None = None) -> list[torch.Tensor]:
    """All-gather variable-length tensors along dim 0: every rank gets every rank's rows.

    Each rank may hold a different number of rows (zero included). The tensors are padded to the
    largest row count, all-gathered, and the padding is cut off; rank order is kept. Without an
    initialised process group (or with world size 1) the inputs are returned unchanged (on CPU).

    Args:
        *tensors: tensors with the same number of rows on this rank (dtypes may differ); the
            trailing dims and dtypes must match across ranks.
        group: process group (default: the world).

    Returns:
        One CPU tensor per input with the rows of rank 0, then rank 1, ...
    """
    if not tensors:
        return []
    rows = int(tensors[0].shape[0])
    for t in tensors[1:]:
        if int(t.shape[0]) != rows:
            raise ValueError(f"gather_rows: tensors have {rows} and {int(t.shape[0])} rows")
    if not is_distributed(group):
        return [t.detach().cpu() for t in tensors]
    device = comm_device(group)
    world = dist.get_world_size(group)
    size = torch.tensor([rows], dtype=torch.int64, device=device)
    sizes_t = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes_t, size, group=group)
    sizes = [int(s.item()) for s in sizes_t]
    width = max(1, max(sizes))  # never all-gather zero-sized buffers
    out: list[torch.Tensor] = []
    for t in tensors:
        t = t.detach().to(device)
        padded = torch.zeros((width, *t.shape[1:]), dtype=t.dtype, device=device)
        padded[:rows] = t
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=group)
        out.append(torch.cat([p[:k] for p, k in zip(parts, sizes)]).cpu())
    return out


def gather_for_auc(
    local_scores: torch.Tensor, local_labels: torch.Tensor, group: dist.ProcessGroup | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather this rank's scores and labels so any rank can compute the exact AUC of all rows.

    Args:
        local_scores: shape (n_r,) or (n_r, T) scores of this rank's rows (n_r may be 0).
        local_labels: labels of the same rows, same leading dim.
        group: process group (default: the world; no-op when not distributed).

    Returns:
        (scores, labels) of all ranks' rows, concatenated in rank order, on CPU.

    Example:
        >>> s, y = gather_for_auc(torch.tensor([0.3, 0.9]), torch.tensor([0.0, 1.0]))
        >>> exact_auc(s, y)
        1.0
    """
    scores, labels = gather_rows(local_scores, local_labels, group=group)
    return scores, labels


class ScoreBuffer:
    """Collects per-task logits and labels batch by batch, then merges ranks exactly.

    Used by :func:`mptrec.pipeline.eval.evaluate.evaluate` and the training loop's validation.

    Args:
        task_names: the tasks, in output order.
        keep_ids: also keep ``sample_ids`` (for prediction dumps).
        keep_groups: also keep a per-row group id (GAUC).

    Example:
        >>> buf = ScoreBuffer(["ctr"])
        >>> buf.update({"ctr": torch.tensor([0.2, -1.0])}, {"ctr": torch.tensor([1.0, 0.0])})
        >>> buf.compute_auc()
        {'ctr': 1.0}
    """

    def __init__(self, task_names: Sequence[str], keep_ids: bool = False, keep_groups: bool = False) -> None:
        if not task_names:
            raise ValueError("ScoreBuffer needs at least one task")
        self.task_names: list[str] = list(task_names)
        self.keep_ids: bool = keep_ids
        self.keep_groups: bool = keep_groups
        self._logits: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._ids: list[torch.Tensor] = []
        self._groups: list[torch.Tensor] = []

    def __len__(self) -> int:
        return sum(int(t.shape[0]) for t in self._logits)

    def update(
        self,
        logits: Mapping[str, torch.Tensor],
        labels: Mapping[str, torch.Tensor],
        sample_ids: torch.Tensor | None = None,
        groups: torch.Tensor | None = None,
    ) -> None:
        """Add one batch of rows.

        Args:
            logits: task -> shape (B,) logits (every task of ``task_names``).
            labels: task -> shape (B,) labels in {0, 1}.
            sample_ids: shape (B,) int64 row ids (required if ``keep_ids``).
            groups: shape (B,) int64 group ids (required if ``keep_groups``).
        """
        for name, source in (("logits", logits), ("labels", labels)):
            missing = [t for t in self.task_names if t not in source]
            if missing:
                raise KeyError(f"{name} lack task(s) {missing}; got {sorted(source)}")
        self._logits.append(torch.stack([logits[t].detach().reshape(-1).float().cpu()
                                         for t in self.task_names], dim=1))
        self._labels.append(torch.stack([labels[t].detach().reshape(-1).float().cpu()
                                         for t in self.task_names], dim=1))
        for keep, value, store, what in ((self.keep_ids, sample_ids, self._ids, "sample_ids"),
                                         (self.keep_groups, groups, self._groups, "groups")):
            if keep:
                if value is None:
                    raise ValueError(f"this ScoreBuffer keeps {what}: pass {what} to update()")
                store.append(value.detach().reshape(-1).long().cpu())

    def local(self) -> dict[str, torch.Tensor]:
        """This rank's rows: ``logits`` (n, T), ``labels`` (n, T), and ``sample_ids``/``groups`` (n,)."""
        t = len(self.task_names)
        out = {
            "logits": torch.cat(self._logits) if self._logits else torch.zeros(0, t),
            "labels": torch.cat(self._labels) if self._labels else torch.zeros(0, t),
        }
        if self.keep_ids:
            out["sample_ids"] = torch.cat(self._ids) if self._ids else torch.zeros(0, dtype=torch.long)
        if self.keep_groups:
            out["groups"] = torch.cat(self._groups) if self._groups else torch.zeros(0, dtype=torch.long)
        return out

    def gather(self, group: dist.ProcessGroup | None = None) -> dict[str, torch.Tensor]:
        """All ranks' rows (collective: every rank of ``group`` must call it)."""
        local = self.local()
        keys = list(local)
        merged = gather_rows(*(local[k] for k in keys), group=group)
        return dict(zip(keys, merged))

    def compute(self, group: dist.ProcessGroup | None = None) -> dict[str, dict[str, Any]]:
        """:func:`binary_metrics` per task over all ranks' rows (collective)."""
        rows = self.gather(group)
        return {t: binary_metrics(rows["logits"][:, i].numpy(), rows["labels"][:, i].numpy())
                for i, t in enumerate(self.task_names)}

    def compute_auc(self, group: dist.ProcessGroup | None = None) -> dict[str, float | None]:
        """Exact AUC per task over all ranks' rows (collective); ``None`` where undefined."""
        rows = self.gather(group)
        return {t: exact_auc(rows["logits"][:, i].numpy(), rows["labels"][:, i].numpy())
                for i, t in enumerate(self.task_names)}

    def reset(self) -> None:
        """Drop every collected row."""
        self._logits.clear()
        self._labels.clear()
        self._ids.clear()
        self._groups.clear()
