"""How a split's row groups are read: the dealing rule, the row orders, and cutting into batches.

The shuffling and batching half of :class:`mptrec.data_loaders.dataset.ShardDataset` (its module
docstring states the contract): which row groups each reader gets in an epoch, the order each
row group's rows are read in, and how buffered tables are decoded once and cut into batches
(file order, each row group in its own order, or permuted again in a shuffle buffer).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from mptrec.data_loaders.schema import FeatureSpec, LabelSpec, OovPolicy
from mptrec.data_loaders.to_batch import RowSlice, Segment, gather_arrays, table_to_arrays


@dataclass(frozen=True)
class Unit:
    """One row group to read: file index, row group, global id of its first row, rows kept."""

    file: int
    row_group: int
    first_row: int
    rows: int


#: A table read and the order its rows are still to be read in (None: all, in table order).
Pending: TypeAlias = "tuple[pa.Table, npt.NDArray[np.int64] | None]"


def pending_rows(pending: Sequence[Pending]) -> int:
    """Rows still to be read in ``pending``."""
    return sum(t.num_rows if order is None else int(order.shape[0]) for t, order in pending)


def deal_units(units: Sequence[Unit], reader: int, readers: int, *, shuffle: bool, seed: int,
               epoch: int) -> list[Unit]:
    """Row groups of reader ``reader`` out of ``readers`` in ``epoch`` (the dealing rule).

    With ``shuffle`` the row groups are first permuted by a generator seeded by ``(seed, epoch)``;
    then they are dealt round-robin.
    """
    out = list(units)
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(len(out))
        out = [out[i] for i in order]
    return out[reader::readers]


def row_order(unit: Unit, seed: int, epoch: int) -> npt.NDArray[np.int64]:
    """The order in which ``unit``'s rows are read in ``epoch`` under ``shuffle``.

    A permutation of ``range(unit.rows)`` seeded by ``(seed, epoch, shard file, row group)``
    only: it does not depend on the rank, the worker or the world size, so an epoch's
    batches can be re-created (exact resume). The trailing 2 keeps this stream apart from
    the row-group permutation's and the shuffle buffer's.
    """
    rng = np.random.default_rng([seed, epoch, unit.file, unit.row_group, 2])
    return rng.permutation(unit.rows).astype(np.int64, copy=False)


def take_rows(table: pa.Table, rows: npt.NDArray[np.int64]) -> pa.Table:
    """``table.take(rows)``, on the rows' range only (Arrow's take concatenates the chunks)."""
    lo, hi = int(rows.min()), int(rows.max()) + 1
    return table.slice(lo, hi - lo).take(pa.array(rows - lo))


def cut_batches(
    pending: list[Pending],
    rng: np.random.Generator | None,
    final: bool,
    *,
    shuffle: bool,
    batch_size: int,
    drop_last: bool,
    features: Sequence[FeatureSpec],
    labels: Sequence[LabelSpec],
    oov_policy: OovPolicy,
    where: str,
) -> Iterator[RowSlice | list[Pending]]:
    """Decode buffered tables once and cut them into batches.

    Each pending table comes with the order its rows are read in (None: table order; under
    ``shuffle``, :func:`row_order`); with ``rng`` (the shuffle buffer) all pending rows are
    permuted once more. When not ``final``, the last item is what stays pending: the rows
    short of a whole batch, in read order. ``where`` names the split in error messages.
    """
    n = pending_rows(pending)
    full = n if final else n - n % batch_size
    block: pa.Table | list[Segment]
    rest: list[Pending] = []
    if not shuffle:  # file order
        table = pa.concat_tables([t for t, _ in pending]) if len(pending) > 1 else pending[0][0]
        block = table.slice(0, full)
        rest = [(table.slice(full), None)] if full < n else []
    elif rng is None:  # each row group in its own order: gathered from the tables as read
        block, left = [], full
        for t, order in pending:
            rows = np.arange(t.num_rows, dtype=np.int64) if order is None else order
            if left:
                block.append((t, rows[:left]))
            if left < rows.shape[0]:  # only the last table: fewer rows than a batch were left
                rest.append((t, rows[left:]))
            left = max(0, left - rows.shape[0])
    else:  # shuffle buffer: every pending row permuted once more
        table = pa.concat_tables([t for t, _ in pending]) if len(pending) > 1 else pending[0][0]
        parts, start = [], 0
        for t, order in pending:
            parts.append(np.arange(start, start + t.num_rows) if order is None else order + start)
            start += t.num_rows
        rows = np.concatenate(parts)[rng.permutation(n)]
        block = [(table, rows[:full])]
        rest = [(take_rows(table, rows[full:]), None)] if full < n else []
    if full:
        if isinstance(block, list):
            arrays = gather_arrays(block, features, labels, oov_policy=oov_policy, where=where, checked=True)
        else:
            arrays = table_to_arrays(block, features, labels, oov_policy=oov_policy, where=where,
                                     checked=True)
        for piece in arrays.row_slices(batch_size):
            if piece.num_rows == batch_size or not drop_last:
                yield piece
    if not final:
        yield rest
