"""``mptrec bench``: throughput benchmarks, written as JSON (and optionally Markdown).

Stage 1 vs two plain-PyTorch references at the paper's dims and at width 32, 1 vs 2 processes,
a profile of the step, dense-side speedups, the loader, the new-task cost, evaluation. The
benchmark code lives in :mod:`mptrec.bench.run`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mptrec.bench import SECTIONS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``mptrec bench``."""
    parser.add_argument(
        "--out", required=True, help="results JSON file (written atomically after each section)"
    )
    parser.add_argument(
        "--markdown",
        default=None,
        help="Markdown tables (default: --out with the suffix .md; the README embeds bench/results.md)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the same comparisons on smaller data and fewer steps (a few minutes)",
    )
    parser.add_argument("--repeats", type=int, default=0, help="repeats per figure (default 5, --quick 3)")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads of the single-process runs (default: the usable cores)",
    )
    parser.add_argument(
        "--workdir",
        default=None,
        help="where the generated shards go (default: runs/bench; reused when present)",
    )
    parser.add_argument(
        "--config",
        default=None,
        help="base run config (default: configs/aliccp_pretrain.toml, what `mptrec train` runs on Ali-CCP)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=SECTIONS,
        default=(),
        metavar="SECTION",
        help=f"run only these sections ({', '.join(SECTIONS)})",
    )
    parser.add_argument(
        "--compile",
        dest="compile_dense",
        action="store_true",
        default=None,
        help="try torch.compile of the dense arch (default: on, off with --quick)",
    )
    parser.add_argument("--no-compile", dest="compile_dense", action="store_false")
    parser.add_argument(
        "--serving-run",
        default="runs/demo",
        help="trained run the serving section exports and scores (default: runs/demo, from `make demo`; "
        "the section is skipped when it is missing)",
    )


def run(args: argparse.Namespace) -> int:
    """Run ``mptrec bench``; non-zero if any section failed."""
    from mptrec.bench.run import run_bench

    if args.repeats < 0 or args.threads < 0:
        print(
            f"mptrec bench: --repeats and --threads must be >= 0, got {args.repeats}, {args.threads}",
            file=sys.stderr,
        )
        return 2
    command = "mptrec bench " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "mptrec bench"
    markdown = args.markdown or str(Path(args.out).with_suffix(".md"))
    results = run_bench(
        args.out,
        markdown=markdown,
        quick=args.quick,
        repeats=args.repeats,
        threads=args.threads,
        workdir=args.workdir,
        only=args.only,
        compile_dense=args.compile_dense,
        config=args.config,
        serving_run=args.serving_run,
        command=command,
    )
    from mptrec.bench.run import TARGETS

    for key in TARGETS:
        value = results.get(key)
        print(f"{key}: {'n/a' if value is None else f'{value:.3f}'}")
    print(f"results: {args.out}, {markdown}")
    if results["errors"]:
        print(
            f"mptrec bench: {len(results['errors'])} section(s) failed: {sorted(results['errors'])}",
            file=sys.stderr,
        )
        return 1
    return 0
