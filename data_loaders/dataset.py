"""``ShardDataset``: an ``IterableDataset`` of :class:`Batch` over the Parquet shards of a split.

Work is split by row group: the split's row groups (in file order, cut at ``max_rows``) are
optionally permuted with a generator seeded by ``(seed, epoch)``, then dealt round-robin to
the ``world_size * num_workers`` readers, so every row is read exactly once per epoch across
all ranks and DataLoader workers. With ``shuffle``, each row group's rows are also read in a
permuted order, seeded by ``(seed, epoch, shard file, row group)`` (the same on any number of
ranks and workers, so an epoch's batches can be re-created for an exact resume); without it,
rows come in file order. Rank and world size are arguments; nothing is read from the
environment. The epoch and the skip counters live in shared memory, so they reach (and come
back from) DataLoader workers. Ranks may get a different number of batches.

Bad input (a missing column, a wrong type, a label outside its values, NaN in a dense column,
an id out of range under ``oov_policy="error"``, an empty or corrupt shard) raises
:class:`DataError` naming the shard file, the column and the row group; with
``on_error="skip"`` the shard or row group is skipped, logged and counted
(:attr:`ShardDataset.num_skipped`, :attr:`ShardDataset.num_skipped_rows`, shared with the
DataLoader workers).

Example:
    >>> ds = ShardDataset(data_dir, "train", features=feats, labels=[LabelSpec("click", "click")],
    ...                   batch_size=4096, rank=0, world_size=2, shuffle=True)  # doctest: +SKIP
    >>> for epoch in range(3):  # doctest: +SKIP
    ...     ds.set_epoch(epoch)
    ...     for batch in make_dataloader(ds, num_workers=2): ...
"""

from __future__ import annotations

import functools
import logging
import multiprocessing as mp
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mptrec.columns import column_type_fits
from mptrec.data_loaders.batch import Batch
from mptrec.data_loaders.layout import read_schema
from mptrec.data_loaders.packing import PackedBatches
from mptrec.data_loaders.schema import DataError, FeatureSpec, LabelSpec, OovPolicy
from mptrec.data_loaders.shuffle import Pending, Unit, cut_batches, deal_units, pending_rows, row_order
from mptrec.data_loaders.table_checks import OOV_POLICIES, check_table
from mptrec.data_loaders.to_batch import SAMPLE_ID_COLUMN, RowSlice

logger = logging.getLogger(__name__)


