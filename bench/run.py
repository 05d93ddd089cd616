"""``mptrec bench``: every benchmark in one run, results as JSON and Markdown.

Sections (each one's failure is recorded in the JSON and makes the command exit non-zero, the
others still run): stage-1 throughput at the paper's dims and at width 32 against the two plain
PyTorch references, 1 vs 2 processes, a profile of the step, dense-side speedups (with the bf16
AUC check), the loader, the new-task cost, evaluation. The JSON is rewritten (atomically) after
every section, so a long run that is interrupted keeps what it measured.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from mptrec.bench import SECTIONS
from mptrec.bench.common import PAPER, WIDTH32, Settings, ensure_data, make_settings, process_group
from mptrec.bench.harness import Stat, jsonable, machine_info, thread_info, versions, write_atomic, write_json

#: 1-minute load average above which the results carry a "machine not idle" warning.
BUSY_LOAD = 0.5

#: The trained run the serving section exports and scores (``make demo`` leaves one).
DEFAULT_SERVING_RUN = Path("runs") / "demo"

#: Headline key -> (path into the results, target, direction).
TARGETS: dict[str, tuple[tuple[str, ...], float, str]] = {
    "stage1_speedup_vs_plain_pytorch": (("stage1", "paper_dims", "speedup_vs_plain"), 3.0, ">="),
    "stage1_speedup_vs_sparse_pytorch": (("stage1", "paper_dims", "speedup_vs_sparse"), 2.0, ">="),
    "stage1_speedup_vs_plain_pytorch_width32": (("stage1", "width32", "speedup_vs_plain"), 5.0, ">="),
    "prompt_tune_time_fraction_of_full": (("new_task", "time_fraction_of_full"), 0.10, "<="),
    "prompt_tune_time_fraction_of_full_uncached": (
        ("new_task", "time_fraction_of_full_uncached"), 0.25, "<="
    ),
    "loader_fraction_of_bare_read": (("loader", "vs_bare", "fraction"), 0.5, ">="),
    "loader_fed_training_fraction_of_step": (
        ("loader", "training", "end_to_end_fraction_of_step"), 0.9, ">="
    ),
}


def _median(results: dict[str, Any], path: Sequence[str]) -> float | None:
    node: Any = results
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    if isinstance(node, Stat):
        return node.median
    if isinstance(node, dict) and "median" in node:
        return float(node["median"])
    return None


#: A variant "helped" when its median speedup over the baseline is at least this.
HELPED = 1.05


def dense_summary(results: dict[str, Any]) -> dict[str, Any] | None:
    """Which dense-side variants helped (bf16 ones only where the AUC check holds)."""
    dense = results.get("dense_speedups")
    if not isinstance(dense, dict) or "error" in dense:
        return None
    auc = results.get("bf16_auc")
    bf16_ok = isinstance(auc, dict) and auc.get("holds") is True
    helped, not_helped, excluded = [], [], []
    for name, v in dense.items():
        if v.get("kind") not in ("speedup", "proposal") or "vs_baseline" not in v:
            continue
        speedup = _median(v, ("vs_baseline",))
        entry = f"{name} ({speedup:.2f}x)" if speedup is not None else name
        if v.get("bf16") and not bf16_ok:
            excluded.append(entry)
        elif speedup is not None and speedup >= HELPED:
            helped.append(entry)
        else:
            not_helped.append(entry)
    return {
        "helped": helped,
        "did_not_help": not_helped,
        "bf16_excluded_auc_not_shown_to_hold": excluded,
        "threshold": HELPED,
    }


def headline(results: dict[str, Any]) -> None:
    """Fill the top-level keys (medians) and the ``targets`` table from the sections."""
    targets = {}
    for key, (path, target, direction) in TARGETS.items():
        value = _median(results, path)
        results[key] = value
        met = None
        if value is not None and direction:
            met = value >= target if direction == ">=" else value <= target
        targets[key] = {"value": value, "target": f"{direction} {target:g}" if direction else "-", "met": met}
    results["targets"] = targets
    results["dense_speedups_summary"] = dense_summary(results)


def _sections(
    s: Settings, schema: dict[str, Any], group: Any, plot_path: Path, serving_run: Path
) -> dict[str, Callable[[], Any]]:
    from mptrec.bench.allocator import allocator
    from mptrec.bench.dense import bf16_auc_check, dense_speedups, profile_stage1
    from mptrec.bench.evalbench import eval_throughput
    from mptrec.bench.growth import growth, plot
    from mptrec.bench.loader import loader_vs_bare, training_bottleneck
    from mptrec.bench.newtask import new_task
    from mptrec.bench.scaling import scaling
    from mptrec.bench.stage1 import compare

    def stage1() -> dict[str, Any]:
        return {size.name: compare(s, schema, size, group) for size in (PAPER, WIDTH32)}

    def dense() -> dict[str, Any]:
        return dense_speedups(s, schema, group)

    def loader() -> dict[str, Any]:
        from mptrec.bench.common import run_config

        workers = run_config(s, PAPER).data.num_workers
        return {"vs_bare": loader_vs_bare(s, workers), "training": training_bottleneck(s, schema, group)}

    def growth_curves() -> dict[str, Any]:
        out = growth(s)
        if plot(out, plot_path):
            out["plot"] = plot_path.name
        return out

    def serving() -> dict[str, Any]:
        from mptrec.bench.serving import serving_bench

        if not (serving_run / "tasks.json").is_file():
            why = f"no trained run at {serving_run} (run `make demo` first, or pass --serving-run)"
            return {"skipped": why}
        return serving_bench(serving_run, repeats=s.repeats, threads=1, workdir=s.workdir)

    return {
        "stage1": stage1,
        "scaling": lambda: scaling(s),
        "profile": lambda: profile_stage1(s, schema, group),
        "allocator": lambda: allocator(s),
        "dense": dense,
        "bf16_auc": lambda: bf16_auc_check(s, schema, group),
        "loader": loader,
        "new_task": lambda: new_task(s, schema, group),
        "eval": lambda: eval_throughput(s, schema, group),
        "growth": growth_curves,
        "serving": serving,
    }


def run_bench(
    out: str | Path,
    *,
    markdown: str | Path | None = None,
    quick: bool = False,
    repeats: int = 0,
    threads: int = 0,
    workdir: str | Path | None = None,
    only: Sequence[str] = (),
    compile_dense: bool | None = None,
    command: str = "mptrec bench",
    settings: Settings | None = None,
    config: str | Path | None = None,
    serving_run: str | Path = DEFAULT_SERVING_RUN,
) -> dict[str, Any]:
    """Run the benchmarks, write ``out`` (JSON) and ``markdown``; returns the results.

    ``settings`` replaces the ones derived from ``quick``/``repeats``/``threads``/``workdir``
    (tests use it for tiny sizes).
    """
    logging.getLogger("torchrec").setLevel(logging.ERROR)
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown bench section(s) {unknown}; choose from {list(SECTIONS)}")
    out = Path(out)
    s = settings or make_settings(
        quick,
        workdir or Path("runs") / "bench",
        repeats=repeats,
        threads=threads,
        compile_dense=compile_dense,
        config=config,
    )
    torch.set_num_threads(s.threads)
    results = _new_results(s, quick, command)
    t_start = time.perf_counter()
    schema = ensure_data(s)
    chosen = list(only) or list(SECTIONS)
    if "dense" in chosen:
        chosen.insert(chosen.index("dense") + 1, "bf16_auc")
    with process_group() as group:
        fns = _sections(s, schema, group, out.with_name(out.stem + ".growth.png"), Path(serving_run))
        for name in chosen:
            print(f"[bench] === {name} ===", file=sys.stderr)
            t0 = time.perf_counter()
            key = "dense_speedups" if name == "dense" else name
            try:
                results[key] = fns[name]()
            except Exception as e:  # noqa: BLE001 - record, go on with the other sections
                traceback.print_exc()
                results[key] = {"error": f"{type(e).__name__}: {e}"}
                results["errors"][key] = results[key]["error"]
            results["section_wall_s"][key] = round(time.perf_counter() - t0, 1)
            torch.set_num_threads(s.threads)
            _write(results, out, markdown, t_start)
    return results


def _new_results(s: Settings, quick: bool, command: str) -> dict[str, Any]:
    """The results before any section ran: the run's settings, the machine, the versions."""
    return {
        "benchmark": "mptrec bench",
        "quick": quick,
        "command": command,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        **{key: None for key in TARGETS},
        "machine": machine_info(),
        "versions": versions(),
        "threads": thread_info(),
        "settings": {
            "repeats": s.repeats,
            "warmup_steps": s.warmup,
            "timed_steps": s.steps,
            "rows": s.rows,
            "distinct_batches": s.distinct_batches,
            "threads": s.threads,
            "config": str(s.config),
            "data": str(s.data_dir),
            "compile": s.compile,
            "auc_steps": s.auc_steps,
        },
        "targets": {},
        "warnings": [],
        "errors": {},
        "section_wall_s": {},
        "wall_s": None,
    }


def _write(results: dict[str, Any], out: Path, markdown: str | Path | None, t_start: float) -> None:
    from mptrec.bench.report import render

    results["wall_s"] = round(time.perf_counter() - t_start, 1)
    results["machine"]["load_average_at_end"] = list(os.getloadavg())
    load = results["machine"]["load_average_at_start"][0]
    if load > BUSY_LOAD:
        results["warnings"] = [
            f"the machine was not idle (1-minute load average {load:.2f} at the start): other processes "
            "share the cores, so the figures (those with 2 threads above all) are noisy; rerun on an "
            "idle machine"
        ]
    headline(results)
    write_json(out, results)
    if markdown:
        write_atomic(markdown, render(jsonable(results)))
