"""Serve the union of a run's tasks: the frozen stage-1 backbone plus every prompt-tuned head.

:func:`load_run_for_eval` rebuilds the stage-1 model from ``RUN/config.json``, attaches the head
of every task the task store (``RUN/tasks.json``) lists as prompt-tuned and trained, shards the
result on the current process group (any world size: the plan need not match the one that
trained it), loads the backbone from the stage-1 DCP checkpoint (:func:`load_backbone`, backbone
keys only) and freezes everything. Its ``forward(dense, kjt)`` returns the logits of every
registered task; the old tasks' logits are bit-identical to the stage-1 model's.

A head is only attached to the backbone it was trained on: the checkpoint asked for must have
the content hash recorded for the head (``base_checkpoint_sha256``), else a
:class:`~mptrec.pipeline.rundir.RunDirError` names the task and both checkpoints.

:func:`build_run_model` is the shared builder, also used by the stage-2 job
(:mod:`mptrec.pipeline.tasks.prompt_tuning`) with a fresh trainable head; its build, add-heads
and shard part, without the checkpoint, is :func:`shard_with_heads` (also used by
``mptrec.bench.ours``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor

from mptrec.data_loaders.schema import FeatureSpec
from mptrec.models import NewTaskModel
from mptrec.models.base import MultiTaskModel, NewTaskHead
from mptrec.pipeline.config import NewTaskSpec, RunConfig, TaskSpec
from mptrec.pipeline.rundir import RunDirError, hash_checkpoint, load_run_config, resolve_run_checkpoint
from mptrec.pipeline.tasks.store import TASK_STORE_FILE, load_task_spec, load_task_store, trained_prompt_tasks

if TYPE_CHECKING:
    from mptrec.pipeline.sharding import ShardedModel

__all__ = [
    "HeadSpec",
    "ShardedRunModel",
    "backbone_digest",
    "build_run_model",
    "load_head_state",
    "load_run_for_eval",
    "served_heads",
    "shard_with_heads",
    "table_weights",
]


class HeadSpec(NamedTuple):
    """How a new task's head is built: its task config's keys of the same names.

    :meth:`build` calls ``backbone.new_task_head(name, method, tower_hidden,
    offset_max_rows=offset_max_rows)``.
    """

    method: str
    tower_hidden: tuple[int, ...]
    offset_max_rows: int = 0

    @classmethod
    def of(cls, cfg: NewTaskSpec, tower_hidden: Sequence[int]) -> HeadSpec:
        """The head of task config ``cfg`` with the resolved tower sizes."""
        return cls(cfg.method, tuple(tower_hidden), cfg.offset_max_rows)

    def build(self, backbone: MultiTaskModel, name: str) -> NewTaskHead:
        """A fresh head of task ``name`` on ``backbone``."""
        return backbone.new_task_head(name, self.method, self.tower_hidden,
                                      offset_max_rows=self.offset_max_rows)


@dataclass
class ShardedRunModel:
    """A sharded stage-1 backbone with new-task heads.

    Attributes:
        dmp: the ``DistributedModelParallel`` around :attr:`model` (call it for forwards).
        model: the unwrapped module: a :class:`NewTaskModel`, or the backbone alone when
            there is no head.
        backbone: the stage-1 :class:`MultiTaskModel` inside it (its EBC sharded).
        heads: new task name -> head.
        run_cfg: the stage-1 run config.
        features: the model's input features.
        checkpoint: the stage-1 checkpoint folder loaded.
        meta: that checkpoint's ``meta.json`` (plus ``path``).
        plan_text: the sharding plan used here.
    """

    dmp: nn.Module
    model: nn.Module
    backbone: MultiTaskModel
    heads: dict[str, NewTaskHead]
    run_cfg: RunConfig
    features: list[FeatureSpec]
    checkpoint: Path
    meta: dict[str, Any]
    plan_text: str


def load_head_state(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a head's weights (``RUN/tasks/<name>/head.pt``: a plain tensor state dict).

    Raises:
        RunDirError: the file is missing or not a state dict of tensors.
    """
    p = Path(path)
    if not p.is_file():
        raise RunDirError(f"head weights {p} not found; was the task prompt-tuned?")
    state = torch.load(p, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RunDirError(f"{p}: not a state dict of tensors")
    return state


def table_weights(module: nn.Module) -> list[torch.Tensor]:
    """The leaf weight tensors of every sharded embedding collection's kernels inside ``module``.

    A sharded EBC exposes its tables as non-leaf views (``TableBatchedEmbeddingSlice``) of its
    kernels' weights (FBGEMM's ``weights_host`` / ``weights_dev``); those leaves live in the
    sharded module's lookups (``_lookups``, a TorchRec 1.8 internal) and are what autograd would
    write a gradient to.

    Raises:
        RuntimeError: a sharded collection whose kernel weights cannot be found.
    """
    found: list[torch.Tensor] = []
    for m in module.modules():
        lookups = getattr(m, "_lookups", None)
        if lookups is None:
            continue
        mine = [p for lk in lookups for sub in lk.modules()
                for p in sub._parameters.values() if p is not None]
        if not mine:
            raise RuntimeError(f"sharded module {type(m).__name__} has no kernel weights in its lookups")
        found += mine
    return found


def backbone_digest(backbone: torch.nn.Module) -> dict[str, str]:
    """SHA-256 of every tensor of ``backbone.state_dict()`` (this rank's local shards for sharded ones).

    Args:
        backbone: the (sharded) backbone.

    Returns:
        key -> hex digest (sharded tensors: over each local shard's offsets and bytes).
    """
    out: dict[str, str] = {}
    for key, value in sorted(backbone.state_dict().items()):
        h = hashlib.sha256()
        if isinstance(value, ShardedTensor):
            for shard in sorted(value.local_shards(), key=lambda sh: tuple(sh.metadata.shard_offsets)):
                h.update(str(tuple(shard.metadata.shard_offsets)).encode())
                h.update(_bytes(shard.tensor))
        elif isinstance(value, torch.Tensor):
            h.update(_bytes(value))
        else:
            continue
        out[key] = h.hexdigest()
    return out


def _bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def shard_with_heads(
    run_cfg: RunConfig, schema: Mapping[str, Any], device: torch.device,
    heads: Mapping[str, HeadSpec], *,
    head_states: Mapping[str, Mapping[str, torch.Tensor]] | None = None, seed: int = 0, batch_size: int = 512,
    group: dist.ProcessGroup | None = None,
) -> tuple[ShardedModel, list[FeatureSpec]]:
    """Build the stage-1 model from its config, add new-task heads, shard it WITHOUT any optimizer.

    Collective: every rank of ``group`` must call it. The backbone keeps its fresh weights (no
    checkpoint is loaded here; :func:`build_run_model` loads one); with heads, ``NewTaskModel``
    freezes it.

    Args:
        run_cfg: the stage-1 run config.
        schema: the shards' schema.
        device: compute device.
        heads: new task name -> its :class:`HeadSpec`; with none,
            the backbone alone is sharded.
        head_states: new task name -> trained weights to load (strict); heads not listed keep
            their fresh initialisation (drawn under ``torch.manual_seed(seed)``, the same on
            every rank).
        seed: seed of the fresh heads.
        batch_size: per-rank batch size (planner estimates).
        group: process group (default: the world).

    Returns:
        The sharded model (``NewTaskModel`` inside its DMP when there are heads) and its features.
    """
    from mptrec.pipeline.build import build_from_config
    from mptrec.pipeline.sharding import shard_model

    backbone, features = build_from_config(run_cfg, schema)
    new: dict[str, NewTaskHead] = {}
    torch.manual_seed(seed)
    for name, spec in heads.items():
        head = spec.build(backbone, name)
        if head_states is not None and name in head_states:
            head.load_state_dict(dict(head_states[name]), strict=True)
        new[name] = head
    module: nn.Module = NewTaskModel(backbone, new) if new else backbone
    sharded = shard_model(module, features, run_cfg.sharding, None, device, group, batch_size=batch_size)
    return sharded, features


def build_run_model(
    run_dir: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str],
    device: torch.device,
    heads: Mapping[str, HeadSpec],
    *,
    head_states: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    seed: int = 0,
    batch_size: int = 512,
    group: dist.ProcessGroup | None = None,
) -> ShardedRunModel:
    """Rebuild the stage-1 model, add heads, shard it WITHOUT any optimizer, load the backbone.

    Collective: every rank of ``group`` must call it. No optimizer is attached to the tables
    (``shard_model(..., train_cfg=None)``): a fused kernel never updates them.

    Args:
        run_dir: the stage-1 run folder.
        checkpoint: ``best``, ``last``, ``step-N`` or a checkpoint folder.
        device: compute device.
        heads: the new tasks' heads to add, built as :func:`shard_with_heads` builds them.
        head_states: trained weights to load per new task; a task not listed gets a fresh head.
        seed: the fresh heads' seed.
        batch_size: per-rank batch size, for the planner.
        group: process group; the world when ``None``.

    Returns:
        The :class:`ShardedRunModel`; heads keep ``requires_grad`` (the caller freezes for serving).
    """
    from mptrec.data_loaders.layout import read_schema
    from mptrec.pipeline.checkpoint import load_backbone
    from mptrec.pipeline.sharding import unwrap_dmp

    run_cfg = load_run_config(run_dir)
    ckpt = resolve_run_checkpoint(run_dir, str(checkpoint))
    sharded, features = shard_with_heads(run_cfg, read_schema(run_cfg.data.path), device, heads,
                                         head_states=head_states, seed=seed, batch_size=batch_size,
                                         group=group)
    meta = load_backbone(run_dir, ckpt, sharded.dmp, prefix="backbone." if heads else "",
                         model_name=run_cfg.model.name, features=features, group=group)
    inner = unwrap_dmp(sharded.dmp)
    inner_backbone = inner.backbone if isinstance(inner, NewTaskModel) else inner
    if not isinstance(inner_backbone, MultiTaskModel):
        raise TypeError(f"unexpected sharded module {type(inner).__name__}")
    # DMP re-creates the table parameters with requires_grad on: freeze every leaf again, the
    # kernels' weights included, so autograd never targets the backbone (on top of no_grad)
    for w in [*inner_backbone.parameters(), *table_weights(inner_backbone)]:
        if w.is_leaf:
            w.requires_grad_(False)
    inner_heads = dict(inner.heads.items()) if isinstance(inner, NewTaskModel) else {}
    return ShardedRunModel(dmp=sharded.dmp, model=inner, backbone=inner_backbone,
                       heads={k: v for k, v in inner_heads.items() if isinstance(v, NewTaskHead)},
                       run_cfg=run_cfg, features=features, checkpoint=ckpt, meta=meta,
                       plan_text=sharded.plan_text)


