"""1 vs 2 processes (gloo, torch.multiprocessing): our stage-1 step at the paper's dims.

Each configuration runs in freshly spawned processes with a TCP-store gloo group, as torchrun
would start them: every rank reads its own share of the training shards (``rank`` /
``world_size`` of the loader), the planner shards the tables over the ranks (table-wise /
column-wise on CPU), and the batch size is per process (weak scaling, as ``data.batch_size``
in a run). Throughput is global: ``world_size * batch * steps / time``, the time taken on rank 0
between barriers (so it waits for the slowest rank).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
import traceback
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mptrec.bench.common import PAPER, Settings, load_batches, run_config
from mptrec.bench.harness import Stat


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _measure(rank: int, world: int, s: Settings, threads: int) -> list[float]:
    from mptrec.bench.ours import build_stage1
    from mptrec.data_loaders.layout import read_schema
    from mptrec.pipeline.build import resolve_run_features

    logging.getLogger("torchrec").setLevel(logging.ERROR)
    torch.set_num_threads(threads)
    schema = read_schema(s.data_dir)
    cfg = run_config(s, PAPER, extra=[f"train.threads={threads}"])
    features = resolve_run_features(cfg, schema)
    batches = load_batches(
        s.data_dir,
        cfg.data.train_split,
        features,
        [t.label_spec() for t in cfg.tasks],
        PAPER.batch_size,
        s.distinct_batches,
        rank=rank,
        world_size=world,
    )
    trainer = build_stage1(cfg, schema, batches, dist.GroupMember.WORLD)
    for i in range(s.warmup):
        trainer.step(i)
    secs = []
    for _ in range(s.repeats):
        dist.barrier()
        t0 = time.perf_counter()
        for i in range(s.steps):
            trainer.step(i)
        dist.barrier()
        secs.append(time.perf_counter() - t0)
    trainer.detach()
    return secs


def _worker(rank: int, world: int, port: int, s: Settings, threads: int, queue: Any) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        queue.put((rank, "ok", _measure(rank, world, s, threads)))
    except BaseException:  # noqa: BLE001 - report any failure to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_world(s: Settings, world: int, threads: int, timeout: float = 900.0) -> Stat:
    """Global samples/s of ``world`` processes with ``threads`` threads each (one value per repeat)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, s, threads, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, list[float]] = {}
    try:
        for _ in range(world):
            rank, status, payload = queue.get(timeout=timeout)
            if status != "ok":
                raise RuntimeError(f"scaling run (world size {world}) failed on rank {rank}:\n{payload}")
            results[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    secs = results[0]
    return Stat([world * PAPER.batch_size * s.steps / t for t in secs], "samples/s")


def scaling(s: Settings) -> dict[str, Any]:
    """1 process x 1 thread, 2 processes x 1 thread (and 1 process x 2 threads when there are 2 cores)."""
    runs: dict[str, Any] = {}
    configs = [("1 process x 1 thread", 1, 1), ("2 processes x 1 thread", 2, 1)]
    if s.threads >= 2:
        configs.append(("1 process x 2 threads", 1, 2))
    parent_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # this process only waits; keep its thread pool out of the way
    try:
        for name, world, threads in configs:
            print(f"[bench] scaling: {name}", file=sys.stderr)
            runs[name] = {
                "world_size": world,
                "threads_per_process": threads,
                "samples_per_s": run_world(s, world, threads),
            }
    finally:
        torch.set_num_threads(parent_threads)
    one, two = runs["1 process x 1 thread"]["samples_per_s"], runs["2 processes x 1 thread"]["samples_per_s"]
    speedup = Stat([b / a for a, b in zip(one.values, two.values)], "x")
    return {
        "batch_size_per_process": PAPER.batch_size,
        "runs": runs,
        "speedup_2_vs_1_process": speedup,
        "efficiency_2_processes": Stat([v / 2 for v in speedup.values], "fraction of linear"),
    }
