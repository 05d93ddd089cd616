"""``mptrec prompt-tune``: stage 2, train a registered new task on the frozen stage-1 model.

Examples::

    mptrec tasks register --run runs/aliccp --task-config configs/tasks/aliccp_scenario.toml
    mptrec prompt-tune --run runs/aliccp --task scenario
    mptrec prompt-tune --run runs/aliccp --task scenario --nproc 2 --set epochs=5
    mptrec prompt-tune --run runs/aliccp --task scenario --compare-full

``--nproc N`` (N > 1) runs ``mptrec.launch.worker_prompt_tune`` under torchrun. ``--compare-full``
also trains the stage-1 model from scratch with the task added (same data and epochs as
stage 1, same number of processes) and records wall time, peak memory and the old tasks' AUC
change next to the prompt-tuning figures; both jobs then run as child processes so their peak
memory is measured alike.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``mptrec prompt-tune``."""
    parser.add_argument("--run", "--run-dir", dest="run", required=True,
                        help="stage-1 run directory (with tasks.json); --run-dir is the same option, "
                        "safe after torchrun (which reads --run as its own --run-path)")
    parser.add_argument("--task", required=True, help="registered new task (mptrec tasks register)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the registered task config, repeatable: --set epochs=3")
    parser.add_argument("--nproc", type=int, default=0,
                        help="N > 1: run under torchrun with N local processes (default: one process)")
    parser.add_argument("--compare-full", action="store_true",
                        help="also measure full retraining with the task added (slow: trains stage 1 again)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _forwarded(args: argparse.Namespace) -> list[str]:
    argv = ["--run-dir", args.run, "--task", args.task]  # torchrun reads "--run" as its --run-path
    for item in args.overrides:
        argv += ["--set", item]
    return argv + (["--no-progress"] if args.no_progress else [])


def run(args: argparse.Namespace) -> int:
    """Run ``mptrec prompt-tune``."""
    if args.nproc < 0:
        print(f"mptrec prompt-tune: --nproc must be >= 0, got {args.nproc}", file=sys.stderr)
        return 2
    if args.nproc > 1 and "RANK" in os.environ:
        print("mptrec prompt-tune: --nproc > 1 inside a torchrun job; drop --nproc", file=sys.stderr)
        return 2
    from mptrec.launch import worker_prompt_tune

    if args.nproc > 1 or args.compare_full:
        from mptrec.launch.relaunch import run_module

        t0 = time.perf_counter()
        rc = run_module(worker_prompt_tune.__name__, _forwarded(args), args.nproc)
        process_wall = time.perf_counter() - t0
    else:
        rc = worker_prompt_tune.main(_forwarded(args))
    if rc != 0 or not args.compare_full:
        return rc
    import json

    from mptrec.pipeline.rundir import RunDirError

    try:
        result = compare_full(args.run, args.task, max(1, args.nproc), progress=not args.no_progress,
                              stage2_process_wall_s=process_wall)
    except (RunDirError, RuntimeError) as e:
        print(f"mptrec prompt-tune --compare-full: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


def compare_full(run_dir: str, task: str, nproc: int, *, progress: bool = True,
                 stage2_process_wall_s: float | None = None) -> dict[str, Any]:
    """Train the stage-1 model from scratch with the task added, in a child job; record the comparison.

    The child is ``python -m mptrec.launch.worker_prompt_tune --full-retrain`` (under torchrun for
    ``nproc > 1``), so its peak memory is a separate process's, measured as the stage-2 job's.
    The steps around it are :mod:`mptrec.pipeline.tasks.full_retrain`'s.

    Args:
        run_dir: the stage-1 run folder.
        task: a trained prompt-tuned task.
        nproc: processes of the full-retraining job (use the stage-2 job's).
        progress: progress output of the child job.
        stage2_process_wall_s: wall time of the whole stage-2 process, compared with the child's.

    Returns:
        The comparison (:func:`mptrec.pipeline.tasks.full_retrain.comparison`).

    Raises:
        RunDirError: the task is not trained.
        RuntimeError: the child job failed.
    """
    from mptrec.launch import worker_prompt_tune
    from mptrec.launch.relaunch import run_module
    from mptrec.pipeline.tasks.full_retrain import (
        prepare_full_retraining,
        read_full_retraining,
        record_comparison,
    )

    job = prepare_full_retraining(run_dir, task)
    args = ["--full-retrain", str(job.config), "--result", str(job.result)]
    t0 = time.perf_counter()
    rc = run_module(worker_prompt_tune.__name__, args + ([] if progress else ["--no-progress"]), nproc)
    if rc != 0 or not job.result.is_file():
        raise RuntimeError(f"full retraining for the comparison failed (exit code {rc}); see {job.out}")
    full = read_full_retraining(job, time.perf_counter() - t0)
    return record_comparison(run_dir, task, full, stage2_process_wall_s=stage2_process_wall_s)
