r"""``mptrec export``: a run's backbone and every trained task as one torch.export artifact.

Examples::

    mptrec export --run runs/demo --out runs/demo/export/model
    mptrec export --run runs/demo --checkpoint last --out runs/demo/export/model-int8 --quantize int8
    mptrec export --run runs/demo --out /tmp/ctr-only --tasks ctr

The artifact (``model.pt2`` and ``manifest.json``) is described in
:mod:`mptrec.pipeline.serve.export` and read by ``mptrec predict``. One process, no process group:
the run's checkpoint may have been saved by any number of processes. Exit codes: 0 written,
1 bad input (run, checkpoint, task, output folder, data); nothing is written then.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``mptrec export``."""
    parser.add_argument("--run", "--run-dir", dest="run", required=True,
                        help="stage-1 run directory (config.json, checkpoints/, tasks.json)")
    parser.add_argument("--checkpoint", default="best",
                        help="best | last | a checkpoint name | a path (default: best)")
    parser.add_argument("--out", required=True, help="artifact folder to create (model.pt2, manifest.json)")
    parser.add_argument("--tasks", default=None,
                        help="comma-separated tasks to export (default: every stage-1 task and every trained "
                             "prompt-tuned task)")
    parser.add_argument("--quantize", default=None, choices=["int8", "fp16"],
                        help="quantise the embedding tables (int8: row-wise uint8 with fp16 scale/bias; "
                             "fp16 rows); the manifest records the AUC change and the size reduction")
    parser.add_argument("--quant-split", default=None,
                        help="split scored for the quantised AUC change (default: the run's valid split)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")


def run(args: argparse.Namespace) -> int:
    """Run ``mptrec export``."""
    import torch

    from mptrec.data_loaders.schema import DataError
    from mptrec.pipeline.checkpoint_files import CheckpointError
    from mptrec.pipeline.serve.export import export_run

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    try:
        with torch.no_grad():
            m = export_run(args.run, args.out, checkpoint=args.checkpoint, tasks=tasks,
                           quantize=args.quantize, overwrite=args.overwrite, quant_split=args.quant_split)
    except (ValueError, KeyError, FileNotFoundError, CheckpointError, DataError) as e:
        print(f"mptrec export: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    names = ", ".join(f"{t['name']} ({t['role']}, {t['method']})" for t in m["tasks"])
    print(f"exported {names} to {args.out}: {m['program']['bytes'] / 2**20:.1f} MiB program, tables "
          f"{m['tables']['dtype']} {m['tables']['bytes'] / 2**20:.1f} MiB, checkpoint "
          f"{m['run']['checkpoint']} (sha256 {m['run']['checkpoint_sha256'][:12]})")
    q = m.get("quantization")
    if q:
        print(f"{q['dtype']} tables: {100 * q['size_reduction']:.1f}% smaller than fp32; AUC change on "
              f"{q['eval']['rows']} {q['eval']['split']} rows:")
        for name, t in q["eval"]["tasks"].items():
            delta = "n/a" if t["auc_delta"] is None else f"{t['auc_delta']:+.5f}"
            print(f"{name:>16}  auc fp32 {t['auc_fp32']}  {q['dtype']} {t['auc']}  change {delta}  "
                  f"max |dlogit| {t['max_abs_logit_delta']:.2e}")
    return 0