def served_heads(run_dir: Path, ckpt: Path) -> tuple[dict[str, HeadSpec],
                                                       dict[str, dict[str, torch.Tensor]], list[TaskSpec]]:
    """The task store's trained heads (config, weights, task specs), checked against ``ckpt``."""
    path = run_dir / TASK_STORE_FILE
    if not path.is_file():
        return {}, {}, []
    entries = trained_prompt_tasks(load_task_store(run_dir))
    sha = hash_checkpoint(ckpt) if entries else ""
    heads: dict[str, HeadSpec] = {}
    states: dict[str, dict[str, torch.Tensor]] = {}
    specs: list[TaskSpec] = []
    for e in entries:
        if e["base_checkpoint_sha256"] != sha:
            raise RunDirError(
                f"task {e['name']!r} was prompt-tuned on checkpoint {e['base_checkpoint']} (sha256 "
                f"{e['base_checkpoint_sha256'][:12]}...), not on {ckpt} (sha256 {sha[:12]}...); evaluate "
                f"that checkpoint or prompt-tune the task again"
            )
        cfg = load_task_spec(run_dir, e)
        meta_path = run_dir / e["artifact"]
        tower = _trained_tower(meta_path.with_name("meta.json"), cfg, run_dir)
        heads[cfg.name] = HeadSpec.of(cfg, tower)
        states[cfg.name] = load_head_state(meta_path)
        specs.append(cfg.task_spec())
    return heads, states, specs


