r"""``mptrec predict``: score every row of a split with an exported artifact, on 1..N processes.

Examples::

    mptrec predict --model runs/demo/export/model --data runs/demo/data --out preds.parquet
    mptrec predict --model DIR --data SHARDS --split valid --out preds.parquet --nproc 2
    torchrun --nproc_per_node 2 -m mptrec.launch.cli predict --model DIR --data SHARDS --out preds.parquet

Output: one Parquet file, ``sample_id`` then ``<task>_prob`` and ``<task>_logit`` per task
(:mod:`mptrec.pipeline.serve.predict`). ``--nproc N`` starts N local worker processes (no process
group); under torchrun (``WORLD_SIZE`` > 1) the ranks share the row groups and a gloo group is
used for two barriers only. Exit codes: 0 written, 1 bad input (artifact, shards, schema
mismatch, format version); nothing is written then.
"""

from __future__ import annotations

import argparse
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``mptrec predict``."""
    parser.add_argument("--model", required=True, help="artifact folder written by `mptrec export`")
    parser.add_argument("--data", required=True, help="shard folder (with schema.json)")
    parser.add_argument("--split", default="test", help="split to score (default: test)")
    parser.add_argument("--out", required=True, help="output Parquet file")
    parser.add_argument("--nproc", type=int, default=1, help="local worker processes (default: 1)")
    parser.add_argument("--batch-size", type=int, default=8192, help="rows per program call (default: 8192)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per process (default: the cores divided among the processes)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Run ``mptrec predict``."""
    from mptrec.pipeline.serve.artifact import ArtifactError
    from mptrec.pipeline.serve.predict import PredictError, predict

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank, barrier = 0, None
    if world > 1:  # launched by torchrun: a gloo group for the two barriers
        import torch.distributed as dist

        from mptrec.launch.dist import init_distributed

        _, rank, world = init_distributed("cpu")
        barrier = dist.barrier
    try:
        result = predict(args.model, args.data, args.out, split=args.split, nproc=args.nproc,
                         batch_size=args.batch_size, threads=args.threads, progress=not args.no_progress,
                         rank=rank, world=world, barrier=barrier)
    except (ArtifactError, PredictError) as e:
        print(f"mptrec predict: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    finally:
        if world > 1:
            from mptrec.launch.dist import teardown

            teardown()
    if rank == 0:
        print(f"scored {result['rows']} rows ({', '.join(result['tasks'])}) in {result['seconds']:.2f} s "
              f"({result['rows_per_s']:,.0f} rows/s, {result['processes']} process(es)) -> {result['out']}")
    return 0
