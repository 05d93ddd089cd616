"""At the paper's dims the dense arch dominates: profile the step, try dense-side speedups.

Variants of our stage-1 step at the paper's dims, timed interleaved (samples/s, so batch sizes
compare): bigger batches, bf16 autocast and ``torch.compile`` of the dense arch (available now),
proposals for ``models/`` or the config (the exact Adagrad table optimizer), and diagnostics that
say where time goes (the non-pipelined stepper, ``nn.Dropout``'s masks, no dropout).
bf16 counts only if the validation AUC holds: the same model is trained on the same batches in
fp32 and in bf16 and both are scored exactly on the validation split.
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from unittest import mock

import torch
from torch import nn
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper

from mptrec.bench.common import PAPER, Settings, load_batches, run_config
from mptrec.bench.harness import Variant, ratio, throughput
from mptrec.bench.ours import Stage1, build_stage1, compile_dense_arch, scorer
from mptrec.bench.profiling import profile_steps
from mptrec.models.base import MultiTaskModel
from mptrec.models.layers import MaskDropout
from mptrec.pipeline import sharding
from mptrec.pipeline.build import resolve_run_features
from mptrec.pipeline.eval.evaluate import evaluate

#: Largest |AUC(bf16) - AUC(fp32)| per task for bf16 to count as "AUC holds".
AUC_TOLERANCE = 0.003
#: Below this fp32 validation AUC (on any task) the check is inconclusive (too few steps).
MIN_LEARNED_AUC = 0.55


def _batches(s: Settings, schema: dict[str, Any], batch_size: int, extra: Sequence[str] = ()) -> list[Any]:
    cfg = run_config(s, PAPER, batch_size=batch_size, extra=extra)
    features = resolve_run_features(cfg, schema)
    n = max(2, s.distinct_batches * PAPER.batch_size // batch_size)
    return load_batches(
        s.data_dir, cfg.data.train_split, features, [t.label_spec() for t in cfg.tasks], batch_size, n
    )


def profile_stage1(s: Settings, schema: dict[str, Any], group: Any) -> dict[str, Any]:
    """torch.profiler over our stage-1 step at the paper's dims."""
    cfg = run_config(s, PAPER)
    trainer = build_stage1(cfg, schema, _batches(s, schema, PAPER.batch_size), group)
    for i in range(s.warmup):
        trainer.step(i)
    out = profile_steps(trainer.step, max(4, s.steps // 2), PAPER.batch_size)
    trainer.detach()
    return out


def use_bernoulli_dropout(model: nn.Module) -> int:
    """Replace every :class:`~mptrec.models.layers.MaskDropout` by ``nn.Dropout`` (one
    ``bernoulli_`` draw per element, the default before 2026-12-02); returns how many."""
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, MaskDropout):
                setattr(module, name, nn.Dropout(child.p))
                count += 1
    return count


def use_bool_masks(model: nn.Module, attribute: str = "bool_mask") -> int:
    """Build every :class:`~mptrec.models.layers.MaskDropout`'s keep-mask with a bool comparison
    (the default before 2026-12-03, the same values), or with ``attribute="float_mask"`` in float32
    and converted to the input's dtype (the default until 2026-12-03, the same values); returns
    how many."""
    drops = [m for m in model.modules() if isinstance(m, MaskDropout)]
    for m in drops:
        setattr(m, attribute, True)
    return len(drops)


def l2_in_loss(model: MultiTaskModel, optimizer: Any) -> int:
    """Put the dense L2 (``r_dnn``) back into the loss, through autograd, and take it out of the
    optimizer's weight decay (the default before 2026-12-03; the same update to rounding);
    returns how many weight matrices it covers."""
    ids = {id(p) for p in model.l2_parameters()}
    for group in optimizer.param_groups:
        if any(id(p) in ids for p in group["params"]):
            group["weight_decay"] = 0.0
    model.l2_by_optimizer = False
    return len(ids)


@dataclass(frozen=True)
class DenseVariant:
    """A variant of our stage-1 step.

    Args:
        name: shown in the results.
        kind: ``baseline``, ``speedup`` (available now, no code change), ``proposal`` (a change
            to suggest for ``models/`` or the config) or ``diagnostic`` (says where time goes;
            not a drop-in change).
        batch: batch size.
        overrides: config overrides (``--set`` syntax).
        bf16: bf16 autocast around the step.
        patch: ``compile`` (:func:`compile_dense_arch`), ``bernoulli_dropout``
            (:func:`use_bernoulli_dropout`), ``ddp`` (TorchRec's default DDP wrapping on one rank),
            ``bool_mask`` / ``float_mask`` (:func:`use_bool_masks`), ``l2_in_loss`` (:func:`l2_in_loss`).
    """

    name: str
    kind: str
    batch: int = 2000
    overrides: tuple[str, ...] = ()
    bf16: bool = False
    patch: tuple[str, ...] = ()


ADAGRAD = 'train.embedding_optimizer="adagrad"'


def variants_for(s: Settings) -> list[DenseVariant]:
    """Every variant of this run (compile ones only when ``s.compile``)."""
    out = [
        DenseVariant("baseline", "baseline"),
        DenseVariant("fp32 (train.autocast = none)", "diagnostic", overrides=('train.autocast="none"',)),
        DenseVariant("batch 4000", "speedup", batch=4000),
        DenseVariant("batch 8000", "speedup", batch=8000),
        DenseVariant("bf16 autocast", "speedup", bf16=True),
        DenseVariant("bf16 autocast, batch 8000", "speedup", batch=8000, bf16=True),
    ]
    if s.compile:
        out.append(DenseVariant("torch.compile dense arch", "speedup", patch=("compile",)))
    out += [
        DenseVariant("exact Adagrad tables (not row-wise)", "proposal", overrides=(ADAGRAD,)),
        DenseVariant(
            "exact Adagrad + bf16 + batch 8000", "proposal", batch=8000, overrides=(ADAGRAD,), bf16=True
        ),
        DenseVariant(
            "nn.Dropout masks (bernoulli_, the old default)", "diagnostic", patch=("bernoulli_dropout",)
        ),
        DenseVariant("DDP around the dense part on one rank (the old wrapping)", "diagnostic",
                     patch=("ddp",)),
        DenseVariant("keep-masks by bool comparison (the old masks; same values)", "diagnostic",
                     patch=("bool_mask",)),
        DenseVariant("bf16 keep-masks built in float32 and converted (the old masks; same values)",
                     "diagnostic", patch=("float_mask",)),
        DenseVariant("dense L2 through autograd (the old loss term; same update)", "diagnostic",
                     patch=("l2_in_loss",)),
        DenseVariant("non-pipelined stepper", "diagnostic", overrides=("train.pipelined=false",)),
        DenseVariant("no dropout (changes the model)", "diagnostic", overrides=("model.expert_dropout=[]",)),
    ]
    return out


def _build(s: Settings, schema: dict[str, Any], group: Any, v: DenseVariant) -> tuple[Stage1, dict[str, Any]]:
    cfg = run_config(s, PAPER, batch_size=v.batch, extra=v.overrides)
    batches = _batches(s, schema, v.batch, v.overrides)
    if "ddp" in v.patch:  # TorchRec's default wrapper: DDP even with one rank
        with mock.patch.object(sharding, "SingleRankDataParallelWrapper", DefaultDataParallelWrapper):
            trainer = build_stage1(cfg, schema, batches, group, autocast=v.bf16)
    else:
        trainer = build_stage1(cfg, schema, batches, group, autocast=v.bf16)
    info: dict[str, Any] = {}
    if "bernoulli_dropout" in v.patch:
        info["dropouts_replaced"] = use_bernoulli_dropout(trainer.model)
    if "bool_mask" in v.patch:
        info["bool_masks"] = use_bool_masks(trainer.model)
    if "float_mask" in v.patch:
        info["float_masks"] = use_bool_masks(trainer.model, "float_mask")
    if "l2_in_loss" in v.patch:
        info["l2_matrices"] = l2_in_loss(trainer.model, trainer.optimizer)
    if "compile" in v.patch:
        trainer.step(0)  # the pipeline traces the model on its first step; compile after that
        compile_dense_arch(trainer.model)
        t0 = time.perf_counter()
        trainer.step(1)  # compiles
        info["compile_s"] = round(time.perf_counter() - t0, 2)
    return trainer, info


def dense_speedups(s: Settings, schema: dict[str, Any], group: Any) -> dict[str, Any]:
    """Samples/s of each variant and its ratio to the baseline; failures are recorded, not raised."""
    variants: list[Variant] = []
    meta: dict[str, dict[str, Any]] = {}
    trainers = []
    for v in variants_for(s):
        try:
            trainer, info = _build(s, schema, group, v)
        except Exception as e:  # noqa: BLE001 - a variant that does not work is a result
            print(f"[bench] dense variant {v.name!r} failed: {type(e).__name__}: {e}", file=sys.stderr)
            meta[v.name] = {"kind": v.kind, "error": f"{type(e).__name__}: {str(e)[:500]}"}
            continue
        trainers.append(trainer)
        steps = max(2, s.steps * PAPER.batch_size // v.batch)
        warm = max(1, s.warmup * PAPER.batch_size // v.batch)
        variants.append(Variant(v.name, trainer.step, v.batch, steps=steps, warmup=warm))
        meta[v.name] = {
            "kind": v.kind,
            "batch_size": v.batch,
            "overrides": list(v.overrides),
            "bf16": v.bf16,
            "patch": list(v.patch),
            "timed_steps": steps,
            **info,
        }
    stats = throughput(variants, warmup=s.warmup, steps=s.steps, repeats=s.repeats, label="dense: ")
    base = stats.get("baseline")
    out: dict[str, Any] = {}
    for name, m in meta.items():
        if name in stats and base is not None:
            m = {**m, "samples_per_s": stats[name], "vs_baseline": ratio(stats[name], base)}
        out[name] = m
    for t in trainers:
        t.detach()
    del trainers, variants
    gc.collect()
    return out


def bf16_auc_check(s: Settings, schema: dict[str, Any], group: Any) -> dict[str, Any]:
    """Train fp32 and bf16 copies of the same model on the same batches; exact validation AUCs."""
    # learn something in a few hundred steps; the mode alone decides the precision
    extra = ["train.lr=1e-3", "train.embedding_lr=0.05", 'train.autocast="none"']
    cfg = run_config(s, PAPER, extra=extra)
    features = resolve_run_features(cfg, schema)
    labels = [t.label_spec() for t in cfg.tasks]
    train = load_batches(s.data_dir, cfg.data.train_split, features, labels, PAPER.batch_size)
    valid = load_batches(
        s.data_dir, cfg.data.valid_split, features, labels, PAPER.batch_size, drop_last=False
    )
    aucs: dict[str, dict[str, float | None]] = {}
    for mode in ("fp32", "bf16"):
        torch.manual_seed(cfg.train.seed)
        trainer = build_stage1(cfg, schema, train, group, autocast=mode == "bf16")
        for i in range(s.auc_steps):
            trainer.step(i)
        trainer.detach()
        trainer.model.eval()
        report = evaluate(
            scorer(trainer.model, autocast=mode == "bf16"), valid, cfg.task_names, progress=False
        )
        aucs[mode] = {t: report["tasks"][t]["auc"] for t in cfg.task_names}
        print(f"[bench] bf16 AUC check: {mode} validation AUC {aucs[mode]}", file=sys.stderr)
    deltas: dict[str, float | None] = {}
    for t in cfg.task_names:
        a, b = aucs["fp32"][t], aucs["bf16"][t]
        deltas[t] = None if a is None or b is None else b - a
    learned = all(a is not None and a >= MIN_LEARNED_AUC for a in aucs["fp32"].values())
    holds: bool | None = all(d is not None and abs(d) <= AUC_TOLERANCE for d in deltas.values())
    if not learned:
        holds = None  # the fp32 model learned too little for the comparison to mean anything
    return {
        "train_steps": s.auc_steps,
        "train_rows": s.auc_steps * PAPER.batch_size,
        "valid_rows": sum(b.batch_size for b in valid),
        "auc": aucs,
        "delta": deltas,
        "tolerance": AUC_TOLERANCE,
        "holds": holds,
        "conclusive": learned,
        "min_learned_auc": MIN_LEARNED_AUC,
        "overrides": extra,
    }
