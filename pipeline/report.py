"""Markdown report over trained runs: paper-style tables (spec section 9) and PNG plots.

``mptrec report RUN... --out DIR`` writes ``DIR/report.md`` (atomically) and, when matplotlib
is installed (the ``plots`` extra), PNG plots next to it; without matplotlib the report says the
plots were skipped.

What is read from each run directory (only ``config.json`` and ``eval.json`` are required):

- ``RUN/config.json``: the resolved run config; used: ``name``, ``model.name``,
  ``model.variant`` (optional), ``train.seed`` (optional), ``tasks[].name`` (the stage-1 tasks).
- ``RUN/eval.json``: the :mod:`mptrec.pipeline.evaluate` report (``mptrec eval --run RUN``):
  ``tasks.<name>.auc`` (exact test AUC, ``null`` if undefined), ``split``, ``checkpoint``,
  ``rows``, optional ``cvr_on_clicks``, ``gauc`` and ``predictions`` (a Parquet file with
  ``label_<task>`` / ``logit_<task>`` columns, relative to the run directory or absolute).
- ``RUN/tasks.json`` (optional): the task registry ``{"base": {...}, "tasks": {name: {"role":
  "pretrained" | "prompt_tuned", "method", "metrics": {...}, "efficiency": {...}}}}``. Assumed
  ``efficiency`` keys (as ``mptrec prompt-tune`` writes them): ``trainable_params``;
  ``trainable_fraction`` (of the full (K+1)-task model) or else ``full_model_params`` as the
  denominator; ``flops_per_sample_trained``; ``flops_fraction`` or else
  ``flops_per_sample_full`` as the denominator. A missing figure prints "-".
  A new task's AUC is taken from ``eval.json`` (exact, the evaluated split); when the task is
  not in it, from the registry's ``metrics.test_auc`` and marked with a dagger.
- ``RUN/metrics.jsonl`` (optional), one JSON object a line: training lines
  ``{"step", "epoch", "loss", "losses": {...}, "lr", "samples_per_s"}``, validation lines
  ``{"epoch", "split": "valid", "auc": {task: value | null}}`` and EM lines with
  ``"cluster_sizes": [rows per task]`` (and ``epoch`` / ``step``).

Runs are grouped by approach (``model.name``, plus ``:variant`` when not ``full``); figures are
the mean (± sample standard deviation) over a group's runs (the seeds). Gain in Table 2 is
mean AUC minus the ``single_task`` group's mean AUC of the same task.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from mptrec.io import atomic_write, atomic_write_text
from mptrec.pipeline.auc import roc_curve

__all__ = ["RunRecord", "build_report", "load_run", "make_plots", "table2", "table3"]

SINGLE_TASK = "single_task"
PLOTS_MISSING = ("Plots skipped: matplotlib is not installed "
                 "(install the `plots` extra: `pip install -e .[plots]`).")


@dataclass
class RunRecord:
    """What the report uses from one run directory.

    Args:
        path: the run directory.
        run_id: a unique short name (the directory name).
        approach: ``model.name`` (``:variant`` appended unless ``full``).
        seed: ``train.seed`` (None if absent).
        stage1_tasks: the pre-training task names, in declared order.
        eval: the ``eval.json`` report.
        registry: ``tasks.json`` (None if absent).
        metrics: the lines of ``metrics.jsonl`` ([] if absent).
    """

    path: Path
    run_id: str
    approach: str
    seed: int | None
    stage1_tasks: list[str]
    eval: dict[str, Any]
    registry: dict[str, Any] | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)

    def predictions(self) -> Path | None:
        """The predictions Parquet file named by ``eval.json``, if it exists."""
        name = self.eval.get("predictions")
        if not name:
            return None
        for p in (self.path / name, Path(name)):
            if p.is_file():
                return p
        return None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not valid JSON: {e}") from e
    return out


def load_run(run_dir: str | os.PathLike[str]) -> RunRecord:
    """Read one run directory (formats in the module docstring).

    Raises:
        FileNotFoundError: ``config.json`` or ``eval.json`` is missing (the message says how to
            produce it).
        ValueError: a file is not valid JSON or lacks a required key (naming file and key).
    """
    path = Path(run_dir)
    cfg = _read_json(path / "config.json")
    if not (path / "eval.json").is_file():
        raise FileNotFoundError(f"{path / 'eval.json'}: not found; run `mptrec eval --run {path}` first")
    ev = _read_json(path / "eval.json")
    if not isinstance(ev.get("tasks"), dict):
        raise ValueError(f"{path / 'eval.json'}: key 'tasks' must be an object of per-task metrics")
    model = cfg.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("name"), str):
        raise ValueError(f"{path / 'config.json'}: key 'model.name' is missing")
    tasks = cfg.get("tasks")
    if not isinstance(tasks, list) or not all(isinstance(t, dict) and "name" in t for t in tasks):
        raise ValueError(f"{path / 'config.json'}: key 'tasks' must be a list of objects with 'name'")
    variant = model.get("variant", "full")
    approach = model["name"] + ("" if variant in ("", "full") else f":{variant}")
    seed = cfg.get("train", {}).get("seed")
    registry = _read_json(path / "tasks.json") if (path / "tasks.json").is_file() else None
    metrics = _read_jsonl(path / "metrics.jsonl") if (path / "metrics.jsonl").is_file() else []
    return RunRecord(path=path, run_id=path.resolve().name, approach=approach, seed=seed,
                     stage1_tasks=[t["name"] for t in tasks], eval=ev, registry=registry, metrics=metrics)


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def _mean_std(values: Sequence[float]) -> tuple[float, float | None] | None:
    if not values:
        return None
    std = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return float(np.mean(values)), std


def _fmt_ms(ms: tuple[float, float | None] | None) -> str:
    if ms is None:
        return "-"
    mean, std = ms
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _groups(runs: Sequence[RunRecord]) -> dict[str, list[RunRecord]]:
    out: dict[str, list[RunRecord]] = {}
    for r in runs:
        out.setdefault(r.approach, []).append(r)
    return out


def _stage1_auc(runs: Sequence[RunRecord], task: str) -> tuple[float, float | None] | None:
    vals = [r.eval["tasks"][task]["auc"] for r in runs
            if task in r.stage1_tasks and isinstance(r.eval["tasks"].get(task, {}).get("auc"), int | float)]
    return _mean_std(vals)


def table2(runs: Sequence[RunRecord]) -> str:
    """Table 2 (paper numbering): stage-1 test AUC per task and approach, gain over Single Task."""
    tasks: list[str] = []
    for r in runs:
        tasks += [t for t in r.stage1_tasks if t not in tasks]
    groups = _groups(runs)
    single = {t: _stage1_auc(groups.get(SINGLE_TASK, []), t) for t in tasks}
    header = ["approach", "runs"]
    for t in tasks:
        header += [f"{t} AUC", f"{t} gain"]
    rows = []
    for approach, members in groups.items():
        row = [approach, str(len(members))]
        for t in tasks:
            ms = _stage1_auc(members, t)
            base = single[t]
            gain = "-" if ms is None or base is None or approach == SINGLE_TASK else f"{ms[0] - base[0]:+.4f}"
            row += [_fmt_ms(ms), gain]
        rows.append(row)
    note = ("Gain = mean AUC − Single Task mean AUC." if any(v is not None for v in single.values())
            else "No `single_task` run given: gains are not computed.")
    return _table(header, rows) + "\n\n" + note


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


def _fraction(eff: dict[str, Any], frac_key: str, part_key: str, whole_key: str) -> float | None:
    if _num(eff.get(frac_key)) is not None:
        return float(eff[frac_key])
    part, whole = _num(eff.get(part_key)), _num(eff.get(whole_key))
    return part / whole if part is not None and whole else None


def _human(x: float | None) -> str:
    if x is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


def _new_task_rows(runs: Sequence[RunRecord]) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    """(base approach, method, task) -> one entry per run: auc, from_registry, efficiency."""
    out: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in runs:
        for name, entry in ((r.registry or {}).get("tasks") or {}).items():
            if entry.get("role") != "prompt_tuned":
                continue
            auc = _num(r.eval["tasks"].get(name, {}).get("auc"))
            from_registry = auc is None and _num((entry.get("metrics") or {}).get("test_auc")) is not None
            if from_registry:
                auc = float(entry["metrics"]["test_auc"])
            key = (r.approach, str(entry.get("method", "?")), name)
            out.setdefault(key, []).append({"auc": auc, "from_registry": from_registry,
                                            "efficiency": entry.get("efficiency") or {}})
    return out


def table3(runs: Sequence[RunRecord]) -> str:
    """Table 3 (paper numbering): new tasks added to frozen backbones, with their cost."""
    rows = []
    dagger = False
    for (approach, method, task), entries in _new_task_rows(runs).items():
        aucs = [e["auc"] for e in entries if e["auc"] is not None]
        mark = " †" if any(e["from_registry"] for e in entries) else ""
        dagger |= bool(mark)
        eff = entries[0]["efficiency"]
        pfrac = _fraction(eff, "trainable_fraction", "trainable_params", "full_model_params")
        ffrac = _fraction(eff, "flops_fraction", "flops_per_sample_trained", "flops_per_sample_full")
        rows.append([task, method, approach, str(len(entries)), _fmt_ms(_mean_std(aucs)) + mark,
                     _human(_num(eff.get("trainable_params"))),
                     "-" if pfrac is None else f"{100 * pfrac:.2f}%",
                     _human(_num(eff.get("flops_per_sample_trained"))),
                     "-" if ffrac is None else f"{100 * ffrac:.2f}%"])
    if not rows:
        return "No prompt-tuned task in the runs' task registries (`RUN/tasks.json`)."
    header = ["new task", "method", "base", "runs", "AUC", "#Params", "%Params", "#FLOPs", "%FLOPs"]
    notes = ["#Params: trainable parameters of the new task; %Params relative to full (K+1)-task training; "
             "#FLOPs per sample, a multiply-add counted once."]
    if dagger:
        notes.append("† AUC from the registry's `metrics.test_auc` (the task is not in `eval.json`).")
    return _table(header, rows) + "\n\n" + "\n".join(notes)


def _extras(runs: Sequence[RunRecord]) -> str | None:
    rows = []
    for r in runs:
        cvr = r.eval.get("cvr_on_clicks")
        gauc = r.eval.get("gauc") or {}
        if cvr is None and not gauc:
            continue
        cell = "-" if cvr is None or cvr.get("auc") is None else f"{cvr['auc']:.4f} (n={cvr['n']})"
        g = ", ".join(f"{t} {v:.4f}" if v is not None else f"{t} -" for t, v in gauc.items()) or "-"
        rows.append([r.run_id, r.approach, cell, g])
    if not rows:
        return None
    return _table(["run", "approach", "CVR AUC on clicked rows", "GAUC by user"], rows)


def _runs_table(runs: Sequence[RunRecord]) -> str:
    keys = ("split", "checkpoint", "rows", "world_size", "created")
    rows = [[r.run_id, r.approach, str(r.seed)] + [str(r.eval.get(k)) for k in keys] for r in runs]
    return _table(["run", "approach", "seed", "split", "checkpoint", "rows", "processes", "evaluated"], rows)


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


def _unique_ids(runs: list[RunRecord]) -> None:
    seen: dict[str, int] = {}
    for r in runs:
        n = seen.get(r.run_id, 0)
        seen[r.run_id] = n + 1
        if n:
            r.run_id = f"{r.run_id}-{n + 1}"


def build_report(run_dirs: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str]) -> Path:
    """Write ``out_dir/report.md`` (atomically) and the plots for the given runs.

    Args:
        run_dirs: run directories (formats in the module docstring).
        out_dir: output folder (created).

    Returns:
        The path of ``report.md``.
    """
    if not run_dirs:
        raise ValueError("report needs at least one run directory")
    runs = [load_run(d) for d in run_dirs]
    _unique_ids(runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = make_plots(runs, out)
    parts = [
        "# mptrec report",
        f"Generated {datetime.now(UTC).isoformat(timespec='seconds')} from {len(runs)} run(s). "
        "AUC is exact ROC-AUC over the evaluated split (no binning); mean ± sample std over runs.",
        "## Runs", _runs_table(runs),
        "## Table 2: multi-task results (test AUC)", table2(runs),
        "## Table 3: new task on the frozen backbone", table3(runs),
    ]
    extras = _extras(runs)
    if extras:
        parts += ["## Ali-CCP extras", extras]
    parts.append("## Plots")
    if plots is None:
        parts.append(PLOTS_MISSING)
    elif not plots:
        parts.append("No plot data (no predictions file, metrics.jsonl or cluster sizes in the runs).")
    else:
        parts += [f"![{Path(p).stem}]({p})" for p in plots]
    return atomic_write_text(out / "report.md", "\n\n".join(parts) + "\n")
