"""``mptrec prompt-tune``: not built yet (the task-registry issue (#6))."""

from __future__ import annotations

import argparse

from mptrec.launch.cli import not_built


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``mptrec prompt-tune``."""
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="arguments (not built yet)")


def run(args: argparse.Namespace) -> int:
    """Run ``mptrec prompt-tune``."""
    return not_built("prompt-tune", "the task-registry issue (#6)")
