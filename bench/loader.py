"""Loader throughput vs a bare pyarrow read, and whether the loader or the step bounds training.

* ``bench_dataload.run`` (the data helper's benchmark: every column of the split, the loader
  with ``num_workers`` workers vs ``ParquetFile.iter_batches``), once per repeat.
* The loader as a training run uses it (the run's 16 input fields and 2 labels, the config's
  ``data.num_workers``, the paper's batch size), alone; the step alone on a few in-memory
  batches (cycled); then one stage-1 trainer runs whole epochs, repeats interleaved, from the
  same epoch's batches built in memory beforehand and from the loader (0 and 2 workers). The
  fraction "fed by the loader / pre-built" is what reading costs a run; the smaller of the
  loader's and the step's samples/s is the bottleneck.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from mptrec.bench.bench_dataload import run as dataload_run
from mptrec.bench.common import PAPER, Settings, load_batches, run_config
from mptrec.bench.harness import Stat, Variant, repeat_timed, throughput
from mptrec.bench.ours import build_stage1
from mptrec.data_loaders.dataset import ShardDataset, make_dataloader
from mptrec.pipeline.build import make_dataset, resolve_run_features


def loader_vs_bare(s: Settings, num_workers: int) -> dict[str, Any]:
    """The data helper's loader-vs-bare-read figures, one call per repeat."""
    runs = []
    for r in range(s.repeats):
        out = dataload_run(str(s.data_dir), batch_size=PAPER.batch_size, num_workers=num_workers, repeats=1)
        runs.append(out)
        print(
            f"[bench] loader vs bare read {r + 1}/{s.repeats}: loader {out['loader_samples_per_s']:,} "
            f"bare {out['bare_samples_per_s']:,} samples/s",
            file=sys.stderr,
        )
    loader = Stat([float(o["loader_samples_per_s"]) for o in runs], "samples/s")
    bare = Stat([float(o["bare_samples_per_s"]) for o in runs], "samples/s")
    return {
        "rows": runs[0]["rows"],
        "columns": runs[0]["columns"],
        "num_workers": num_workers,
        "batch_size": PAPER.batch_size,
        "loader": loader,
        "bare_read": bare,
        "fraction": Stat([a / b for a, b in zip(loader.values, bare.values)], "fraction"),
    }


def training_bottleneck(s: Settings, schema: dict[str, Any], group: Any) -> dict[str, Any]:
    """Loader alone (training columns), step alone (in memory), and the two together for an epoch."""
    cfg = run_config(s, PAPER)
    features = resolve_run_features(cfg, schema)
    labels = [t.label_spec() for t in cfg.tasks]
    workers = cfg.data.num_workers

    def dataset() -> ShardDataset:
        return make_dataset(cfg.data, cfg.data.train_split, features, labels, shuffle=True,
                            seed=cfg.train.seed, batch_size=PAPER.batch_size, drop_last=True)

    rows = dataset().num_rows // PAPER.batch_size * PAPER.batch_size

    def loader_epoch() -> float:
        t0 = time.perf_counter()
        n = sum(b.batch_size for b in make_dataloader(dataset(), workers))
        return n / (time.perf_counter() - t0)

    loader = repeat_timed(loader_epoch, s.repeats, "samples/s", f"loader alone ({workers} workers)")
    batches = load_batches(
        s.data_dir, cfg.data.train_split, features, labels, PAPER.batch_size, s.distinct_batches
    )
    trainer = build_stage1(cfg, schema, batches, group)
    step = throughput(
        [Variant("step", trainer.step, PAPER.batch_size)],
        warmup=s.warmup,
        steps=s.steps,
        repeats=s.repeats,
        label="step alone: ",
    )["step"]

    trainer.detach()
    # The same epoch (same shuffle) held in memory, against the loader feeding it: one trainer,
    # repeats interleaved, so the only difference is where the batches come from.
    prebuilt = list(make_dataloader(dataset(), 0))
    fed = build_stage1(cfg, schema, group=group)  # its own pipeline: no in-flight in-memory batches
    sources: dict[str, Any] = {"prebuilt": lambda: prebuilt}
    for n in sorted({workers, 0, 2}):  # in-process vs 2 worker processes, always
        sources[str(n)] = lambda n=n: make_dataloader(dataset(), n)
    for make in sources.values():
        fed.run(make())  # warm-up epoch
    epochs: dict[str, list[float]] = {k: [] for k in sources}
    for r in range(s.repeats):
        for name, make in sources.items():
            t0 = time.perf_counter()
            fed.run(make())
            epochs[name].append(rows / (time.perf_counter() - t0))
        print(
            "[bench] train epoch "
            + ", ".join(f"{k if k == 'prebuilt' else k + ' workers'} {v[-1]:,.0f}" for k, v in epochs.items())
            + f" samples/s ({r + 1}/{s.repeats})",
            file=sys.stderr,
        )
    e2e = {int(k): Stat(v, "samples/s") for k, v in epochs.items() if k != "prebuilt"}
    pre = epochs["prebuilt"]
    bottleneck = "loader" if loader.median < step.median else "step"
    return {
        "num_workers": workers,
        "rows_per_epoch": rows,
        "batch_size": PAPER.batch_size,
        "loader_alone": loader,
        "step_alone": step,
        "prebuilt_epoch": Stat(pre, "samples/s"),
        "end_to_end": e2e[workers],
        "end_to_end_by_workers": {str(k): v for k, v in e2e.items()},
        "bottleneck": bottleneck,
        "end_to_end_fraction_of_step": Stat([a / p for a, p in zip(e2e[workers].values, pre)], "fraction"),
    }
