"""Markdown report over trained runs: paper-style tables (spec section 9) and PNG plots (``plots.py``).

``mptrec report RUN... --out DIR`` writes ``DIR/report.md`` (atomically) and, when matplotlib
is installed (the ``plots`` extra), PNG plots next to it; without matplotlib the report says the
plots were skipped.

What is read from each run directory (only ``config.json`` and ``eval.json`` are required):

- ``RUN/config.json``: the resolved run config; used: ``name``, ``model.name``,
  ``model.variant`` (optional), ``train.seed`` (optional), ``tasks[].name`` (the stage-1 tasks).
- ``RUN/eval.json``: the :mod:`mptrec.pipeline.eval.evaluate` report (``mptrec eval --run RUN``):
  ``tasks.<name>.auc`` (exact test AUC, ``null`` if undefined), ``split``, ``checkpoint``,
  ``rows``, optional ``cvr_on_clicks``, ``gauc`` and ``predictions`` (a Parquet file with
  ``label_<task>`` / ``logit_<task>`` columns, relative to the run directory or absolute).
- ``RUN/tasks.json`` (optional): the task store ``{"base": {...}, "tasks": {name: {"role":
  "pretrained" | "prompt_tuned", "method", "metrics": {...}, "efficiency": {...}}}}``. Assumed
  ``efficiency`` keys (as ``mptrec prompt-tune`` writes them): ``trainable_params``;
  ``trainable_fraction`` (of the full (K+1)-task model) or else ``full_model_params`` as the
  denominator; ``flops_per_sample_trained``; ``flops_fraction`` or else
  ``flops_per_sample_full`` as the denominator. A missing figure prints "-".
  A new task's AUC is taken from ``eval.json`` (exact, the evaluated split); when the task is
  not in it, from the task store's ``metrics.test_auc`` and marked with a dagger.
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
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from mptrec.io import atomic_write_text
from mptrec.pipeline.eval.plots import make_plots

__all__ = ["RunRecord", "build_report", "load_run", "table2", "table3"]

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
        task_store: ``tasks.json`` (None if absent).
        metrics: the lines of ``metrics.jsonl`` ([] if absent).
    """

    path: Path
    run_id: str
    approach: str
    seed: int | None
    stage1_tasks: list[str]
    eval: dict[str, Any]
    task_store: dict[str, Any] | None = None
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
    store = _read_json(path / "tasks.json") if (path / "tasks.json").is_file() else None
    metrics = _read_jsonl(path / "metrics.jsonl") if (path / "metrics.jsonl").is_file() else []
    return RunRecord(path=path, run_id=path.resolve().name, approach=approach, seed=seed,
                     stage1_tasks=[t["name"] for t in tasks], eval=ev, task_store=store, metrics=metrics)


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
    """(base approach, method, task) -> one entry per run: auc, from_store, efficiency."""
    out: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in runs:
        for name, entry in ((r.task_store or {}).get("tasks") or {}).items():
            if entry.get("role") != "prompt_tuned":
                continue
            auc = _num(r.eval["tasks"].get(name, {}).get("auc"))
            from_store = auc is None and _num((entry.get("metrics") or {}).get("test_auc")) is not None
            if from_store:
                auc = float(entry["metrics"]["test_auc"])
            key = (r.approach, str(entry.get("method", "?")), name)
            out.setdefault(key, []).append({"auc": auc, "from_store": from_store,
                                            "efficiency": entry.get("efficiency") or {}})
    return out


def table3(runs: Sequence[RunRecord]) -> str:
    """Table 3 (paper numbering): new tasks added to frozen backbones, with their cost."""
    rows = []
    dagger = False
    for (approach, method, task), entries in _new_task_rows(runs).items():
        aucs = [e["auc"] for e in entries if e["auc"] is not None]
        mark = " †" if any(e["from_store"] for e in entries) else ""
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
