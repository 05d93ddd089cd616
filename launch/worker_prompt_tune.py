"""Stage-2 worker: ``python -m mptrec.launch.worker_prompt_tune --run DIR --task NAME [--set k=v]``.

Run it plainly for one process or under torchrun for N (``torchrun --nproc_per_node 2 -m
mptrec.launch.worker_prompt_tune --run runs/aliccp --task scenario``); ``mptrec prompt-tune
--nproc N`` does the torchrun call (:mod:`mptrec.launch.relaunch`). The world size need not be
the stage-1 run's.

``--full-retrain CONFIG_JSON --result FILE`` is the child job of ``mptrec prompt-tune
--compare-full``: a stage-1 run of the given resolved config (the run's tasks plus the new one),
whose timing, peak memory and validation AUCs rank 0 writes to ``FILE``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    """The entry point's arguments."""
    p = argparse.ArgumentParser(prog="mptrec.launch.worker_prompt_tune",
                                description="MPT-Rec stage 2: prompt-tune a registered new task")
    # --run-dir: the spelling forwarded through torchrun, whose parser takes --run for --run-path
    p.add_argument("--run", "--run-dir", dest="run", help="stage-1 run directory (with tasks.json)")
    p.add_argument("--task", help="registered new task")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the task config, repeatable: --set epochs=3")
    p.add_argument("--full-retrain", metavar="CONFIG_JSON", help=argparse.SUPPRESS)
    p.add_argument("--result", metavar="FILE", help=argparse.SUPPRESS)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _full_retrain(config: str, result: str, progress: bool) -> int:
    import json
    from pathlib import Path

    import torch.distributed as dist

    from mptrec.io import atomic_write_json
    from mptrec.launch.dist import init_distributed, teardown
    from mptrec.pipeline.config import RunConfig
    from mptrec.pipeline.strict import from_dict
    from mptrec.pipeline.tasks.full_retrain import full_retrain_summary
    from mptrec.pipeline.train.pretrain import pretrain

    cfg = from_dict(RunConfig, json.loads(Path(config).read_text()), source=config)
    device, rank, _ = init_distributed(cfg.train.device)
    try:
        summary = full_retrain_summary(pretrain(cfg, device=device, progress=progress), device)
        if rank == 0:
            atomic_write_json(result, summary)
        dist.barrier()
    finally:
        teardown()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Prompt-tune (or run the full-retraining child); returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.full_retrain:
        if not args.result:
            parser.error("--full-retrain needs --result")
        return _full_retrain(args.full_retrain, args.result, not args.no_progress)
    if not args.run or not args.task:
        parser.error("--run and --task are required")
    import torch.distributed as dist

    from mptrec.launch.dist import init_distributed, teardown
    from mptrec.logs import get_logger
    from mptrec.pipeline.rundir import RunDirError, load_run_config
    from mptrec.pipeline.tasks.prompt_tuning import prompt_tune
    from mptrec.pipeline.tasks.store import prompt_config
    from mptrec.runtime import allocator_status

    try:
        run_cfg = load_run_config(args.run)
        prompt_config(args.run, args.task, args.overrides)  # fail before starting the process group
    except RunDirError as e:
        print(f"mptrec prompt-tune: {e}", file=sys.stderr)
        return 1
    device, rank, _ = init_distributed(run_cfg.train.device)
    if rank == 0:
        get_logger(__name__).debug(allocator_status())
    try:
        prompt_tune(args.run, args.task, device, overrides=args.overrides, progress=not args.no_progress)
        dist.barrier()
    except RunDirError as e:  # raised on every rank before any collective
        print(f"mptrec prompt-tune: {e}", file=sys.stderr)
        return 1
    finally:
        teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
