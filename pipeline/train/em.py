"""The EM task-label store of MPT-Rec (spec Eq. 5): one label per training row, agreed by all ranks.

The store is a global ``int8`` tensor over the rows of the training split, indexed by
``Batch.sample_ids`` (the row's global index in the split), so it stays aligned however the
loader shuffles or splits rows across ranks. Every rank holds the whole tensor:

- **Initial labels** (E-step 0): uniform over the K tasks, drawn from a dedicated generator
  seeded with ``train.seed`` (not the global RNG), so every rank draws the same labels.
- **Re-labelling** (:func:`relabel`, every ``model.clustering_interval`` epochs): each rank
  scores its own rows in eval mode under ``no_grad`` with the *fused* logits and assigns
  ``em_assign`` (argmin per-sample BCE); the ranks' new labels are merged with one
  ``all_reduce`` (SUM of ``label + 1`` written at the rank's rows, 0 elsewhere, stacked with a
  count of writers that must be at most 1: each row is read by exactly one rank), so every rank
  ends with the same tensor. Rows no rank read (e.g.
  beyond ``data.max_rows``) keep their previous label.
- **Cluster sizes** (rows per task label) are logged at each re-labelling: the spec warns of a
  collapse on Ali-CCP, which reproduces the official behaviour and is not a bug.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist

from mptrec.data_loaders.batch import Batch
from mptrec.pipeline.distributed import is_distributed

__all__ = ["EMLabelStore", "relabel"]

ScoreFn = Callable[[Batch], Mapping[str, torch.Tensor]]
AssignFn = Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor], Sequence[str]], torch.Tensor]


class EMLabelStore:
    """Per-row EM task labels of the training split, identical on every rank.

    Args:
        num_rows: rows of the training split (``sum(schema["splits"][train]["rows"])``).
        task_names: the K tasks; label ``k`` means ``task_names[k]``.
        seed: seed of the dedicated generator of the initial labels.
        device: where the labels live (the training device, so the lookup stays on it).

    Example:
        >>> store = EMLabelStore(6, ["ctr", "cvr"], seed=0)
        >>> store.lookup(torch.tensor([0, 5])).dtype
        torch.int64
    """

    def __init__(self, num_rows: int, task_names: Sequence[str], seed: int,
                 device: torch.device | str = "cpu") -> None:
        if num_rows < 1:
            raise ValueError(f"EMLabelStore needs at least one row, got {num_rows}")
        if not 1 <= len(task_names) <= 127:
            raise ValueError(f"EMLabelStore supports 1..127 tasks, got {len(task_names)}")
        self.task_names: list[str] = list(task_names)
        self.num_rows: int = num_rows
        self.device: torch.device = torch.device(device)
        g = torch.Generator().manual_seed(seed)
        self.labels: torch.Tensor = torch.randint(0, len(task_names), (num_rows,), generator=g,
                                                  dtype=torch.int8).to(self.device)

    def lookup(self, sample_ids: torch.Tensor) -> torch.Tensor:
        """Labels (int64, shape (B,)) of the given rows (fx-traceable: a plain index)."""
        return self.labels[sample_ids].long()

    def cluster_sizes(self) -> list[int]:
        """Rows per task label, in task order."""
        return torch.bincount(self.labels.long().cpu(), minlength=len(self.task_names)).tolist()

    def merge(self, sample_ids: torch.Tensor, assignments: torch.Tensor,
              group: dist.ProcessGroup | None = None) -> None:
        """Replace the labels of the rows each rank scored; collective when distributed.

        Args:
            sample_ids: (n,) int64 rows scored by this rank (each row by one rank only).
            assignments: (n,) int64 new labels in [0, K).
            group: process group (default: the world).
        """
        if sample_ids.shape != assignments.shape:
            raise ValueError(f"sample_ids {tuple(sample_ids.shape)} and assignments "
                             f"{tuple(assignments.shape)} differ in shape")
        if sample_ids.numel() and (int(sample_ids.min()) < 0 or int(sample_ids.max()) >= self.num_rows):
            raise ValueError(f"sample_ids must be in [0, {self.num_rows}); got "
                             f"[{int(sample_ids.min())}, {int(sample_ids.max())}]")
        # row 0: label + 1 where this rank scored the row (0 elsewhere); row 1: how many ranks did
        update = torch.zeros(2, self.num_rows, dtype=torch.int8, device=self.device)
        ids = sample_ids.to(self.device)
        update[0, ids] = (assignments.to(self.device) + 1).to(torch.int8)
        update[1, ids] = 1
        if is_distributed(group):
            dist.all_reduce(update, op=dist.ReduceOp.SUM, group=group)
        if self.num_rows and int(update[1].max()) > 1:
            raise RuntimeError("EM labels of some rows were written by more than one rank "
                               "(the loader must read each row exactly once across ranks)")
        seen = update[1] > 0
        self.labels[seen] = update[0, seen] - 1

    def state_dict(self) -> dict[str, torch.Tensor | list[str]]:
        """Labels (on CPU) and task names, for the checkpoint."""
        return {"labels": self.labels.cpu(), "task_names": list(self.task_names)}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Restore labels saved by :meth:`state_dict` (same task list and row count)."""
        labels = state["labels"]
        if not isinstance(labels, torch.Tensor) or labels.shape != (self.num_rows,):
            raise ValueError(f"checkpoint EM labels have shape "
                             f"{getattr(labels, 'shape', None)}, expected ({self.num_rows},)")
        if list(state.get("task_names", self.task_names)) != self.task_names:  # type: ignore[call-overload]
            raise ValueError(f"checkpoint EM labels are for tasks {state.get('task_names')}, "
                             f"this run has {self.task_names}")
        self.labels = labels.to(device=self.device, dtype=torch.int8).clone()


def relabel(
    store: EMLabelStore,
    batches: Iterable[tuple[Batch, bool]],
    score: ScoreFn,
    assign: AssignFn,
    *,
    group: dist.ProcessGroup | None = None,
) -> list[int]:
    """E-step over the whole training split: score, assign, merge across ranks (collective).

    Args:
        store: the label store to update.
        batches: ``(batch, is_real)`` pairs in lock-step across ranks
            (:func:`mptrec.pipeline.distributed.lockstep`); filler batches are scored (the sharded
            forward is collective) and discarded.
        score: ``batch -> task -> (B,) fused logits``; called under ``torch.no_grad()``; the
            caller puts the model in eval mode.
        assign: ``(logits, labels, task_names) -> (B,) int64`` (``mptrec.models.em_assign``).
        group: process group.

    Returns:
        The cluster sizes after the merge (rows per task).
    """
    ids: list[torch.Tensor] = []
    new: list[torch.Tensor] = []
    with torch.no_grad():
        for batch, real in batches:
            logits = score(batch)
            if not real:
                continue
            labels = {t: batch.labels[t].to(logits[t].device) for t in store.task_names}
            ids.append(batch.sample_ids.reshape(-1).long())
            new.append(assign(logits, labels, store.task_names).reshape(-1).long())
    sample_ids = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long)
    assignments = torch.cat(new) if new else torch.zeros(0, dtype=torch.long)
    store.merge(sample_ids.to(store.device), assignments.to(store.device), group=group)
    return store.cluster_sizes()
