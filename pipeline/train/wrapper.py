"""The training wrapper: ``Batch`` in, ``(loss, detached outputs)`` out (style guide, rule 2).

``TrainWrapper(model)`` is what ``DistributedModelParallel`` wraps and what
``TrainPipelineSparseDist`` calls. It hands ``batch.sparse_features`` straight to the model
(whose EBC consumes it unchanged), so the pipeline can find the sharded EBC's input by FX
tracing and run its input distribution one batch ahead.

FX tracing: the train pipeline traces ``forward`` once with a proxy batch only to locate the
sharded modules and their inputs; the traced graph is never executed. The loss code of a model
may validate its inputs with Python control flow (which a proxy cannot drive), so under
symbolic tracing the wrapper stops after ``forward_train`` and returns placeholders.
"""

from __future__ import annotations

import torch
from torch import nn

from mptrec.data_loaders.batch import Batch
from mptrec.models.base import MultiTaskModel
from mptrec.pipeline.train.em import EMLabelStore

__all__ = ["TrainOutput", "TrainWrapper"]

#: (parts, logits, labels): detached loss parts (``"loss"`` = the total, one entry per task,
#: ``aux``/``gan``/``l2`` where the model has them), task -> (B,) logits, task -> (B,) labels.
TrainOutput = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]


class TrainWrapper(nn.Module):
    """Batch-level training step of a :class:`~mptrec.models.base.MultiTaskModel`.

    Args:
        model: the multi-task model (its EBC possibly on meta, to be sharded); kept as
            ``self.model`` so checkpoint keys are ``model.<backbone key>``.
        em_store: the EM task labels, required when ``model.uses_em`` (MPT-Rec with GAN).

    Example:
        >>> wrapper = TrainWrapper(model, em_store)      # doctest: +SKIP
        >>> loss, (parts, logits, labels) = wrapper(batch)  # doctest: +SKIP
    """

    def __init__(self, model: MultiTaskModel, em_store: EMLabelStore | None = None) -> None:
        super().__init__()
        if model.uses_em and em_store is None:
            raise ValueError(f"{type(model).__name__} trains a task classifier on EM labels: "
                             "pass an EMLabelStore")
        if em_store is not None and em_store.task_names != list(model.task_names):
            raise ValueError(f"EM store tasks {em_store.task_names} != model tasks {model.task_names}")
        self.model: MultiTaskModel = model
        self.em_store: EMLabelStore | None = em_store if model.uses_em else None
        self.task_names: list[str] = list(model.task_names)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, TrainOutput]:
        """One training forward.

        Args:
            batch: a :class:`~mptrec.data_loaders.batch.Batch` with a label per task and
                ``sample_ids`` (global row indices of the training split).

        Returns:
            ``(loss, (parts, logits, labels))``; everything but ``loss`` is detached.
        """
        out = self.model.forward_train(batch.dense_features, batch.sparse_features)
        labels = {t: batch.labels[t] for t in self.task_names}
        if isinstance(batch.sample_ids, torch.fx.Proxy):  # pipeline's FX trace: see module doc
            return out.logits[self.task_names[0]], ({}, out.logits, labels)
        task_assign = self.em_store.lookup(batch.sample_ids) if self.em_store is not None else None
        loss, parts = self.model.loss(out, labels, task_assign)
        logits = {t: v.detach() for t, v in out.logits.items()}
        return loss, ({"loss": loss.detach(), **parts}, logits, labels)