class ShardDataset(IterableDataset[Batch]):
    """Batches of one split, sharded over ranks and DataLoader workers by row group.

    Args:
        data_dir: shard folder (with ``schema.json``).
        split: split name (``train``, ``valid``, ``test``, ...).
        features: features to read (from ``resolve_features``), in declared order.
        labels: labels to read.
        batch_size: rows per batch.
        rank: this process's rank.
        world_size: number of ranks.
        shuffle: every epoch, permute the row groups and the rows inside each row group
            (seeded by ``seed``, the epoch and, for rows, the shard file and row group).
        shuffle_buffer: with ``shuffle``, also permute rows across row groups, within buffers
            of this many rows.
        seed: shuffling seed.
        oov_policy: ids >= a table's size: ``error``, ``hash`` or ``clip``.
        on_error: ``raise`` a :class:`DataError` on bad input, or ``skip`` (count, log).
        max_rows: read only the first this-many rows of the split (0: all).
        drop_last: drop each reader's last incomplete batch.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        split: str,
        *,
        features: Sequence[FeatureSpec],
        labels: Sequence[LabelSpec],
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = False,
        shuffle_buffer: int = 0,
        seed: int = 0,
        oov_policy: OovPolicy = "error",
        on_error: Literal["raise", "skip"] = "raise",
        max_rows: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__()
        if (
            batch_size <= 0
            or world_size <= 0
            or not 0 <= rank < world_size
            or max_rows < 0
            or shuffle_buffer < 0
        ):
            raise ValueError(
                f"bad arguments: batch_size={batch_size}, rank={rank}, world_size={world_size}, "
                f"max_rows={max_rows}, shuffle_buffer={shuffle_buffer}"
            )
        if oov_policy not in OOV_POLICIES or on_error not in ("raise", "skip"):
            raise ValueError(
                f"oov_policy {oov_policy!r} not in {OOV_POLICIES} or on_error {on_error!r} "
                "not in ('raise', 'skip')"
            )
        self.data_dir = Path(data_dir)
        self.schema = read_schema(self.data_dir)
        if split not in self.schema["splits"]:
            raise DataError(f"{self.data_dir}: no split {split!r} (have {sorted(self.schema['splits'])})")
        self.split, self.features, self.labels = split, list(features), list(labels)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.shuffle, self.shuffle_buffer, self.seed = shuffle, shuffle_buffer, seed
        self.oov_policy, self.on_error, self.max_rows, self.drop_last = (
            oov_policy,
            on_error,
            max_rows,
            drop_last,
        )
        self._epoch = mp.get_context().Value("q", 0)  # shared, so persistent workers see set_epoch
        self.label_values = {c: list(v["values"]) for c, v in self.schema["labels"].items()}
        self._check_labels()
        self._expected = self._expected_types()
        self.columns = list(self._expected)
        self._counters = mp.get_context().Array("q", 2)  # [skips, rows skipped], shared with workers
        self.files = [self.data_dir / f for f in self.schema["splits"][split]["files"]]
        self.units = self._scan()
        self._open: dict[int, pq.ParquetFile] = {}
        self._pid = os.getpid()

    # ---------------------------------------------------------------- construction checks
    def _check_labels(self) -> None:
        for lab in self.labels:
            if lab.positive_values:
                declared = self.label_values.get(lab.column)
                if declared is None:
                    raise DataError(
                        f"{self.data_dir}/schema.json: label {lab.name!r}: column {lab.column!r} is "
                        f"not a declared label source ({sorted(self.label_values)})"
                    )
                extra = sorted(set(lab.positive_values) - set(declared))
                if extra:
                    raise DataError(
                        f"label {lab.name!r}: positive_values {extra} not among column "
                        f"{lab.column!r}'s values {declared}"
                    )

    def _expected_types(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for f in self.features:
            out[f.column] = "dense" if f.kind == "dense" else ("multi" if f.multivalent else "int")
        for lab in self.labels:
            if out.setdefault(lab.column, "int") != "int":
                raise DataError(f"label {lab.name!r}: column {lab.column!r} is also a non-integer feature")
        return out

    def _fail(self, message: str, rows: int) -> None:
        if self.on_error == "raise":
            raise DataError(message)
        with self._counters.get_lock():
            self._counters[0] += 1
            self._counters[1] += rows
        logger.warning("skipped (on_error='skip'): %s", message)

    @property
    def num_skipped(self) -> int:
        """Shards and row groups skipped so far under ``on_error="skip"`` (all workers)."""
        return int(self._counters[0])

    @property
    def num_skipped_rows(self) -> int:
        """Rows in those skipped shards and row groups."""
        return int(self._counters[1])

    def _scan(self) -> list[Unit]:
        """Read every shard's footer: check it, list its row groups (cut at ``max_rows``)."""
        declared_rows = self.schema["splits"][self.split]["rows"]
        units: list[Unit] = []
        first = 0
        for i, path in enumerate(self.files):
            expected, start = int(declared_rows[i]), first
            first += expected
            if self.max_rows and start >= self.max_rows:
                break
            try:
                meta = pq.ParquetFile(path).metadata
                arrow_schema = meta.schema.to_arrow_schema()
            except (OSError, pa.ArrowException) as e:
                self._fail(f"{path}: corrupt or unreadable Parquet shard: {e}", expected)
                continue
            if meta.num_rows == 0 or meta.num_rows != expected:
                what = "empty shard (0 rows)" if meta.num_rows == 0 else "row count mismatch"
                self._fail(
                    f"{path}: {what}: the file has {meta.num_rows} rows, schema.json says {expected}",
                    expected,
                )
                continue
            problem = self._check_columns(arrow_schema)
            if problem:
                self._fail(f"{path}: {problem}", expected)
                continue
            row = start
            for rg in range(meta.num_row_groups):
                n = meta.row_group(rg).num_rows
                keep = min(n, self.max_rows - row) if self.max_rows else n
                if keep > 0:
                    units.append(Unit(i, rg, row, keep))
                row += n
        return units

    def _check_columns(self, arrow_schema: pa.Schema) -> str:
        for col, kind in self._expected.items():
            if col not in arrow_schema.names:
                return f"column {col!r} missing (has {arrow_schema.names})"
            t = arrow_schema.field(col).type
            if not column_type_fits(t, kind):
                want = {"multi": "list<int64>", "dense": "float", "int": "int64"}[kind]
                return f"column {col!r} has type {t}, expected {want}"
        return ""

    # ---------------------------------------------------------------- iteration
    @property
    def num_rows(self) -> int:
        """Rows read per epoch across all ranks and workers (before skips)."""
        return sum(u.rows for u in self.units)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch (reseeds the row-group permutation, the row orders and the shuffle buffer).

        The value lives in shared memory, so DataLoader workers (persistent or not) see it when
        the next epoch's iteration starts.
        """
        self._epoch.value = int(epoch)

    @property
    def epoch(self) -> int:
        """The current epoch."""
        return int(self._epoch.value)

    def _units_of(self, reader: int, readers: int, epoch: int) -> list[Unit]:
        """Row groups of reader ``reader`` out of ``readers`` in ``epoch`` (the dealing rule)."""
        return deal_units(self.units, reader, readers, shuffle=self.shuffle, seed=self.seed, epoch=epoch)

    def row_order(self, unit: Unit, epoch: int) -> npt.NDArray[np.int64]:
        """The order in which ``unit``'s rows are read in ``epoch`` under ``shuffle``.

        See :func:`mptrec.data_loaders.shuffle.row_order` (seeded by this dataset's ``seed``).
        """
        return row_order(unit, self.seed, epoch)

    def _my_units(self, epoch: int) -> tuple[list[Unit], int]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        readers = self.world_size * workers
        return self._units_of(self.rank * workers + worker, readers, epoch), worker

    def num_batches(self, num_workers: int, epoch: int | None = None) -> int:
        """Batches this rank yields in ``epoch`` (default: the current one) with ``num_workers``.

        Exact unless row groups are skipped under ``on_error="skip"`` (then an upper bound).
        """
        workers = max(1, num_workers)
        total = 0
        for w in range(workers):
            units = self._units_of(
                self.rank * workers + w, self.world_size * workers, self.epoch if epoch is None else epoch
            )
            rows = sum(u.rows for u in units)
            total += rows // self.batch_size + (1 if rows % self.batch_size and not self.drop_last else 0)
        return total

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (spawned DataLoader workers) without open file handles."""
        state = dict(self.__dict__)
        state["_open"] = {}
        return state

    def _read(self, unit: Unit) -> pa.Table | None:
        path = self.files[unit.file]
        where = f"{path} row group {unit.row_group}"
        if self._pid != os.getpid():  # a forked worker: do not share the parent's file handles
            self._open, self._pid = {}, os.getpid()
        try:
            pf = self._open.get(unit.file)
            if pf is None:
                pf = self._open[unit.file] = pq.ParquetFile(path)
            table = pf.read_row_group(unit.row_group, columns=self.columns, use_threads=False)
        except (OSError, pa.ArrowException) as e:
            self._fail(f"{where}: cannot read: {e}", unit.rows)
            return None
        table = table.slice(0, unit.rows)
        try:
            check_table(table, self.features, self.labels, self.label_values, self.oov_policy, where)
        except DataError as e:
            self._fail(str(e), unit.rows)
            return None
        ids = np.arange(unit.first_row, unit.first_row + unit.rows, dtype=np.int64)
        return table.append_column(SAMPLE_ID_COLUMN, pa.array(ids))

    def iter_slices(self) -> Iterator[RowSlice]:
        """This reader's batches for the current epoch, as row slices of decoded blocks.

        Under ``shuffle``, the reader's row groups come in the epoch's order and the rows of
        each in :meth:`row_order`, then (``shuffle_buffer``) are permuted once more within the
        buffer.
        """
        epoch = self.epoch
        units, worker = self._my_units(epoch)
        buffered = self.shuffle and self.shuffle_buffer > 0
        rng = np.random.default_rng([self.seed, epoch, self.rank, worker, 1]) if buffered else None
        target = max(self.batch_size, self.shuffle_buffer) if buffered else self.batch_size
        cut = functools.partial(
            cut_batches, rng=rng, shuffle=self.shuffle, batch_size=self.batch_size, drop_last=self.drop_last,
            features=self.features, labels=self.labels, oov_policy=self.oov_policy,
            where=f"{self.data_dir} split {self.split!r}",
        )
        pending: list[Pending] = []
        rows = 0
        for unit in units:
            table = self._read(unit)
            if table is None:
                continue
            pending.append((table, self.row_order(unit, epoch) if self.shuffle else None))
            rows += table.num_rows
            if rows < target:
                continue
            for item in cut(pending, final=False):
                if isinstance(item, RowSlice):
                    yield item
                else:
                    pending, rows = item, pending_rows(item)
        if rows:
            yield from (
                item for item in cut(pending, final=True) if isinstance(item, RowSlice)
            )

    def __iter__(self) -> Iterator[Batch]:
        """Yield this reader's batches for the current epoch."""
        for piece in self.iter_slices():
            yield piece.materialize().to_batch()

    def iter_packed(self, batches_per_item: int) -> Iterator[PackedBatches]:
        """Like ``__iter__`` but ``batches_per_item`` batches per shared-memory buffer (workers)."""
        narrow = all(f.num_embeddings <= 2**31 for f in self.features if f.kind == "sparse")
        group: list[RowSlice] = []
        for piece in self.iter_slices():
            group.append(piece)
            if len(group) == batches_per_item:
                yield PackedBatches(group, narrow_ids=narrow)
                group = []
        if group:
            yield PackedBatches(group, narrow_ids=narrow)


class _PackedShards(IterableDataset[PackedBatches]):
    """What the DataLoader workers iterate: the dataset's batches packed into shared buffers."""

    def __init__(self, dataset: ShardDataset, batches_per_item: int) -> None:
        super().__init__()
        self.dataset = dataset
        self.batches_per_item = batches_per_item

    def __iter__(self) -> Iterator[PackedBatches]:
        return self.dataset.iter_packed(self.batches_per_item)

    def set_epoch(self, epoch: int) -> None:
        """Forward to the dataset."""
        self.dataset.set_epoch(epoch)


class ShardDataLoader(DataLoader):  # type: ignore[type-arg]
    """A DataLoader of :class:`Batch` over a :class:`ShardDataset` (use :func:`make_dataloader`).

    With workers, each worker packs about ``pack_rows`` rows of batches into one shared-memory
    buffer (one file-descriptor transfer instead of one per tensor) and this process unpacks
    them into batches with zero-copy views; the batches and their order are the same as without
    packing.

    Args:
        dataset: the dataset.
        num_workers: worker processes (0: read in this process).
        pack_rows: rows per transfer from a worker (at least one batch).
        **kwargs: passed to ``torch.utils.data.DataLoader``.
    """

    def __init__(
        self, dataset: ShardDataset, num_workers: int, pack_rows: int = 16_384, **kwargs: Any
    ) -> None:
        per_item = max(1, pack_rows // dataset.batch_size)
        source = _PackedShards(dataset, per_item) if num_workers else dataset
        super().__init__(source, batch_size=None, num_workers=num_workers, **kwargs)
        self.shard_dataset = dataset

    def __iter__(self) -> Iterator[Batch]:  # type: ignore[override]
        """Batches of the current epoch (call ``shard_dataset.set_epoch`` first); workers start now."""
        it = super().__iter__()
        return it if not self.num_workers else self._unpacked(it)

    @staticmethod
    def _unpacked(packed: Iterator[PackedBatches]) -> Iterator[Batch]:
        for item in packed:
            yield from item.unpack()


def make_dataloader(
    dataset: ShardDataset,
    num_workers: int,
    *,
    persistent_workers: bool = True,
    prefetch_factor: int = 2,
    pin_memory: bool = False,
    multiprocessing_context: str | None = None,
) -> ShardDataLoader:
    """A DataLoader over a :class:`ShardDataset` (``batch_size=None``: the dataset batches).

    Workers are persistent by default (no start-up cost per epoch); the epoch set by
    :meth:`ShardDataset.set_epoch` before each epoch's ``iter()`` reaches them through shared
    memory.

    Args:
        dataset: the dataset.
        num_workers: worker processes (0: read in this process).
        persistent_workers: keep the workers between epochs.
        prefetch_factor: packed items (about 16k rows each) prefetched per worker.
        pin_memory: pin batches (CUDA training).
        multiprocessing_context: worker start method (default: the platform's).

    Returns:
        A ``torch.utils.data.DataLoader`` (subclass) yielding :class:`Batch`.
    """
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    extra: dict[str, Any] = {}
    if num_workers:
        extra = {
            "prefetch_factor": prefetch_factor,
            "multiprocessing_context": multiprocessing_context,
            "persistent_workers": persistent_workers,
        }
    return ShardDataLoader(dataset, num_workers, pin_memory=pin_memory, **extra)
