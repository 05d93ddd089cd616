"""``mptrec tasks``: list or register the tasks of a trained run (``RUN/tasks.json``).

Usage::

    mptrec tasks list --run runs/aliccp
    mptrec tasks register --run runs/aliccp --task-config configs/tasks/aliccp_scenario.toml \
        [--set epochs=5] [--checkpoint best]
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``mptrec tasks``."""
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    ls = sub.add_parser("list", help="print the run's task registry as a table")
    ls.add_argument("--run", required=True, help="stage-1 run directory")
    ls.add_argument("--json", action="store_true", help="print the registry as JSON")
    reg = sub.add_parser("register", help="validate a new-task config against the run and record it")
    reg.add_argument("--run", required=True, help="stage-1 run directory")
    reg.add_argument("--task-config", required=True, help="configs/tasks/<name>.toml")
    reg.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a key of the task config (repeatable)")
    reg.add_argument("--checkpoint", default="best",
                     help="base checkpoint recorded when the registry is created (default: best)")


def run(args: argparse.Namespace) -> int:
    """Run ``mptrec tasks``."""
    import json

    from mptrec.pipeline.rundir import RunDirError
    from mptrec.pipeline.tasks.store import format_table, load_task_store, register_task

    try:
        if args.action == "list":
            store = load_task_store(args.run)
            print(json.dumps(store, indent=2) if args.json else format_table(store))
            return 0
        entry = register_task(args.run, args.task_config, args.set, checkpoint=args.checkpoint)
    except RunDirError as e:
        print(f"mptrec tasks {args.action}: {e}", file=sys.stderr)
        return 1
    print(f"registered task {entry['name']!r} ({entry['method']}, label {entry['label']['column']}) "
          f"on {entry['base_checkpoint']}; next: mptrec prompt-tune --run {args.run} "
          f"--task {entry['name']}")
    return 0
