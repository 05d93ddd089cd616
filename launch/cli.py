"""The ``mptrec`` command line: one subcommand per job.

Each subcommand lives in ``mptrec.launch.cmd_<name>`` with ``add_arguments(parser)`` and
``run(args) -> int``. Those modules import torch and the pipeline inside ``run`` only, so
``mptrec --help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "data": ("cmd_data", "convert sources to Parquet shards, or generate synthetic shards"),
    "train": ("cmd_train", "stage 1: multi-task pre-training on sharded embeddings"),
    "tasks": ("cmd_tasks", "list or register tasks in a run's task registry"),
    "prompt-tune": ("cmd_prompt_tune", "stage 2: train a registered new task on the frozen model"),
    "eval": ("cmd_eval", "offline evaluation: exact AUC of every registered task"),
    "report": ("cmd_report", "Markdown report with paper-style tables and plots"),
    "bench": ("cmd_bench", "throughput benchmarks (loader, stage 1, new task, evaluation)"),
    "export": ("cmd_export", "serving: the backbone and every trained task as one torch.export artifact"),
    "predict": ("cmd_predict", "serving: batch-score Parquet shards with an exported artifact"),
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="mptrec",
        description="MPT-Rec multi-task ranking on TorchRec: pre-train, add tasks by prompt "
        "tuning, evaluate.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in SUBCOMMANDS.items():
        mod = importlib.import_module(f"mptrec.launch.{module}")
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod.add_arguments(p)
        p.set_defaults(_module=mod)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mptrec`` console script.

    Under torchrun (``TORCHELASTIC_ERROR_FILE`` set) the run is wrapped in torchelastic's
    ``record`` so the failing rank's traceback lands in torchrun's root-cause summary.
    """
    if "TORCHELASTIC_ERROR_FILE" in os.environ:
        from torch.distributed.elastic.multiprocessing.errors import record

        rc = record(_main)(argv)  # None when argparse exits (e.g. --help)
        return 0 if rc is None else int(rc)
    return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._module.run(args))
    except KeyboardInterrupt:
        print("mptrec: interrupted", file=sys.stderr)
        return 130


def not_built(command: str, issue: str) -> int:
    """Say that a subcommand is not built yet and return a non-zero exit code."""
    print(f"mptrec {command}: not built yet ({issue}); nothing was run.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
