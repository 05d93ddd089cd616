"""What a new task costs: prompt tuning vs full retraining vs prompt tuning the paper's way.

Same data (the training split in memory, with the click, purchase and T3 = field 301 labels),
same batch size and threads, epochs timed interleaved:

* ``prompt_tune_cached``: ours as ``mptrec prompt-tune`` runs by default (``feature_cache_mib``)
  with the head of the shipped task config ``configs/tasks/aliccp_scenario.toml`` (its method,
  lr, ``offset_max_rows`` and ``r_dnn``; ``prompt_tune_cached_paper_head``: the same with the
  paper's head, ``mptrec`` at lr 1e-4, the headline until 2026-12-03;
  ``prompt_tune_cached_per_table_offsets``: the shipped head with one lookup per offset table,
  the head's path until 2026-12-03, a diagnostic):
  the frozen backbone runs once over the epoch's rows and the features are concatenated into
  the job's ``FeatureCache`` (timed as ``cache_fill_s``), then each epoch draws a fresh
  permutation and trains the head on the batches gathered from the cache, with the job's step
  (``head_step``). The headline fraction charges the fill, amortised over the job's default
  epoch count, to every epoch;
* ``prompt_tune``: ours with the cache off (the shipped head): each epoch runs the frozen no-grad backbone
  (``NewTaskModel.backbone_features``, no old-task towers) + the head's step (the job's
  streamed path, when the features do not fit the cache);
* ``full_retrain``: ours, stage 1 with the new task added (K+1 = 3 tasks, ``mptrec train``'s step);
* ``paper_prompt``: the paper's code, plain PyTorch with dense-gradient tables; the backbone is
  "frozen" only by leaving it out of the optimizer, so backward still computes (and
  accumulates) every backbone gradient.

Memory: bytes held by the backbone's gradients and by each optimizer's state after the epochs
(exact, from the tensors); and, for each way in its own freshly spawned process (so no way
inherits another's allocations), the resident memory after building it and its peak and growth
over a warm-up and one epoch (sampled every 2 ms). FLOPs per sample (one multiply-add = one
flop, matrix products only): the trained part's forward (the paper's %FLOPs measure) and a whole
training step (forward + backward).
"""

from __future__ import annotations

import gc
import logging
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from mptrec.bench.common import (
    NEW_TASK,
    PAPER,
    REPO,
    Settings,
    load_batches,
    process_group,
    run_config,
    with_new_task,
)
from mptrec.bench.harness import PeakRss, Stat, in_fresh_process
from mptrec.bench.ours import PromptTuner, build_prompt_tuner, build_stage1
from mptrec.bench.references import (
    RefMPTRec,
    RefNewTaskHead,
    grad_bytes,
    make_paper_prompt_step,
    to_ref_batch,
)
from mptrec.bench.stage1 import PAPER_R_EMB, task_assignments
from mptrec.data_loaders.batch import Batch
from mptrec.data_loaders.layout import read_schema
from mptrec.data_loaders.schema import FeatureSpec
from mptrec.models import count_parameters
from mptrec.pipeline.build import resolve_run_features
from mptrec.pipeline.config import NewTaskSpec, RunConfig, load_task_config
from mptrec.pipeline.tasks.tuning_loop import FeatureCache

MIB = 1024.0 * 1024.0


def optimizer_state_bytes(opt: Any) -> int:
    """Bytes of tensors in an optimizer's state (fused TorchRec optimizers included)."""
    total = 0
    state = opt.state.values() if hasattr(opt, "state") else []
    for per_param in state:
        for v in per_param.values() if isinstance(per_param, dict) else []:
            if hasattr(v, "local_shards"):  # a ShardedTensor (fused optimizer state)
                total += sum(sh.tensor.numel() * sh.tensor.element_size() for sh in v.local_shards())
            elif isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total


def _flops(fn: Callable[[], Any], batch: int) -> float | None:
    try:
        counter = FlopCounterMode(display=False)
        with counter:
            fn()
        return counter.get_total_flops() / 2.0 / batch
    except Exception as e:  # noqa: BLE001 - a counter that fails on an op is reported, not fatal
        print(f"[bench] FLOP count failed: {type(e).__name__}: {e}", file=sys.stderr)
        return None


