"""Process settings: the allocator of :mod:`mptrec.runtime`, and OpenMP thread pinning.

Our stage-1 step at the paper's dims with the allocator settings (the default), without them
(``MPTREC_MALLOC_TUNING=0``), and with them plus OpenMP threads pinned to cores
(``OMP_PROC_BIND=close``, ``OMP_PLACES=cores``, read by the OpenMP runtime when it starts). The
settings are process-wide and applied at start, so each measurement runs in its own freshly
spawned process, the modes alternating (tuned, defaults, pinned, tuned, ...); each reports the
step's samples/s and the minor page faults per step (``getrusage``), over the same steps after
the same warm-up.
"""

from __future__ import annotations

import os
import resource
import sys
import time
import traceback
from typing import Any

import torch

from mptrec.bench.common import PAPER, Settings, process_group, run_config
from mptrec.bench.harness import Stat, in_fresh_process, ratio

MODES = ("tuned", "defaults", "pinned")
#: the environment of the ``pinned`` mode's process (set before it starts)
PINNED_ENV = {"OMP_PROC_BIND": "close", "OMP_PLACES": "cores"}


def _worker(mode: str, s: Settings, queue: Any) -> None:
    """In a fresh process: our stage-1 step at the paper's dims, samples/s and faults per step."""
    try:
        import logging

        from mptrec.bench.dense import _batches
        from mptrec.bench.ours import build_stage1
        from mptrec.data_loaders.layout import read_schema
        from mptrec.runtime import ENV, tune_allocator

        os.environ[ENV] = "0" if mode == "defaults" else "1"
        applied = tune_allocator()
        logging.getLogger("torchrec").setLevel(logging.ERROR)
        torch.set_num_threads(s.threads)
        with process_group() as group:
            schema = read_schema(s.data_dir)
            trainer = build_stage1(run_config(s, PAPER), schema, _batches(s, schema, PAPER.batch_size), group)
            for i in range(s.warmup):
                trainer.step(i)
            steps = max(10, s.steps)
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            for i in range(steps):
                trainer.step(i)
            secs = time.perf_counter() - t0
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
            trainer.detach()
        queue.put(("ok", {"samples_per_s": steps * PAPER.batch_size / secs, "faults_per_step": faults / steps,
                          "applied": applied}))
    except BaseException:  # noqa: BLE001 - report any failure to the parent
        queue.put(("error", traceback.format_exc()))


def allocator(s: Settings) -> dict[str, Any]:
    """Samples/s and minor faults per step of our stage-1 step: allocator settings on, off, on + pinned."""
    got: dict[str, dict[str, list[float]]] = {m: {"samples_per_s": [], "faults_per_step": []} for m in MODES}
    applied = False
    for r in range(s.repeats):
        for mode in MODES:
            saved = {k: os.environ.get(k) for k in PINNED_ENV}
            if mode == "pinned":  # the spawned process inherits the environment at start
                os.environ.update(PINNED_ENV)
            try:
                res = in_fresh_process(_worker, (mode, s), f"allocator bench ({mode})")
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
            applied = applied or (mode == "tuned" and bool(res["applied"]))
            for k in ("samples_per_s", "faults_per_step"):
                got[mode][k].append(float(res[k]))
            print(f"[bench] allocator {r + 1}/{s.repeats}: {mode} {res['samples_per_s']:,.0f} samples/s, "
                  f"{res['faults_per_step']:,.0f} minor faults/step", file=sys.stderr)
    stats = {m: {"samples_per_s": Stat(v["samples_per_s"], "samples/s"),
                 "faults_per_step": Stat(v["faults_per_step"], "faults")} for m, v in got.items()}
    return {
        "applied": applied,
        **stats,
        "speedup": ratio(stats["tuned"]["samples_per_s"], stats["defaults"]["samples_per_s"]),
        "pinned_speedup": ratio(stats["pinned"]["samples_per_s"], stats["tuned"]["samples_per_s"]),
        "pinned_env": PINNED_ENV,
    }
