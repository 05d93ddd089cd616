"""Stage-1 worker: ``python -m mptrec.launch.worker_train --config CFG [--set k=v]... [--resume]``.

Run it under torchrun for N processes (``torchrun --nproc_per_node 2 -m
mptrec.launch.worker_train --config configs/aliccp_synth.toml``), or plainly for one; ``mptrec
train --nproc N`` does the torchrun call for you (:mod:`mptrec.launch.relaunch`).
argv -> config -> process group -> ``pretrain`` -> teardown.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    """The entry point's arguments (shared with ``mptrec train``)."""
    p = argparse.ArgumentParser(prog="mptrec.launch.worker_train",
                                description="MPT-Rec stage-1 pre-training")
    p.add_argument("--config", required=True, help="run config (TOML), e.g. configs/aliccp_synth.toml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (TOML syntax), repeatable: --set train.lr=0.01")
    p.add_argument("--resume", action="store_true",
                   help="continue from the last checkpoint in the run's out_dir (exact resume)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Train; returns the exit code."""
    args = build_parser().parse_args(argv)
    import torch.distributed as dist

    from mptrec.data_loaders.schema import DataError
    from mptrec.launch.dist import init_distributed, teardown
    from mptrec.logs import get_logger
    from mptrec.pipeline.checkpoint_files import CheckpointError
    from mptrec.pipeline.config import load_config
    from mptrec.pipeline.sharding import ShardingError
    from mptrec.pipeline.strict import ConfigError
    from mptrec.pipeline.train.pretrain import pretrain
    from mptrec.runtime import allocator_status

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"mptrec train: error: {e}", file=sys.stderr)
        return 2
    device, rank, world_size = init_distributed(cfg.train.device)
    if rank == 0:
        get_logger(__name__).debug(allocator_status())
    try:
        try:
            result = pretrain(cfg, device=device, resume=args.resume, progress=not args.no_progress)
        except (ConfigError, DataError, ShardingError, CheckpointError) as e:  # bad input: no traceback
            print(f"mptrec train: error (rank {rank}): {e}", file=sys.stderr)
            return 2
        aucs = result.valid[-1]["auc"] if result.valid else {}
        get_logger(__name__).info(
            f"trained {result.steps} steps on {world_size} process(es) in {result.wall_s:.1f} s "
            f"({result.samples_per_s:,.0f} samples/s); last valid AUC {aucs}; best AUC sum "
            f"{result.best_metric}; checkpoint {result.last_checkpoint}")
        dist.barrier()
    finally:
        teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
