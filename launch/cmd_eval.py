"""``mptrec eval``: not built yet (the evaluation issue (#7))."""

from __future__ import annotations

import argparse

from mptrec.launch.cli import not_built


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``mptrec eval``."""
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="arguments (not built yet)")


def run(args: argparse.Namespace) -> int:
    """Run ``mptrec eval``."""
    return not_built("eval", "the evaluation issue (#7)")
