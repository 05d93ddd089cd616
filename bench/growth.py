"""How cost grows: stage-1 samples/s and peak RSS against rows and against table size.

Each point runs in a freshly spawned process (so no point inherits another's allocations): it
builds our stage-1 model at the paper's dims on generated Ali-CCP shards of ``rows`` rows, with
every embedding table ``vocab_scale`` times its real size (the ids stay those of the data, so
the extra rows are cold, as in a production table that holds more ids than one day of
traffic), then trains ``steps`` steps fed by the loader from the shards (the path ``mptrec
train`` runs, in-process reading) after a warm-up, sampling the process's RSS every 2 ms.

What a user reads off it: samples/s should not depend on the rows (the loader streams row
groups; only the EM task-assignment store, 8 bytes per training row, grows with them), so an
epoch's time is linear in rows; table memory (weights + the row-wise optimizer state) is
linear in the vocabulary.
"""

from __future__ import annotations

import copy
import gc
import itertools
import logging
import sys
import time
import traceback
from typing import Any

import torch

from mptrec.bench.common import PAPER, Settings, process_group, run_config
from mptrec.bench.harness import PeakRss, in_fresh_process

MIB = 1024.0 * 1024.0
#: Rows of the generated data in a full run (--quick: the bench's rows and 4 times them).
ROWS_FULL: tuple[int, ...] = (1_000_000, 4_000_000, 16_000_000)
#: Table sizes, as multiples of the real Ali-CCP vocabularies.
VOCAB_SCALES: tuple[int, ...] = (1, 10)


def scaled_schema(schema: dict[str, Any], scale: int) -> dict[str, Any]:
    """A copy of ``schema`` whose sparse features have ``scale`` times the table rows.

    Example:
        >>> s = {"features": [{"name": "a", "kind": "sparse", "num_embeddings": 7},
        ...                   {"name": "d", "kind": "dense"}]}
        >>> [f.get("num_embeddings") for f in scaled_schema(s, 10)["features"]]
        [70, None]
    """
    if scale < 1:
        raise ValueError(f"vocab scale must be >= 1, got {scale}")
    out = copy.deepcopy(schema)
    for f in out["features"]:
        if f.get("kind") == "sparse":
            f["num_embeddings"] = int(f["num_embeddings"]) * scale
    return out


def ensure_rows(s: Settings, rows: int) -> Any:
    """The generated shards with ``rows`` rows (made once, reused); returns their folder."""
    from dataclasses import replace

    from mptrec.bench.common import ensure_data

    sized = replace(s, rows=rows)
    ensure_data(sized)
    return sized.data_dir


def _point_worker(s: Settings, rows: int, scale: int, steps: int, queue: Any) -> None:
    """In a fresh process: build, warm up, then time ``steps`` loader-fed steps under PeakRss."""
    try:
        from dataclasses import replace

        from mptrec.bench.ours import build_stage1
        from mptrec.data_loaders.dataset import make_dataloader
        from mptrec.data_loaders.layout import read_schema
        from mptrec.pipeline.build import make_dataset, resolve_run_features

        logging.getLogger("torchrec").setLevel(logging.ERROR)
        torch.set_num_threads(s.threads)
        sized = replace(s, rows=rows)
        with PeakRss() as rss, process_group() as group:
            schema = scaled_schema(read_schema(sized.data_dir), scale)
            cfg = run_config(sized, PAPER)
            features = resolve_run_features(cfg, schema)
            trainer = build_stage1(cfg, schema, group=group)
            built = rss.peak
            labels = [t.label_spec() for t in cfg.tasks]
            dataset = make_dataset(cfg.data, cfg.data.train_split, features, labels, shuffle=True,
                                   seed=cfg.train.seed, batch_size=PAPER.batch_size, drop_last=True)
            batches = iter(make_dataloader(dataset, cfg.data.num_workers))
            trainer.run(itertools.islice(batches, max(10, 3 * s.warmup)))  # the pipeline fills up
            t0 = time.perf_counter()
            trainer.run(itertools.islice(batches, steps))
            wall = time.perf_counter() - t0
        table_rows = sum(f.num_embeddings for f in features if f.kind == "sparse")
        queue.put(
            (
                "ok",
                {
                    "rows": rows,
                    "vocab_scale": scale,
                    "table_rows": table_rows,
                    "table_mib": round(table_rows * PAPER.embedding_dim * 4 / MIB, 1),
                    "steps": steps,
                    "samples_per_s": round(steps * PAPER.batch_size / wall, 1),
                    "epoch_s_estimate": round(dataset.num_rows / (steps * PAPER.batch_size / wall), 1),
                    "rss_after_build_mib": round(built / MIB, 1),
                    "peak_rss_mib": round(rss.peak / MIB, 1),
                },
            )
        )
    except BaseException:  # noqa: BLE001 - report any failure to the parent
        queue.put(("error", traceback.format_exc()))


def measure_point(s: Settings, rows: int, scale: int, steps: int, timeout: float = 1800.0) -> dict[str, Any]:
    """One point of the growth curves, measured in its own spawned process."""
    what = f"growth point rows={rows} vocab x{scale}"
    return in_fresh_process(_point_worker, (s, rows, scale, steps), what, timeout)


def growth(s: Settings) -> dict[str, Any]:
    """Samples/s and peak RSS for every (rows, vocabulary scale) point; optionally a PNG plot."""
    rows_list = (s.rows, 4 * s.rows) if s.quick else ROWS_FULL
    steps = max(10, 5 * s.steps)
    points = []
    for rows in rows_list:
        print(f"[bench] growth: data with {rows:,} rows", file=sys.stderr)
        ensure_rows(s, rows)
        for scale in VOCAB_SCALES:
            point = measure_point(s, rows, scale, steps)
            print(
                f"[bench] growth: rows {rows:,} vocab x{scale}: {point['samples_per_s']:,.0f} samples/s, "
                f"peak RSS {point['peak_rss_mib']:,.0f} MiB",
                file=sys.stderr,
            )
            points.append(point)
            gc.collect()
    return {"steps_per_point": steps, "batch_size": PAPER.batch_size, "points": points}


def plot(section: dict[str, Any], path: Any) -> bool:
    """Two panels (samples/s and peak RSS against rows, one line per vocabulary scale) to ``path``;
    False when matplotlib is not installed (``pip install mptrec[plots]``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    for scale in VOCAB_SCALES:
        pts = [p for p in section["points"] if p["vocab_scale"] == scale]
        xs = [p["rows"] for p in pts]
        ax1.plot(xs, [p["samples_per_s"] for p in pts], marker="o", label=f"vocabulary x{scale}")
        ax2.plot(xs, [p["peak_rss_mib"] for p in pts], marker="o", label=f"vocabulary x{scale}")
    for ax, label in ((ax1, "stage-1 samples/s (loader-fed)"), (ax2, "peak RSS (MiB)")):
        ax.set_xscale("log")
        ax.set_xlabel("rows of data")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
