"""Our pipeline's steps, built the way ``mptrec train`` / ``mptrec prompt-tune`` build them.

Stage 1 (:func:`build_stage1`): ``build_from_config`` ->
:func:`mptrec.pipeline.train.pretrain.shard_for_training` (``TrainWrapper`` with the EM label
store, ``shard_model``: DMP, fused embedding optimizer in backward, dense Adam) -> ``make_stepper``
(``TrainPipelineSparseDist`` when ``train.pipelined``), the same calls as
:func:`mptrec.pipeline.train.pretrain.pretrain`; each step is ``stepper.progress(batches)``. One
difference: no whole-table L2 (``r_emb`` 0, whatever ``model.r_emb`` says; the bench's default
config has ``r_emb = 0``).

Stage 2 (:func:`build_prompt_tuner`): the stage-1 model plus a new head in a ``NewTaskModel``
(frozen backbone: ``requires_grad`` off, eval mode, ``no_grad`` forward), sharded with no
optimizer on the tables (:func:`mptrec.pipeline.tasks.union.shard_with_heads`, the job's
builder less the checkpoint load), the job's Adam over the head only
(:func:`mptrec.pipeline.tasks.tuning_loop.head_optimizer`) and the job's step
(:func:`mptrec.pipeline.tasks.tuning_loop.head_step`: forward, BCE + ``r_dnn`` x the new tower's
L2 as weight decay, backward, Adam) on the features the job computes
(``NewTaskModel.backbone_features``). The backbone is freshly initialised rather than loaded
from a checkpoint: throughput does not depend on the weights' values.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mptrec.bench.common import NEW_TASK, cycle
from mptrec.data_loaders.batch import Batch
from mptrec.data_loaders.schema import FeatureSpec
from mptrec.models import NewTaskModel
from mptrec.models.base import MultiTaskModel, NewTaskHead
from mptrec.pipeline.build import build_from_config
from mptrec.pipeline.config import RunConfig
from mptrec.pipeline.sharding import unwrap_dmp
from mptrec.pipeline.tasks.tuning_loop import head_optimizer, head_step
from mptrec.pipeline.tasks.union import HeadSpec, shard_with_heads
from mptrec.pipeline.train.loop import bf16_autocast, make_stepper
from mptrec.pipeline.train.pretrain import shard_for_training

CPU = torch.device("cpu")


@dataclass
class Stage1:
    """Our stage-1 trainer on in-memory batches."""

    cfg: RunConfig
    model: MultiTaskModel
    features: list[FeatureSpec]
    dmp: nn.Module
    optimizer: Any
    stepper: Any
    it: Iterator[Batch]
    autocast: bool = False
    plan_text: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def step(self, i: int) -> None:
        """One training step on the next batch (``i`` is unused: batches cycle)."""
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()
        with ctx:
            self.stepper.progress(self.it)

    def run(self, batches: Iterable[Batch]) -> None:
        """Train one epoch over ``batches`` (e.g. a DataLoader) as the loop does: steps until the
        iterator is exhausted, then the pipeline gives the EBC its own forward back."""
        it = iter(batches)
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()
        with ctx:
            while True:
                try:
                    self.stepper.progress(it)
                except StopIteration:
                    break
        self.detach()

    def detach(self) -> None:
        """Give the EBC its own forward back (after a pipelined run; before evaluation)."""
        if hasattr(self.stepper, "detach"):
            self.stepper.detach()


def build_stage1(
    cfg: RunConfig,
    schema: dict[str, Any],
    batches: Sequence[Batch] = (),
    group: dist.ProcessGroup | None = None,
    *,
    autocast: bool = False,
) -> Stage1:
    """Our stage-1 model, sharded and with its optimizers; :meth:`Stage1.step` cycles over ``batches``."""
    model, features = build_from_config(cfg, schema)
    _, _, sharded = shard_for_training(cfg, schema, model, features, CPU, group)  # r_emb 0, see above
    sharded.dmp.train()
    stepper = make_stepper(sharded.dmp, sharded.optimizer, CPU, cfg.train.pipelined)
    return Stage1(
        cfg=cfg,
        model=model,
        features=features,
        dmp=sharded.dmp,
        optimizer=sharded.optimizer,
        stepper=stepper,
        it=cycle(batches) if batches else iter(()),
        autocast=autocast or bf16_autocast(cfg.train.autocast, CPU),
        plan_text=sharded.plan_text,
    )


def compile_dense_arch(model: MultiTaskModel) -> None:
    """``torch.compile`` the model's dense arch in place: ``forward_train`` and ``loss``, with the
    embedding lookup (``embed``, the sharded EBC) left eager (a graph break)."""
    model.embed = torch.compiler.disable(model.embed)  # type: ignore[method-assign]
    model.forward_train = torch.compile(model.forward_train)  # type: ignore[method-assign]
    model.loss = torch.compile(model.loss)  # type: ignore[method-assign]


@dataclass
class PromptTuner:
    """Our stage-2 (prompt-tuning) trainer, with the job's calls (``tuning_loop``)."""

    dmp: nn.Module
    model: NewTaskModel
    backbone: MultiTaskModel
    head: NewTaskHead
    optimizer: torch.optim.Optimizer
    r_dnn: float
    task: str

    def features(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The frozen backbone's features of a batch, as the job computes them (no old-task towers)."""
        return self.model.backbone_features(batch.dense_features, batch.sparse_features)

    def step_on(self, batch: Batch) -> float:
        """The job's streamed step (cache off): backbone features, then the head's step."""
        return self.step_on_features(self.features(batch), batch.labels[self.task])

    def step_on_features(self, feats: Mapping[str, torch.Tensor], labels: torch.Tensor) -> float:
        """The job's step on backbone features (:func:`head_step`); returns the loss."""
        return head_step(self.head, self.optimizer, feats, labels, self.r_dnn)


def build_prompt_tuner(
    cfg: RunConfig,
    schema: dict[str, Any],
    group: dist.ProcessGroup | None = None,
    *,
    method: str = "mptrec",
    lr: float = 1e-4,
    seed: int = 0,
    offset_max_rows: int = 0,
    r_dnn: float | None = None,
) -> PromptTuner:
    """Frozen stage-1 backbone + a fresh new-task head, sharded without any table optimizer.

    ``method`` / ``lr`` / ``offset_max_rows`` / ``r_dnn`` (None: the run's) are the task config's
    keys of the same names.
    """
    heads = {NEW_TASK.name: HeadSpec(method, tuple(cfg.model.tower_hidden), offset_max_rows)}
    l2 = cfg.model.r_dnn if r_dnn is None else r_dnn
    sharded, _ = shard_with_heads(cfg, schema, CPU, heads, seed=seed, batch_size=cfg.data.batch_size,
                                  group=group)
    inner = unwrap_dmp(sharded.dmp)
    if not isinstance(inner, NewTaskModel):
        raise TypeError(f"expected a NewTaskModel inside DMP, got {type(inner).__name__}")
    inner_head = inner.heads[NEW_TASK.name]
    if not isinstance(inner_head, NewTaskHead):
        raise TypeError(f"expected a NewTaskHead, got {type(inner_head).__name__}")
    sharded.dmp.train()
    return PromptTuner(
        dmp=sharded.dmp,
        model=inner,
        backbone=inner.backbone,
        head=inner_head,
        optimizer=head_optimizer(inner_head, lr, l2),  # as the job
        r_dnn=l2,
        task=NEW_TASK.name,
    )


def scorer(
    model: MultiTaskModel, autocast: bool = False
) -> Callable[[torch.Tensor, Any], dict[str, torch.Tensor]]:
    """``(dense, kjt) -> logits`` for :func:`mptrec.pipeline.eval.evaluate.evaluate` (optionally bf16)."""

    def score(dense: torch.Tensor, kjt: Any) -> dict[str, torch.Tensor]:
        if autocast:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return {k: v.float() for k, v in model(dense, kjt).items()}
        out: dict[str, torch.Tensor] = model(dense, kjt)
        return out

    return score
