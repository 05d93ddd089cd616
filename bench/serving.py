"""Serving benchmark: ``mptrec predict`` rows/s and artifact size, fp32 vs int8 vs fp16 tables.

Usage (a trained run: ``make demo`` leaves one in ``runs/demo``)::

    python -m mptrec.bench.serving --run runs/demo --out bench/serving.json

For each table type the run is exported (``mptrec export``, ``--quantize``) and the split is
scored with the loaded artifact: ``score`` rows/s is read + convert + program over every row
group (the artifacts loaded once, one warm-up row group first, median of ``--repeats``, the
repeats interleaved over the table types);
``end_to_end_s`` is one whole ``predict()`` call (load, checks, scoring, Parquet output), one
process. The sizes are those of ``model.pt2`` and of the tables alone; the AUC changes are the
ones the export measured on the validation split (``manifest.json`` ``quantization``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from mptrec.bench.harness import Stat, jsonable, machine_info, versions, write_atomic, write_json
from mptrec.pipeline.serve.artifact import load_artifact
from mptrec.pipeline.serve.export import export_run
from mptrec.pipeline.serve.predict import plan_predict, predict, score_units

KINDS: tuple[str | None, ...] = (None, "int8", "fp16")


def serving_bench(run: str | os.PathLike[str], *, data: str | None = None, split: str = "test",
                  batch_size: int = 8192, repeats: int = 5, threads: int = 1,
                  workdir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Export the run three ways and time scoring; returns the results (see the module docstring).

    The repeats are interleaved (fp32, int8, fp16, fp32, ...) so that a change in the machine's
    load hits every table type alike.
    """
    from mptrec.pipeline.rundir import load_run_config

    torch.set_num_threads(threads)
    data_dir = data or load_run_config(run).data.path
    results: dict[str, Any] = {
        "benchmark": "serving", "run": str(run), "data": data_dir, "split": split, "batch_size": batch_size,
        "threads": threads, "processes": 1, "repeats": repeats,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(), "versions": versions(),
    }
    names = [q or "fp32" for q in KINDS]
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        work = Path(tmp)
        loaded = {}
        for q, name in zip(KINDS, names):
            t0 = time.perf_counter()
            manifest = export_run(run, work / name, quantize=q, overwrite=True)
            export_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            artifact = load_artifact(work / name)
            load_s = time.perf_counter() - t0
            plan = plan_predict(work / name, data_dir, work / f"{name}.parquet", split=split,
                                batch_size=batch_size)
            score_units(artifact, plan.units[:1], batch_size)  # warm-up
            loaded[name] = (manifest, artifact, plan, export_s, load_s)
        rates: dict[str, list[float]] = {n: [] for n in names}
        for r in range(repeats):
            for name in names:
                _, artifact, plan, _, _ = loaded[name]
                t0 = time.perf_counter()
                score_units(artifact, plan.units, batch_size)
                rates[name].append(plan.rows / (time.perf_counter() - t0))
                print(f"[bench] serving {name} {r + 1}/{repeats}: {rates[name][-1]:,.0f} rows/s",
                      file=sys.stderr)
        for name in names:
            manifest, _, plan, export_s, load_s = loaded[name]
            e2e = predict(work / name, data_dir, work / f"{name}.parquet", split=split, batch_size=batch_size,
                          progress=False)
            q = manifest.get("quantization") or {}
            tasks = q.get("eval", {}).get("tasks", {})
            results[name] = {
                "rows": plan.rows,
                "score": Stat(rates[name], "rows/s"),
                "end_to_end_s": e2e["seconds"],
                "end_to_end_rows_per_s": e2e["rows_per_s"],
                "export_s": round(export_s, 2),
                "load_s": round(load_s, 3),
                "program_bytes": manifest["program"]["bytes"],
                "table_bytes": manifest["tables"]["bytes"],
                "size_reduction": q.get("size_reduction"),
                "auc_delta": {t: v["auc_delta"] for t, v in tasks.items()} or None,
                "auc_eval_rows": q.get("eval", {}).get("rows"),
            }
    fp32 = results["fp32"]["score"].median
    for name in ("int8", "fp16"):
        results[name]["score_vs_fp32"] = results[name]["score"].median / fp32
    return results


def markdown(results: dict[str, Any]) -> str:
    """A Markdown table of the results (as :func:`serving_bench` returns them, or as JSON)."""
    results = jsonable(results)
    lines = [
        f"Serving (`mptrec predict`, {results['processes']} process, {results['threads']} thread, batch "
        f"{results['batch_size']}, {results[('fp32')]['rows']:,} rows of `{results['split']}`, median of "
        f"{results['repeats']}):",
        "",
        "| tables | score rows/s | end to end (s) | model.pt2 MiB | tables MiB | size vs fp32 | AUC change |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for kind in ("fp32", "int8", "fp16"):
        r = results[kind]
        red = "-" if r["size_reduction"] is None else f"-{100 * r['size_reduction']:.0f}%"
        rel = f" ({r['score_vs_fp32']:.2f}x)" if "score_vs_fp32" in r else ""
        auc = "-" if not r["auc_delta"] else ", ".join(f"{t} {d:+.5f}" for t, d in r["auc_delta"].items())
        lines.append(f"| {kind} | {r['score']['median']:,.0f}{rel} | {r['end_to_end_s']:.2f} | "
                     f"{r['program_bytes'] / 2**20:.1f} | {r['table_bytes'] / 2**20:.1f} | {red} | {auc} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m mptrec.bench.serving --run RUN --out FILE.json``."""
    p = argparse.ArgumentParser(prog="python -m mptrec.bench.serving", description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/demo", help="trained run (default: runs/demo, from `make demo`)")
    p.add_argument("--data", default=None, help="shard folder (default: the run's data.path)")
    p.add_argument("--split", default="test")
    p.add_argument("--batch-size", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench/serving.json", help="results JSON (and .md beside it)")
    args = p.parse_args(argv)
    results = serving_bench(args.run, data=args.data, split=args.split, batch_size=args.batch_size,
                            repeats=args.repeats, threads=args.threads)
    given = argv if argv is not None else sys.argv[1:]
    results["command"] = "python -m mptrec.bench.serving " + " ".join(given)
    write_json(args.out, results)
    table = markdown(results)
    write_atomic(Path(args.out).with_suffix(".md"), table)
    print(table)
    print(f"results: {args.out}, {Path(args.out).with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
