"""``mptrec train``: stage-1 pre-training (``mptrec.launch.worker_train``), in-process or under torchrun.

Examples::

    mptrec train --config configs/debug.toml --set data.path=runs/debug/data
    mptrec train --config configs/aliccp_synth.toml --nproc 2
    mptrec train --config configs/aliccp_synth.toml --nproc 2 --resume
"""

from __future__ import annotations

import argparse
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``mptrec train``."""
    parser.add_argument("--config", required=True, help="run config (TOML), e.g. configs/aliccp_synth.toml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (TOML syntax), repeatable: --set train.lr=0.01")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the last checkpoint in the run's out_dir (exact resume)")
    parser.add_argument("--nproc", type=int, default=0,
                        help="N > 1: re-run under torchrun with N local processes (default: this process; "
                        "world size from the torchrun environment if set, else 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _forwarded(args: argparse.Namespace) -> list[str]:
    argv = ["--config", args.config]
    for item in args.overrides:
        argv += ["--set", item]
    if args.resume:
        argv.append("--resume")
    if args.no_progress:
        argv.append("--no-progress")
    return argv


def _check_before_launch(args: argparse.Namespace) -> str:
    """The config and data checks of a run, in this process ("" when they pass)."""
    from mptrec.data_loaders.schema import DataError
    from mptrec.pipeline.config import load_config
    from mptrec.pipeline.strict import ConfigError
    from mptrec.pipeline.train.pretrain import check_data

    try:
        check_data(load_config(args.config, args.overrides))
    except (ConfigError, DataError) as e:
        return str(e)
    return ""


def run(args: argparse.Namespace) -> int:
    """Run ``mptrec train``."""
    if args.nproc < 0:
        print(f"mptrec train: --nproc must be >= 0, got {args.nproc}", file=sys.stderr)
        return 2
    if args.nproc > 1:
        if "RANK" in os.environ:
            print("mptrec train: --nproc > 1 inside a torchrun job; drop --nproc", file=sys.stderr)
            return 2
        problem = _check_before_launch(args)  # else a bad input ends in torchrun's failure report
        if problem:
            print(f"mptrec train: error: {problem}", file=sys.stderr)
            return 2
        from mptrec.launch import worker_train
        from mptrec.launch.relaunch import run_module

        return run_module(worker_train.__name__, _forwarded(args), args.nproc)
    from mptrec.launch.worker_train import main

    return main(_forwarded(args))
