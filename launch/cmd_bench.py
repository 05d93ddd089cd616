"""``mptrec bench``: not built yet (the benchmarks issue (#9))."""

from __future__ import annotations

import argparse

from mptrec.launch.cli import not_built


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``mptrec bench``."""
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="arguments (not built yet)")


def run(args: argparse.Namespace) -> int:
    """Run ``mptrec bench``."""
    return not_built("bench", "the benchmarks issue (#9)")
