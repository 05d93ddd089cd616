"""Collective helpers: rank, world size, barrier, min/max over ranks and lock-step iteration.

Every helper works with and without an initialised process group: without one (or with a group
of one process) it is the single-process answer (rank 0, world 1, no barrier, the value itself,
every batch). ``group`` is a process group, ``None`` for the world.

Lock-step iteration: under ``DistributedModelParallel`` the sharded forward holds collectives,
so every rank must call the model the same number of times although ranks may own different
numbers of batches.

* :func:`lockstep_min` stops every rank as soon as ONE rank is out of batches (training: each
  rank trains the minimum count; all_reduce MIN of a "have a batch" flag before each step);
* :func:`lockstep` runs until EVERY rank is out of batches (scoring: a rank out of data yields
  a filler batch whose outputs are discarded, so every row is scored exactly once).

Both are collective per step: consume them to the end on every rank.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from mptrec.data_loaders.batch import Batch

__all__ = ["agree_min", "barrier", "comm_device", "first_row", "get_rank", "get_world_size", "is_distributed",
           "lockstep", "lockstep_min", "max_over_ranks"]

T = TypeVar("T")


def is_distributed(group: dist.ProcessGroup | None = None) -> bool:
    """Whether a process group is initialised and has more than one process.

    >>> is_distributed()
    False
    """
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def get_rank(group: dist.ProcessGroup | None = None) -> int:
    """This process's rank in ``group`` (0 without a process group).

    >>> get_rank()
    0
    """
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def get_world_size(group: dist.ProcessGroup | None = None) -> int:
    """The number of processes in ``group`` (1 without a process group).

    >>> get_world_size()
    1
    """
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def barrier(group: dist.ProcessGroup | None = None) -> None:
    """Wait for every rank of ``group`` (nothing to wait for with one process)."""
    if get_world_size(group) > 1:
        dist.barrier(group=group)


def comm_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """The device collectives of ``group`` run on: the current CUDA device under NCCL, else CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree_min(value: int, device: torch.device, group: dist.ProcessGroup | None = None) -> int:
    """The minimum of ``value`` over the ranks (collective; ``value`` itself without a group).

    >>> agree_min(7, torch.device("cpu"))
    7
    """
    if not is_distributed(group):
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return int(t.item())


def max_over_ranks(value: float, device: torch.device, group: dist.ProcessGroup | None = None) -> float:
    """The maximum of ``value`` over the ranks, in float64 (collective; ``value`` without a group).

    >>> max_over_ranks(2.5, torch.device("cpu"))
    2.5
    """
    if not is_distributed(group):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t.item())


def lockstep_min(batches: Iterable[T], device: torch.device, group: dist.ProcessGroup | None = None,
                 *, steps: int | None = None) -> Iterator[T]:
    """Yield batches while EVERY rank still has one (all_reduce MIN of a flag before each step).

    Collective per step; without a multi-rank group it yields every batch.

    Args:
        batches: this rank's batches.
        device: where the flag tensor lives (the collectives' device).
        group: process group (default: the world).
        steps: yield at most this many batches (no collective after the last one).

    >>> list(lockstep_min(range(5), torch.device("cpu"), steps=3))
    [0, 1, 2]
    """
    distributed = is_distributed(group)
    it = iter(batches)
    for _ in range(steps) if steps is not None else itertools.count():
        batch = next(it, None)
        if distributed:
            flag = torch.tensor([int(batch is not None)], dtype=torch.int64, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
            if int(flag.item()) == 0:
                return
        if batch is None:
            return
        yield batch


def first_row(batch: Batch) -> Batch:
    """A one-row copy (on CPU) of a batch's first row, used as :func:`lockstep`'s filler batch.

    Args:
        batch: a batch with at least one row.

    Returns:
        A :class:`Batch` of one row with the same keys, dense width and label names.
    """
    if batch.batch_size < 1:
        raise ValueError("first_row needs a batch with at least one row")
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from mptrec.data_loaders.batch import Batch
    kjt = batch.sparse_features
    values, lengths, weights = [], [], []
    for key in kjt.keys():
        jt = kjt[key]
        n0 = jt.lengths()[:1].cpu()
        lengths.append(n0)
        values.append(jt.values()[: int(n0.sum())].cpu())
        if jt.weights_or_none() is not None:
            weights.append(jt.weights()[: int(n0.sum())].cpu())
    one = KeyedJaggedTensor.from_lengths_sync(
        keys=kjt.keys(),
        values=torch.cat(values) if values else torch.zeros(0, dtype=torch.long),
        lengths=torch.cat(lengths) if lengths else torch.zeros(0, dtype=torch.int32),
        weights=torch.cat(weights) if weights else None,
    )
    ids = batch.sample_ids[:1].cpu() if batch.sample_ids.numel() else batch.sample_ids.cpu()
    return Batch(dense_features=batch.dense_features[:1].cpu(), sparse_features=one,
                 labels={k: v[:1].cpu() for k, v in batch.labels.items()}, sample_ids=ids)


def lockstep(
    batches: Iterable[Batch], *, group: dist.ProcessGroup | None = None
) -> Iterator[tuple[Batch, bool]]:
    """Iterate batches so that every rank takes the same number of steps.

    Collective: each step all-reduces a flag; iteration ends when every rank is out of data. A
    rank that is out of data yields ``(filler, False)`` (its last batch, or a one-row copy of
    another rank's first batch when it had none): the filler's outputs must be discarded.
    Consume the iterator to the end on every rank (breaking early on one rank deadlocks the
    others). Without a process group it yields ``(batch, True)`` for each batch.

    Args:
        batches: this rank's batches.
        group: process group (default: the world).

    Yields:
        (batch, is_real).
    """
    it = iter(batches)
    if not is_distributed(group):
        for b in it:
            yield b, True
        return
    device = comm_device(group)
    filler: Batch | None = None
    step = 0
    while True:
        b = next(it, None)
        flags = torch.tensor([int(b is not None), int(b is None)], dtype=torch.int64, device=device)
        dist.all_reduce(flags, group=group)
        if int(flags[0]) == 0:
            return
        if step == 0 and int(flags[1]) > 0:
            # some rank owns no batch at all: every rank receives one row of some rank's data
            shared: list[Batch | None] = [None] * dist.get_world_size(group)
            dist.all_gather_object(shared, first_row(b) if b is not None else None, group=group)
            filler = next(s for s in shared if s is not None)
        step += 1
        if b is None:
            if filler is None:  # cannot happen: step 0 fills it for ranks without data
                raise RuntimeError("lockstep: no filler batch on a rank out of data")
            yield filler, False
        else:
            filler = b
            yield b, True
