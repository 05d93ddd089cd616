"""Stage-1 training throughput: our pipeline against the two plain-PyTorch references.

Each size builds three trainers over the same in-memory batches (read by the loader from the
generated shards), with the same thread count, and times them interleaved: ours (the
``mptrec train`` step), reference ``plain`` (the paper's code) and reference ``sparse`` (a
careful plain-PyTorch user). See :mod:`mptrec.bench.references`.
"""

from __future__ import annotations

import gc
from dataclasses import replace
from typing import Any

import torch

from mptrec.bench.common import Settings, Size, load_batches, run_config
from mptrec.bench.harness import Variant, ratio, throughput
from mptrec.bench.ours import Stage1, build_stage1
from mptrec.bench.references import RefMPTRec, make_train_step, to_ref_batch
from mptrec.data_loaders.batch import Batch
from mptrec.data_loaders.schema import FeatureSpec
from mptrec.models import count_parameters
from mptrec.pipeline.build import resolve_run_features
from mptrec.pipeline.config import RunConfig
from mptrec.pipeline.train.loop import bf16_autocast

#: The paper's embedding L2 weight on Ali-CCP (spec section 7); the references apply it (the
#: pipeline cannot: its tables train with a fused optimizer, so its config has r_emb = 0).
PAPER_R_EMB = 1e-4


def task_assignments(batches: list[Batch], num_tasks: int, seed: int) -> list[torch.Tensor]:
    """Uniform random EM task labels per row (what the EM store starts with), one tensor per batch."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, num_tasks, (b.batch_size,), generator=g) for b in batches]


def compare(s: Settings, schema: dict[str, Any], size: Size, group: Any) -> dict[str, Any]:
    """Samples/s of ours, ``plain`` and ``sparse`` at one size, and the two speedups."""
    cfg = run_config(s, size)
    features = resolve_run_features(cfg, schema)
    labels = [t.label_spec() for t in cfg.tasks]
    batches = load_batches(
        s.data_dir, cfg.data.train_split, features, labels, size.batch_size, s.distinct_batches
    )
    assign = task_assignments(batches, len(cfg.tasks), s.seed)
    ref_batches = [to_ref_batch(b, features, a) for b, a in zip(batches, assign)]
    ref_cfg = replace(cfg.model, r_emb=PAPER_R_EMB)
    torch.manual_seed(s.seed)
    plain = RefMPTRec(features, ref_cfg, cfg.task_names, sparse=False)
    sparse = RefMPTRec(features, ref_cfg, cfg.task_names, sparse=True)
    ours = build_stage1(cfg, schema, batches, group)
    fp32_cfg = run_config(s, size, extra=['train.autocast="none"'])
    ours_fp32 = build_stage1(fp32_cfg, schema, batches, group)
    variants = [
        Variant("ours", ours.step, size.batch_size),
        Variant("ours_fp32", ours_fp32.step, size.batch_size),
        Variant(
            "plain",
            make_train_step(plain, ref_batches, "plain", lr=cfg.train.lr, embedding_lr=cfg.train.lr),
            size.batch_size,
        ),
        Variant(
            "sparse",
            make_train_step(sparse, ref_batches, "sparse", lr=cfg.train.lr, embedding_lr=cfg.train.lr),
            size.batch_size,
        ),
    ]
    stats = throughput(
        variants, warmup=s.warmup, steps=s.steps, repeats=s.repeats, label=f"stage1 {size.name}: "
    )
    ours.detach()
    ours_fp32.detach()
    result = _summary(size, cfg, features, stats, ours, plain)
    del ours, ours_fp32, plain, sparse, variants
    gc.collect()
    return result


def _summary(size: Size, cfg: RunConfig, features: list[FeatureSpec], stats: dict[str, Any],
             ours: Stage1, plain: RefMPTRec) -> dict[str, Any]:
    """One size's result: the model, the samples/s, the speedups, what each side runs."""
    sparse_feats = [f for f in features if f.kind == "sparse"]
    return {
        "note": size.note,
        "embedding_dim": size.embedding_dim,
        "batch_size": size.batch_size,
        "tables": len(sparse_feats),
        "table_rows": sum(f.num_embeddings for f in sparse_feats),
        "d_in": plain.d_in,
        "parameters": {"ours": count_parameters(ours.model)[1], "plain": count_parameters(plain)[1]},
        "samples_per_s": stats,
        "speedup_vs_plain": ratio(stats["ours"], stats["plain"]),
        "speedup_vs_sparse": ratio(stats["ours"], stats["sparse"]),
        "speedup_vs_plain_fp32": ratio(stats["ours_fp32"], stats["plain"]),
        "speedup_vs_sparse_fp32": ratio(stats["ours_fp32"], stats["sparse"]),
        "ours": {
            "autocast": cfg.train.autocast,
            "bf16": bf16_autocast(cfg.train.autocast, torch.device("cpu")),
            "embedding_optimizer": cfg.train.embedding_optimizer,
            "dense_optimizer": "Adam",
            "pipelined": cfg.train.pipelined,
            "r_emb": cfg.model.r_emb,
            "plan": ours.plan_text,
        },
        "references": {
            "r_emb": PAPER_R_EMB,
            "plain": "nn.Embedding per field (dense gradients), "
            "whole-table L2 in the loss, one Adam over everything",
            "sparse": "nn.Embedding(sparse=True) + SparseAdam, Adam for the rest, L2 on the looked-up rows",
        },
    }
