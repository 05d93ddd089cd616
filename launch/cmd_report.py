"""``mptrec report``: a Markdown report with paper-style tables and plots over trained runs.

Example::

    mptrec report runs/census/*-s* --out runs/census/report

Each run needs ``config.json`` and ``eval.json`` (``mptrec eval --run RUN``); ``tasks.json``,
``metrics.jsonl`` and a predictions file add Table 3 and plots. Formats: :mod:`mptrec.pipeline.eval.report`.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``mptrec report``."""
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (each with eval.json)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder for report.md and the plots")


def run(args: argparse.Namespace) -> int:
    """Run ``mptrec report``."""
    from mptrec.pipeline.eval.report import build_report

    try:
        path = build_report(args.runs, args.out)
    except (ValueError, FileNotFoundError) as e:
        print(f"mptrec report: {e}", file=sys.stderr)
        return 1
    print(f"report written to {path}")
    return 0
