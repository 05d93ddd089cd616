r"""``mptrec eval``: exact offline metrics of every task of a trained run, on 1..N processes.

Examples::

    mptrec eval --run runs/census-mptrec --out runs/census-mptrec/eval.json
    torchrun --nproc_per_node 2 -m mptrec.launch.cli eval --run RUN --split test \
        --dump-predictions RUN/predictions.parquet
    mptrec eval --run runs/aliccp --user-field 101 --set data.batch_size=16384

The report schema is documented in :mod:`mptrec.pipeline.eval.evaluate`; rank 0 writes it
atomically. Exit codes: 0 done, 1 bad input (run, checkpoint, data, config), 2 a piece the
evaluation needs is not built.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``mptrec eval``."""
    parser.add_argument("--run", "--run-dir", dest="run", required=True,
                        help="stage-1 run directory (config.json, checkpoints/, tasks.json)")
    parser.add_argument("--checkpoint", default="best",
                        help="best | last | a checkpoint name | a path (default: best)")
    parser.add_argument("--data", default=None, help="shards folder (default: the run's data.path)")
    parser.add_argument("--split", default=None, help="split to score (default: the run's data.test_split)")
    parser.add_argument("--out", default=None, help="report JSON (default: RUN/eval.json)")
    parser.add_argument("--dump-predictions", default=None, metavar="FILE.parquet",
                        help="write sample_id, label_<task>, logit_<task> of every row (one file, rank 0)")
    parser.add_argument("--user-field", default=None,
                        help="sparse field with one user id per row; adds GAUC per task (Ali-CCP: 101)")
    parser.add_argument("--click-task", default="ctr", help="click task for cvr_on_clicks (default: ctr)")
    parser.add_argument("--conversion-task", default="cvr",
                        help="conversion task for cvr_on_clicks (default: cvr)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: auto")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override the run config, e.g. --set data.batch_size=8192 (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Run ``mptrec eval``."""
    from mptrec.launch.dist import init_distributed, teardown
    from mptrec.pipeline.eval.evaluate import write_report_json
    from mptrec.pipeline.eval.evaluate_run import EvalSetupError, evaluate_run

    out = Path(args.out) if args.out else Path(args.run) / "eval.json"
    device, rank, world_size = init_distributed(args.device)
    try:
        report = evaluate_run(
            args.run, checkpoint=args.checkpoint, device=device, data=args.data, split=args.split,
            overrides=args.overrides, dump_predictions=args.dump_predictions, user_field=args.user_field,
            click_task=args.click_task, conversion_task=args.conversion_task,
            progress=not args.no_progress)
        if rank == 0:
            write_report_json(report, out)
            _print_summary(report, out)
        return 0
    except EvalSetupError as e:
        print(f"mptrec eval: not available yet: {e}", file=sys.stderr)
        return 2
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"mptrec eval: {e}", file=sys.stderr)
        return 1
    finally:
        teardown()


def _print_summary(report: dict, out: Path) -> None:
    for name, m in report["tasks"].items():
        auc = "undefined" if m["auc"] is None else f"{m['auc']:.5f}"
        print(f"{name:>16}  auc {auc}  logloss {m['logloss']}  n {m['n']}  positives {m['positives']}")
    print(f"report written to {out} ({report['rows']} rows, {report['world_size']} process(es), "
          f"metrics {report['timing']['metrics_s']:.2f} s)")