@dataclass
class _Way:
    """One way of learning the new task: its epoch, warm-up and what to account for."""

    epoch: Callable[[], None]
    warmup: Callable[[], None]
    train_step: Callable[[], Any]  # one step on the first batch (for FLOPs)
    forward: Callable[[], Any]  # the trained part's forward on the first batch (for FLOPs)
    trainable: int
    backbone_grads: Callable[[], int]
    optimizer_state: Callable[[], int]
    before_forward: Callable[[], None] = lambda: None
    extra: Callable[[], dict[str, Any]] = dict


@dataclass
class _Data:
    """The run configs and the epoch's batches, shared by the three ways."""

    cfg: RunConfig
    full_cfg: RunConfig
    features: list[FeatureSpec]
    batches: list[Batch]

    @property
    def warm(self) -> list[Batch]:
        """Warm-up batches."""
        return self.batches[: min(2, len(self.batches))]


def _data(s: Settings, schema: dict[str, Any]) -> _Data:
    cfg = run_config(s, PAPER)
    full_cfg = with_new_task(cfg)
    features = resolve_run_features(cfg, schema)
    labels = [t.label_spec() for t in full_cfg.tasks]
    batches = load_batches(s.data_dir, cfg.data.train_split, features, labels, PAPER.batch_size)
    return _Data(cfg, full_cfg, features, batches)


#: the new task's config the job ships (its head: method, lr, offsets, L2)
TASK_CONFIG = REPO / "configs" / "tasks" / "aliccp_scenario.toml"


def _tuner(d: _Data, s: Settings, schema: dict[str, Any], group: Any,
           paper_head: bool = False) -> PromptTuner:
    """The prompt tuner of the shipped task config's head, or of the paper's (``mptrec``, lr 1e-4)."""
    if paper_head:
        return build_prompt_tuner(d.cfg, schema, group, seed=s.seed)
    t = load_task_config(TASK_CONFIG)
    return build_prompt_tuner(d.cfg, schema, group, seed=s.seed, method=t.method, lr=t.lr,
                              offset_max_rows=t.offset_max_rows, r_dnn=t.r_dnn)


def _prompt_way(d: _Data, s: Settings, schema: dict[str, Any], group: Any) -> _Way:
    prompt = _tuner(d, s, schema, group)
    b0 = d.batches[0]
    feats = prompt.features(b0)

    def epoch(bs: Sequence[Batch]) -> None:
        for b in bs:
            prompt.step_on(b)

    return _Way(
        epoch=lambda: epoch(d.batches),
        warmup=lambda: epoch(d.warm),
        train_step=lambda: prompt.step_on(b0),
        forward=lambda: prompt.head(feats),
        trainable=count_parameters(prompt.head)[0],
        backbone_grads=lambda: grad_bytes(prompt.backbone),
        optimizer_state=lambda: optimizer_state_bytes(prompt.optimizer),
    )


def _fill(prompt: PromptTuner, batches: Sequence[Batch]) -> FeatureCache:
    """The job's cache fill: the frozen features of every batch (:meth:`FeatureCache.build`)."""
    return FeatureCache.build(((prompt.features(b), b.labels[NEW_TASK.name]) for b in batches),
                              torch.device("cpu"))


def gather_ms(cache: FeatureCache, batch: int, repeats: int) -> dict[str, Stat]:
    """ms per batch to gather an epoch's shuffled batches from the cache: the job's
    ``index_select`` (:meth:`FeatureCache.batches`) vs indexing with the index tensor (before
    2026-12-03), interleaved, the same permutation for both."""
    times: dict[str, list[float]] = {"index_select": [], "indexing": []}
    n = cache.num_batches(batch)
    for r in range(max(1, repeats)):
        order = torch.randperm(cache.num_rows, generator=torch.Generator().manual_seed(r))
        t0 = time.perf_counter()
        for _ in cache.batches(batch, order):
            pass
        times["index_select"].append((time.perf_counter() - t0) * 1e3 / n)
        t0 = time.perf_counter()
        for start in range(0, cache.num_rows, batch):
            sel = order[start:start + batch]
            _ = {k: v[sel] for k, v in cache.rows.items()}, cache.labels[sel]
        times["indexing"].append((time.perf_counter() - t0) * 1e3 / n)
    return {k: Stat(v, "ms/batch") for k, v in times.items()}