def _trained_tower(meta_path: Path, cfg: NewTaskSpec, run_dir: Path) -> tuple[int, ...]:
    """The tower sizes the head was trained with (its ``meta.json``; else the task's spec)."""
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if "tower_hidden" in meta:
        return tuple(meta["tower_hidden"])
    return cfg.resolve(load_run_config(run_dir)).tower_hidden


def load_run_for_eval(run_dir: str, checkpoint: str,
                      device: torch.device) -> tuple[nn.Module, RunConfig, list[TaskSpec]]:
    """One frozen, sharded model predicting every registered task of a run.

    Collective: call it on every rank after ``init_distributed`` (any world size).

    Args:
        run_dir: the stage-1 run folder (with ``config.json``, ``checkpoints/``, and optionally
            ``tasks.json`` with trained prompt-tuned tasks).
        checkpoint: ``best``, ``last``, ``step-N`` or a checkpoint folder path.
        device: compute device.

    Returns:
        ``(model, run_cfg, tasks)``: ``model(dense, kjt) -> {task: (B,) logits}`` for the
        stage-1 tasks and every trained prompt-tuned task (frozen, eval mode, DMP-wrapped);
        the stage-1 run config; the task specs (label columns, positive values), stage-1
        tasks first.

    Raises:
        RunDirError: a head trained on another checkpoint, a missing head file.
    """
    run = Path(run_dir)
    ckpt = resolve_run_checkpoint(run, checkpoint)
    heads, states, specs = served_heads(run, ckpt)
    built = build_run_model(run, ckpt, device, heads, head_states=states)
    for p in built.dmp.parameters():
        if p.is_leaf:  # the sharded tables' parameters are views of the fused kernel's weights
            p.requires_grad_(False)
    built.dmp.eval()
    return built.dmp, built.run_cfg, [*built.run_cfg.tasks, *specs]
