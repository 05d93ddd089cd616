"""PNG plots of the report over trained runs (``mptrec report``): ROC curves, training curves, EM clusters.

Needs matplotlib (the ``plots`` extra); :func:`make_plots` returns None without it. The runs are
:class:`~mptrec.pipeline.eval.report.RunRecord` s (what is read from each run folder is
described in :mod:`mptrec.pipeline.eval.report`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mptrec.io import atomic_write
from mptrec.pipeline.eval.auc import roc_curve

if TYPE_CHECKING:
    from mptrec.pipeline.eval.report import RunRecord

__all__ = ["make_plots"]


def _import_pyplot() -> Any | None:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


def _save(plt: Any, fig: Any, path: Path) -> None:
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    finally:
        plt.close(fig)


def _plot_roc(plt: Any, runs: Sequence[RunRecord], out: Path) -> list[str]:
    import pyarrow.parquet as pq

    curves: dict[str, list[tuple[str, np.ndarray, np.ndarray, float | None]]] = {}
    for r in runs:
        pred = r.predictions()
        if pred is None:
            continue
        table = pq.read_table(pred)
        for col in table.column_names:
            if not col.startswith("logit_"):
                continue
            task = col[len("logit_"):]
            labels = table.column(f"label_{task}").to_numpy()
            if labels.min() == labels.max():
                continue
            fpr, tpr = roc_curve(table.column(col).to_numpy(), labels, max_points=2000)
            curves.setdefault(task, []).append((r.run_id, fpr, tpr, r.eval["tasks"].get(task, {}).get("auc")))
    files = []
    for task, items in curves.items():
        fig, ax = plt.subplots(figsize=(5, 5))
        for run_id, fpr, tpr, auc in items:
            ax.plot(fpr, tpr, lw=1, label=f"{run_id} (AUC {auc:.4f})" if auc is not None else run_id)
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC: {task}")
        ax.legend(fontsize=7, loc="lower right")
        name = f"roc_{_slug(task)}.png"
        _save(plt, fig, out / name)
        files.append(name)
    return files


def _plot_training(plt: Any, runs: Sequence[RunRecord], out: Path) -> list[str]:
    files = []
    train = [(r.run_id, [m for m in r.metrics if "loss" in m and "step" in m]) for r in runs]
    train = [(rid, ms) for rid, ms in train if ms]
    if train:
        fig, ax = plt.subplots(figsize=(7, 4))
        for rid, ms in train:
            ax.plot([m["step"] for m in ms], [m["loss"] for m in ms], lw=1, label=rid)
        ax.set(xlabel="step", ylabel="training loss", title="Training loss")
        ax.legend(fontsize=7)
        _save(plt, fig, out / "training_loss.png")
        files.append("training_loss.png")
    valid = [(r.run_id, [m for m in r.metrics
                         if m.get("split") == "valid" and isinstance(m.get("auc"), dict)]) for r in runs]
    valid = [(rid, ms) for rid, ms in valid if ms]
    tasks = sorted({t for _, ms in valid for m in ms for t in m["auc"]})
    if tasks:
        fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 4), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            for rid, ms in valid:
                pts = [(m["epoch"], m["auc"][task]) for m in ms if m["auc"].get(task) is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="o", lw=1, label=rid)
            ax.set(xlabel="epoch", ylabel="validation AUC", title=task)
            ax.legend(fontsize=7)
        _save(plt, fig, out / "valid_auc.png")
        files.append("valid_auc.png")
    return files


def _plot_clusters(plt: Any, runs: Sequence[RunRecord], out: Path) -> list[str]:
    files = []
    for r in runs:
        ms = [m for m in r.metrics if isinstance(m.get("cluster_sizes"), list)]
        if not ms:
            continue
        x = [m.get("epoch", i) for i, m in enumerate(ms)]
        sizes = np.array([m["cluster_sizes"] for m in ms], dtype=np.float64)
        fig, ax = plt.subplots(figsize=(6, 4))
        k_tasks = sizes.shape[1]
        names = r.stage1_tasks if len(r.stage1_tasks) == k_tasks else [str(k) for k in range(k_tasks)]
        for k, name in enumerate(names):
            ax.plot(x, sizes[:, k], marker="o", lw=1, label=f"cluster {name}")
        ax.set(xlabel="epoch", ylabel="rows assigned", title=f"EM cluster sizes: {r.run_id}")
        ax.legend(fontsize=7)
        name = f"cluster_sizes_{_slug(r.run_id)}.png"
        _save(plt, fig, out / name)
        files.append(name)
    return files


def make_plots(runs: Sequence[RunRecord], out_dir: str | os.PathLike[str]) -> list[str] | None:
    """Write the PNG plots into ``out_dir``; None when matplotlib is not installed.

    Returns:
        The file names written (ROC per task, training loss, validation AUC, cluster sizes).
    """
    plt = _import_pyplot()
    if plt is None:
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return _plot_roc(plt, runs, out) + _plot_training(plt, runs, out) + _plot_clusters(plt, runs, out)