def _cached_prompt_way(d: _Data, s: Settings, schema: dict[str, Any], group: Any,
                       paper_head: bool = False, per_table_offsets: bool = False) -> _Way:
    prompt = _tuner(d, s, schema, group, paper_head)
    if per_table_offsets:  # diagnostic: one lookup per offset table (the head's path until 2026-12-03)
        prompt.head.fused_offsets = False  # type: ignore[assignment]
    fills: list[float] = []
    for _ in range(max(1, s.repeats)):  # the fill is timed like an epoch: once per repeat
        t0 = time.perf_counter()
        cache = _fill(prompt, d.batches)
        fills.append(time.perf_counter() - t0)
    batch = PAPER.batch_size
    epochs = iter(range(1_000_000))

    def epoch(max_batches: int | None = None) -> None:
        # the job's cached epoch: a fresh permutation, batches gathered from the cache
        order = torch.randperm(cache.num_rows, generator=torch.Generator().manual_seed(next(epochs)))
        for i, (feats, labels) in enumerate(cache.batches(batch, order)):
            if max_batches is not None and i >= max_batches:
                return
            prompt.step_on_features(feats, labels)

    first = next(cache.batches(batch))
    return _Way(
        epoch=epoch,
        warmup=lambda: epoch(2),
        train_step=lambda: prompt.step_on_features(*first),
        forward=lambda: prompt.head(first[0]),
        trainable=count_parameters(prompt.head)[0],
        backbone_grads=lambda: grad_bytes(prompt.backbone),
        optimizer_state=lambda: optimizer_state_bytes(prompt.optimizer),
        extra=lambda: {"cache_fill_s": Stat(fills, "s"),
                       "gather_ms_per_batch": gather_ms(cache, batch, s.repeats)},
    )


def _full_way(d: _Data, s: Settings, schema: dict[str, Any], group: Any) -> _Way:
    full = build_stage1(d.full_cfg, schema, d.batches, group)
    b0 = d.batches[0]
    return _Way(
        epoch=lambda: full.run(d.batches),
        warmup=lambda: full.run(d.warm),
        train_step=lambda: full.run(d.batches[:1]),
        forward=lambda: full.model(b0.dense_features, b0.sparse_features),
        trainable=count_parameters(full.model)[1],  # everything trains
        backbone_grads=lambda: 0,
        optimizer_state=lambda: optimizer_state_bytes(full.optimizer),
        before_forward=full.detach,
    )


def _paper_way(d: _Data, s: Settings, schema: dict[str, Any], group: Any) -> _Way:
    cfg = d.cfg
    torch.manual_seed(s.seed)
    ref = RefMPTRec(d.features, replace(cfg.model, r_emb=PAPER_R_EMB), cfg.task_names, sparse=False)
    head = RefNewTaskHead(ref.d_in, cfg.model.hidden_dim, cfg.model.tower_hidden, cfg.model.tau)
    assign = task_assignments(d.batches, len(cfg.tasks), s.seed)
    ref_batches = [to_ref_batch(b, d.features, a) for b, a in zip(d.batches, assign)]
    step = make_paper_prompt_step(ref, head, ref_batches, NEW_TASK.name, lr=1e-4, r_dnn=cfg.model.r_dnn)
    with torch.no_grad():
        feats = ref.features(ref_batches[0])

    def epoch(n: int) -> None:
        for i in range(n):
            step(i)

    return _Way(
        epoch=lambda: epoch(len(ref_batches)),
        warmup=lambda: epoch(len(d.warm)),
        train_step=lambda: step(0),
        forward=lambda: head(feats),
        trainable=sum(p.numel() for p in head.parameters()),
        backbone_grads=lambda: grad_bytes(ref),
        optimizer_state=lambda: optimizer_state_bytes(step.optimizers[0]),
    )


WAYS: dict[str, Callable[[_Data, Settings, dict[str, Any], Any], _Way]] = {
    "prompt_tune_cached": _cached_prompt_way,
    "prompt_tune_cached_paper_head": lambda d, s, schema, group: _cached_prompt_way(d, s, schema, group,
                                                                                    paper_head=True),
    "prompt_tune_cached_per_table_offsets": lambda d, s, schema, group: _cached_prompt_way(
        d, s, schema, group, per_table_offsets=True),
    "prompt_tune": _prompt_way,
    "full_retrain": _full_way,
    "paper_prompt": _paper_way,
}


