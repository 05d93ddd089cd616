"""Evaluation throughput: scoring + exact AUC with :func:`mptrec.pipeline.eval.evaluate.evaluate`.

The model is sharded without any optimizer (as ``mptrec eval`` loads it) and scores batches held
in memory (the loader's cost is measured in :mod:`mptrec.bench.loader`). The scored split is the
training split, the largest one: only the rows/s matter here, not the AUC values.
"""

from __future__ import annotations

import gc
import sys
from typing import Any

from mptrec.bench.common import PAPER, Settings, load_batches, run_config
from mptrec.bench.harness import Stat
from mptrec.pipeline.build import build_from_config
from mptrec.pipeline.eval.evaluate import evaluate
from mptrec.pipeline.sharding import shard_model


def eval_throughput(s: Settings, schema: dict[str, Any], group: Any) -> dict[str, Any]:
    """Rows/s of scoring, of the exact metrics, and of both together."""
    import torch

    cfg = run_config(s, PAPER)
    model, features = build_from_config(cfg, schema)
    sharded = shard_model(
        model, features, cfg.sharding, None, torch.device("cpu"), group, batch_size=cfg.data.batch_size
    )
    labels = [t.label_spec() for t in cfg.tasks]
    batches = load_batches(
        s.data_dir, cfg.data.train_split, features, labels, PAPER.batch_size, drop_last=False
    )
    rows = sum(b.batch_size for b in batches)
    evaluate(sharded.dmp, batches[:2], cfg.task_names, progress=False)  # warm-up
    score, metrics, total = [], [], []
    for r in range(s.repeats):
        report = evaluate(sharded.dmp, batches, cfg.task_names, progress=False)
        t = report["timing"]
        score.append(rows / t["score_s"])
        metrics.append(rows / max(t["metrics_s"], 1e-9))
        total.append(rows / (t["score_s"] + t["metrics_s"]))
        print(
            f"[bench] eval {r + 1}/{s.repeats}: {total[-1]:,.0f} rows/s (scoring {score[-1]:,.0f}, "
            f"exact AUC {metrics[-1]:,.0f})",
            file=sys.stderr,
        )
    del sharded, model
    gc.collect()
    return {
        "rows": rows,
        "tasks": cfg.task_names,
        "batch_size": PAPER.batch_size,
        "scoring": Stat(score, "rows/s"),
        "exact_metrics": Stat(metrics, "rows/s"),
        "total": Stat(total, "rows/s"),
    }
