"""``mptrec tasks``: not built yet (the task-registry issue (#6))."""

from __future__ import annotations

import argparse

from mptrec.launch.cli import not_built


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``mptrec tasks``."""
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="arguments (not built yet)")


def run(args: argparse.Namespace) -> int:
    """Run ``mptrec tasks``."""
    return not_built("tasks", "the task-registry issue (#6)")