def _memory_worker(name: str, s: Settings, queue: Any) -> None:
    """In a fresh process: build one way, then sample RSS over its warm-up and one epoch."""
    try:
        logging.getLogger("torchrec").setLevel(logging.ERROR)
        torch.set_num_threads(s.threads)
        with process_group() as group:
            schema = read_schema(s.data_dir)
            way = WAYS[name](_data(s, schema), s, schema, group)
            gc.collect()
            with PeakRss() as rss:
                way.warmup()
                way.epoch()
            queue.put(
                (
                    "ok",
                    {
                        "rss_after_build_mib": round(rss.start / MIB, 1),
                        "peak_rss_mib": round(rss.peak / MIB, 1),
                        "growth_mib": round(rss.growth / MIB, 1),
                    },
                )
            )
    except BaseException:  # noqa: BLE001 - report any failure to the parent
        queue.put(("error", traceback.format_exc()))


def memory_in_fresh_process(name: str, s: Settings, timeout: float = 900.0) -> dict[str, Any]:
    """Peak RSS and its growth during training of one way, measured in its own spawned process."""
    return in_fresh_process(_memory_worker, (name, s), f"memory measurement of {name!r}", timeout)


def _epochs(ways: dict[str, _Way], repeats: int) -> dict[str, Stat]:
    """Interleaved epoch timings after one warm-up each."""
    times: dict[str, list[float]] = {k: [] for k in ways}
    for way in ways.values():
        way.warmup()
    for r in range(repeats):
        for name, way in ways.items():
            t0 = time.perf_counter()
            way.epoch()
            times[name].append(time.perf_counter() - t0)
            print(
                f"[bench] new task epoch {r + 1}/{repeats}: {name} {times[name][-1]:.2f} s", file=sys.stderr
            )
    return {k: Stat(v, "s") for k, v in times.items()}


def new_task(s: Settings, schema: dict[str, Any], group: Any) -> dict[str, Any]:
    """Per-epoch wall time, samples/s, memory, trainable parameters and FLOPs of the three ways."""
    d = _data(s, schema)
    ways = {name: build(d, s, schema, group) for name, build in WAYS.items()}
    epoch_s = _epochs(ways, s.repeats)
    rows = sum(b.batch_size for b in d.batches)
    batch = PAPER.batch_size
    train_flops = {k: _flops(w.train_step, batch) for k, w in ways.items()}
    variants: dict[str, Any] = {}
    for name, way in ways.items():
        way.before_forward()
        variants[name] = {
            "epoch_s": epoch_s[name],
            "samples_per_s": Stat([rows / t for t in epoch_s[name].values], "samples/s"),
            "backbone_grad_mib": round(way.backbone_grads() / MIB, 3),
            "optimizer_state_mib": round(way.optimizer_state() / MIB, 3),
            "trainable_parameters": way.trainable,
            "forward_flops_per_sample": _flops(way.forward, batch),
            "train_step_flops_per_sample": train_flops[name],
            **way.extra(),
        }
    del ways
    gc.collect()
    for name in WAYS:
        print(f"[bench] new task memory: {name} in a fresh process", file=sys.stderr)
        variants[name]["memory"] = memory_in_fresh_process(name, s)
    pt, fr, pp, pc, ph = (
        epoch_s[k].values for k in ("prompt_tune", "full_retrain", "paper_prompt", "prompt_tune_cached",
                                    "prompt_tune_cached_paper_head")
    )
    per_table = epoch_s["prompt_tune_cached_per_table_offsets"].values
    fill = variants["prompt_tune_cached"]["cache_fill_s"].median
    fill_paper = variants["prompt_tune_cached_paper_head"]["cache_fill_s"].median
    job_epochs = NewTaskSpec.__dataclass_fields__["epochs"].default
    return {
        "head_method": load_task_config(TASK_CONFIG).method,
        "rows_per_epoch": rows,
        "batch_size": batch,
        "new_task": NEW_TASK.name,
        "variants": variants,
        "job_epochs": job_epochs,
        "time_fraction_of_full": Stat([(c + fill / job_epochs) / f for c, f in zip(pc, fr)], "fraction"),
        "time_fraction_of_full_cached_epoch": Stat([c / f for c, f in zip(pc, fr)], "fraction"),
        "per_table_offsets_vs_fused": Stat([o / c for o, c in zip(per_table, pc)], "x"),
        "time_fraction_of_full_paper_head": Stat([(c + fill_paper / job_epochs) / f for c, f in zip(ph, fr)],
                                                 "fraction"),
        "time_fraction_of_full_uncached": Stat([p / f for p, f in zip(pt, fr)], "fraction"),
        "paper_prompt_vs_ours": Stat([p / o for p, o in zip(pp, pt)], "x"),
    }
