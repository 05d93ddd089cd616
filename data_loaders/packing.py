"""Batches packed into one shared-memory buffer, for DataLoader workers.

A DataLoader worker sends every tensor storage through its own file descriptor (a socket round
trip each, plus a copy into shared memory). Packing a few batches into one buffer allocated in
shared memory makes that a single transfer and a single copy; the main process turns the buffer
back into batches with zero-copy views.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from mptrec.data_loaders.batch import Batch
from mptrec.data_loaders.to_batch import RowSlice, make_batch


def _segments(
    n: int, d: int, num_values: int, value_bytes: int, num_multi: int, num_labels: int
) -> list[tuple[int, int]]:
    """(start, bytes) of dense, values, multi-valued lengths, labels, sample ids (8-aligned)."""
    sizes = (4 * n * d, value_bytes * num_values, 4 * n * num_multi, 4 * n * num_labels, 8 * n)
    out, start = [], 0
    for size in sizes:
        out.append((start, size))
        start += (size + 7) // 8 * 8
    return out


class PackedBatches:
    """Several batches in ONE shared-memory buffer (picklable; see the module docstring).

    To keep the buffer small, ids travel as int32 when every table has fewer than 2**31 rows,
    and only the lengths of multi-valued features travel (the others are 1); :meth:`unpack`
    restores int64 ids and the full lengths.

    Args:
        slices: the batches, as row slices of decoded blocks (same keys and tasks).
    """

    def __init__(self, slices: Sequence[RowSlice], narrow_ids: bool = True) -> None:
        first = slices[0].source
        self.keys, self.label_names, self.multi = list(first.keys), list(first.label_names), list(first.multi)
        self.value_bytes = 4 if narrow_ids else 8
        self.pinned = False
        self.layout: list[
            tuple[int, int, int, list[int], int]
        ] = []  # (B, D, #values, length_per_key, offset)
        ranges = [s.value_ranges() for s in slices]
        total = 0
        for s, rng in zip(slices, ranges):
            n, d, nv = s.num_rows, s.source.dense.shape[1], sum(b - a for a, b in rng)
            self.layout.append((n, d, nv, [b - a for a, b in rng], total))
            start, size = self._segments(n, d, nv)[-1]
            total += (start + size + 7) // 8 * 8
        self.buffer = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(max(total, 8)))
        for s, rng, (dense, values, lengths, labels, ids) in zip(
            slices, ranges, self._views(self.buffer.numpy())
        ):
            src, a, b = s.source, s.start, s.stop
            dense[...] = src.dense[a:b]
            pos = 0
            for x, y in rng:
                values[pos : pos + y - x] = src.values[x:y]
                pos += y - x
            pieces = [p for p, multi in zip(s.lengths_pieces(), self.multi) if multi]
            if pieces:
                np.concatenate(pieces, out=lengths)
            labels[...] = src.labels[:, a:b]
            ids[...] = src.sample_ids[a:b]

    def _segments(self, n: int, d: int, nv: int) -> list[tuple[int, int]]:
        return _segments(n, d, nv, self.value_bytes, sum(self.multi), len(self.label_names))

    def _views(self, raw: npt.NDArray[np.uint8]) -> Iterator[tuple[npt.NDArray[Any], ...]]:
        """Per batch: (dense, values, multi lengths, labels (T, B), sample_ids) views of ``raw``."""
        ids = np.int32 if self.value_bytes == 4 else np.int64
        for n, d, nv, _, off in self.layout:
            seg = [raw[off + a : off + a + size] for a, size in self._segments(n, d, nv)]
            yield (
                seg[0].view(np.float32).reshape(n, d),
                seg[1].view(ids),
                seg[2].view(np.int32),
                seg[3].view(np.float32).reshape(len(self.label_names), n),
                seg[4].view(np.int64),
            )

    @property
    def num_rows(self) -> int:
        """Rows in all packed batches."""
        return sum(item[0] for item in self.layout)

    def pin_memory(self) -> PackedBatches:
        """A copy whose buffer is in pinned memory (DataLoader ``pin_memory=True``)."""
        out = copy.copy(self)
        out.buffer = self.buffer.pin_memory()
        out.pinned = True
        return out

    def unpack(self) -> list[Batch]:
        """The batches (int64 ids and full lengths rebuilt; dense, labels and ids are views).

        The rebuilding uses numpy, never torch ops: torch's intra-op thread pool would spin
        against the worker processes for cores.
        """
        out = []
        raw = self.buffer.numpy()
        for (n, _, _, lpk, _), (dense, values, multi_lengths, labels, ids) in zip(
            self.layout, self._views(raw)
        ):
            lengths = np.ones(n * len(self.keys), dtype=np.int32)
            j = 0
            for k, multi in enumerate(self.multi):
                if multi:
                    lengths[k * n : (k + 1) * n] = multi_lengths[j * n : (j + 1) * n]
                    j += 1
            values_t, lengths_t = torch.from_numpy(values.astype(np.int64)), torch.from_numpy(lengths)
            if self.pinned:  # the rebuilt arrays are new memory: pin them like the buffer
                values_t, lengths_t = values_t.pin_memory(), lengths_t.pin_memory()
            out.append(
                make_batch(
                    list(self.keys),
                    torch.from_numpy(dense),
                    values_t,
                    lengths_t,
                    list(lpk),
                    torch.from_numpy(labels),
                    self.label_names,
                    torch.from_numpy(ids),
                )
            )
        return out
