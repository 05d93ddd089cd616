"""``mptrec data``: not built yet (the data issue (#3))."""

from __future__ import annotations

import argparse

from mptrec.launch.cli import not_built


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``mptrec data``."""
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="arguments (not built yet)")


def run(args: argparse.Namespace) -> int:
    """Run ``mptrec data``."""
    return not_built("data", "the data issue (#3)")
