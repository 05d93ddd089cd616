r"""Ali-CCP raw Tianchi files (``sample_skeleton_*.csv`` + ``common_features_*.csv``) -> shards.

Format and line parsing: :mod:`mptrec.data_loaders.aliccp_raw_lines` (the ``value`` part of
each token is dropped, as AITM does). A row's features are its skeleton features plus those of
its common key; for a single-valued field present in both, the common one wins (AITM's
``dict.update``); list fields concatenate skeleton then common values. A single-valued field
listed several times in one line keeps (and counts) its last value. Vocabulary counts are per
train row, as AITM's; one difference: a skeleton id overridden by its common row still counts
(an unused id; this does not occur in the Ali-CCP files, whose user fields are common and item
fields skeleton).

Streaming in four passes, memory bounded by the vocabulary counts plus one encoded
common-features table (about the size of the common file's ids as int32):

1. count lines (the split permutation needs the row count);
2. skeleton: rows kept per split; on train rows, count skeleton ids and common-key usage;
3. common features: add each used key's ids, weighted by its train usage, to the counts;
   fit the vocabulary (``min_count``; AITM keeps ids seen more than 11 times, i.e. 12);
4. per input: encode its common features, then stream the skeleton, encode in chunks
   (vectorised merge) and write the shards.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
from tqdm import tqdm

from mptrec.data_loaders.aliccp import aliccp_arrow_schema, aliccp_schema, list_array
from mptrec.data_loaders.aliccp_raw_lines import LineReader, count_lines, parse_line
from mptrec.data_loaders.aliccp_tokens import TokenRow, encode_token_rows
from mptrec.data_loaders.layout import DEFAULT_ROW_GROUP_SIZE, assign_splits, write_schema
from mptrec.data_loaders.schema import ALICCP_FIELDS, ALICCP_MULTI_FIELDS, DataError
from mptrec.data_loaders.shard_writer import SplitWriter, file_sources, staged_out_dir
from mptrec.data_loaders.vocab import Vocabulary

CHUNK_ROWS = 16_384  # rows encoded at once (Ali-CCP rows carry hundreds of list ids)


@dataclass
class _Input:
    skeleton: Path
    common: Path
    split: int  # -1: pooled (split by fraction), else a fixed split index
    lines: int = 0
    code_offset: int = 0  # first row's index in the pooled split codes


class _CommonTable:
    """Encoded common features: key -> row index; single-field ids; list-field offsets/values."""

    def __init__(self, path: Path, vocab: Vocabulary, multi_fields: Sequence[str], budget: list[int]) -> None:
        self.index: dict[str, int] = {}
        self.multi_fields = list(multi_fields)
        singles: list[dict[str, npt.NDArray[np.int64]]] = []
        lengths: dict[str, list[npt.NDArray[np.int32]]] = {f: [] for f in multi_fields}
        values: dict[str, list[npt.NDArray[np.int32]]] = {f: [] for f in multi_fields}
        self.multi_value_rows: Counter[str] = Counter()
        reader = LineReader(path, 3, budget)
        rows: list[TokenRow] = []

        def flush() -> None:
            s, m = encode_token_rows(rows, vocab, multi_fields, self.multi_value_rows)
            singles.append(s)
            for f in multi_fields:
                lengths[f].append(m[f][0])
                values[f].append(m[f][1].astype(np.int32))
            rows.clear()

        for lineno, parts in tqdm(reader, desc=f"encode {path.name}", unit="keys", unit_scale=True):
            row = parse_line(reader, lineno, parts) if parts else None
            if row is None:
                continue
            if parts[0] in self.index:
                raise DataError(f"{path}:{lineno}: common key {parts[0]!r} appears twice")
            self.index[parts[0]] = len(self.index)
            rows.append(row)
            if len(rows) >= CHUNK_ROWS:
                flush()
        flush()
        self.singles = {f: np.concatenate([s[f] for s in singles]) for f in singles[0]}
        self.offsets = {
            f: np.concatenate([[0], np.cumsum(np.concatenate(lengths[f]), dtype=np.int64)])
            for f in multi_fields
        }
        self.values = {f: np.concatenate(values[f]) for f in multi_fields}


def _ranges(starts: npt.NDArray[np.int64], lengths: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Concatenation of ``arange(s, s + n)`` for each (s, n), vectorised."""
    total = int(lengths.sum())
    excl = np.cumsum(lengths) - lengths
    return np.repeat(starts - excl, lengths) + np.arange(total, dtype=np.int64)


def _merge_chunk(
    rows: list[TokenRow],
    keys: npt.NDArray[np.int64],
    common: _CommonTable,
    vocab: Vocabulary,
    multi_fields: Sequence[str],
    multi_rows: Counter[str],
) -> dict[str, Any]:
    """Encode a chunk of skeleton rows and merge each with its common key's features."""
    singles, multis = encode_token_rows(rows, vocab, multi_fields, multi_rows)
    cols: dict[str, Any] = {}
    for f, ids in singles.items():
        from_common = common.singles[f][keys]
        cols[f] = np.maximum(np.where(from_common >= 0, from_common, ids), 0)
    for f in multi_fields:
        ls, vs = multis[f][0].astype(np.int64), multis[f][1]
        start = common.offsets[f][keys]
        lc = common.offsets[f][keys + 1] - start
        total = ls + lc
        row_start = np.cumsum(total) - total
        out = np.empty(int(total.sum()), dtype=np.int64)
        out[_ranges(row_start, ls)] = vs
        out[_ranges(row_start + ls, lc)] = common.values[f][_ranges(start, lc)]
        cols[f] = list_array(total, out)
    return cols


def _resolve_inputs(
    inputs: Sequence[str | os.PathLike[str]],
    assigned: Sequence[tuple[str, str | os.PathLike[str]]],
    commons: Sequence[str | os.PathLike[str]] | None,
    names: list[str],
) -> list[_Input]:
    pairs = [(Path(p), -1) for p in inputs] + [(Path(p), names.index(s)) for s, p in assigned]
    if not pairs:
        raise DataError("aliccp-raw: no skeleton files given")
    if commons is not None and len(commons) != len(pairs):
        raise DataError(f"--common: {len(commons)} files for {len(pairs)} skeleton files")
    out = []
    for i, (skel, split) in enumerate(pairs):
        if commons is not None:
            common = Path(commons[i])
        elif "sample_skeleton_" in skel.name:
            common = skel.with_name(skel.name.replace("sample_skeleton_", "common_features_"))
        else:
            raise DataError(
                f"{skel}: cannot derive the common-features file name "
                "(expected sample_skeleton_*); pass --common"
            )
        for p in (skel, common):
            if not p.is_file():
                raise DataError(f"{p}: no such file (skeleton {skel}; --common names the common file)")
        out.append(_Input(skel, common, split))
    return out


def _scan_skeletons(
    files: list[_Input],
    codes: npt.NDArray[np.int8],
    train: int,
    drop: bool,
    budget: list[int],
    num_splits: int,
    multi: Sequence[str],
) -> tuple[list[int], dict[str, Counter[str]], list[Counter[str]], int]:
    """Pass 2: rows kept per split; train-row id counts and common-key usage (per input)."""
    kept = [0] * num_splits
    counts: dict[str, Counter[str]] = {f: Counter() for f in ALICCP_FIELDS}
    usage: list[Counter[str]] = []
    dropped = 0
    for inp in files:
        use: Counter[str] = Counter()
        reader = LineReader(inp.skeleton, 6, budget)
        for lineno, parts in tqdm(
            reader, desc=f"scan {inp.skeleton.name}", unit="rows", unit_scale=True, total=inp.lines
        ):
            if not parts:
                continue
            split = int(codes[inp.code_offset + lineno - 1]) if inp.split < 0 else inp.split
            if drop and parts[1] == "0" and parts[2] == "1":
                dropped += 1
                continue
            row = parse_line(reader, lineno, parts)
            if row is None:
                continue
            kept[split] += 1
            if split == train:
                use[parts[3]] += 1
                for field, values in row.items():
                    if field in counts:
                        counts[field].update(values if field in multi else values[-1:])
        usage.append(use)
    return kept, counts, usage, dropped


def _count_common(
    inp: _Input, use: Counter[str], counts: dict[str, Counter[str]], budget: list[int], multi: Sequence[str]
) -> None:
    """Pass 3: add the ids of each used common key, weighted by its train usage."""
    reader = LineReader(inp.common, 3, budget)
    for lineno, parts in tqdm(reader, desc=f"count {inp.common.name}", unit="keys", unit_scale=True):
        weight = use.get(parts[0], 0) if parts else 0
        if not weight:
            continue
        row = parse_line(reader, lineno, parts)
        for field, values in (row or {}).items():
            if field in counts:
                cnt = counts[field]
                for v in values if field in multi else values[-1:]:
                    cnt[v] += weight


def convert_aliccp_raw(
    inputs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    split: dict[str, float],
    seed: int,
    shards: int = 1,
    assigned: Sequence[tuple[str, str | os.PathLike[str]]] = (),
    commons: Sequence[str | os.PathLike[str]] | None = None,
    min_count: int = 12,
    multi_fields: Sequence[str] = ALICCP_MULTI_FIELDS,
    drop_purchase_without_click: bool = False,
    max_bad_lines: int = 0,
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Convert raw Tianchi Ali-CCP files, streaming (see the module docstring).

    Args:
        inputs: skeleton files pooled and split by ``split``.
        out_dir: output shard folder.
        split: split name -> fraction (must contain ``train``; the vocabulary is fitted on it).
        seed: split seed.
        shards: files per split.
        assigned: (split, skeleton file) pairs whose rows all go to that split (e.g.
            ``("test", "sample_skeleton_test.csv")``).
        commons: common-features files, one per skeleton (inputs first, then assigned); by
            default ``sample_skeleton_X`` -> ``common_features_X`` in the same folder.
        min_count: train-split occurrences an id needs to get its own id (else 0).
        multi_fields: fields kept as lists.
        drop_purchase_without_click: drop rows with click 0 and buy 1 (AITM does).
        max_bad_lines: malformed lines tolerated (skipped and counted) before failing.
        row_group_size: rows per row group.
        overwrite: replace existing shards.

    Returns:
        The schema written.
    """
    if "train" not in split:
        raise DataError(f"--split must contain 'train' (the vocabulary is fitted on it), got {split}")
    names = list(split) + [s for s, _ in assigned if s not in split]
    files = _resolve_inputs(inputs, assigned, commons, names)
    with staged_out_dir(out_dir, overwrite) as out:
        budget = [max_bad_lines]
        codes, kept, vocab, dropped = _fit_vocabulary(
            files, split, seed, names, drop_purchase_without_click, budget, multi_fields, min_count
        )
        splits_meta, stats, counts = _write_splits(
            out, files, names, kept, codes, vocab, multi_fields, drop_purchase_without_click, max_bad_lines,
            shards, row_group_size,
        )
        stats.update(dropped_purchase_without_click=dropped, **counts)
        vocab.save(out)
        result = aliccp_schema(
            {f: vocab.num_embeddings(f) for f in ALICCP_FIELDS},
            multi_fields,
            splits_meta,
            stats=stats,
            sources=file_sources([p for inp in files for p in (inp.skeleton, inp.common)]),
            vocab_file="vocab.json",
            split_spec={"fractions": split, "seed": seed, "assigned": [[s, str(p)] for s, p in assigned]},
            notes=f"Ali-CCP raw Tianchi format; ids re-encoded per field on the train split (min_count "
            f"{min_count}; AITM's threshold 'count > 10' equals 12), 0 = missing/rare/unseen; feature values "
            f"(\\x03 part) dropped; list fields {list(multi_fields)}; single-valued fields keep the last of "
            "several values, common features override skeleton ones (AITM). Tokens: a field must be an "
            "Ali-CCP field code (digits, optionally _digits) and an id a non-negative integer, else the "
            "line is malformed (file, line, field and value named; --max-bad-lines skips and counts "
            "it); fields not converted are ignored.",
        )
        write_schema(out, result)
        return result

def _fit_vocabulary(
    files: list[_Input],
    split: dict[str, float],
    seed: int,
    names: list[str],
    drop: bool,
    budget: list[int],
    multi_fields: Sequence[str],
    min_count: int,
) -> tuple[npt.NDArray[np.int8], list[int], Vocabulary, int]:
    """Passes 1-3: split codes of the pooled rows, rows kept per split, the vocabulary, rows dropped."""
    n_pool = 0
    for inp in tqdm(files, desc="count lines", unit="file"):
        inp.lines = count_lines(inp.skeleton)
        if inp.lines == 0:
            raise DataError(f"{inp.skeleton}: no data rows (empty file)")
        if inp.split < 0:
            inp.code_offset, n_pool = n_pool, n_pool + inp.lines
    codes = assign_splits(n_pool, split, seed)
    kept, counts, usage, dropped = _scan_skeletons(
        files, codes, names.index("train"), drop, budget, len(names), multi_fields
    )
    for inp, use in zip(files, usage):
        if use:
            _count_common(inp, use, counts, budget, multi_fields)
    return codes, kept, Vocabulary.fit(counts, min_count=min_count), dropped


def _write_splits(
    out: Path,
    files: list[_Input],
    names: list[str],
    kept: list[int],
    codes: npt.NDArray[np.int8],
    vocab: Vocabulary,
    multi_fields: Sequence[str],
    drop: bool,
    max_bad_lines: int,
    shards: int,
    row_group_size: int,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Pass 4: write every input to the split shards.

    Returns:
        The splits' metadata; rows and positives per split; the counts of bad lines skipped and
        of multi-valued rows that kept their last value.
    """
    schema = aliccp_arrow_schema(multi_fields)
    writers = [
        SplitWriter(out, name, kept[i], shards, schema, row_group_size) for i, name in enumerate(names)
    ]
    multi_rows: Counter[str] = Counter()
    positives = np.zeros((len(names), 2), dtype=np.int64)
    budget = [max_bad_lines]  # pass 4 sees the same bad lines again
    for inp in files:
        _write_input(inp, codes, vocab, multi_fields, drop, budget, writers, positives, multi_rows)
    splits_meta = {name: w.close() for name, w in zip(names, writers)}
    stats: dict[str, Any] = {
        name: {
            "rows": kept[i],
            "click_positives": int(positives[i, 0]),
            "purchase_positives": int(positives[i, 1]),
        }
        for i, name in enumerate(names)
    }
    counts = {"bad_lines_skipped": max_bad_lines - budget[0], "multi_value_rows_last_kept": dict(multi_rows)}
    return splits_meta, stats, counts


def _write_input(
    inp: _Input,
    codes: npt.NDArray[np.int8],
    vocab: Vocabulary,
    multi_fields: Sequence[str],
    drop: bool,
    budget: list[int],
    writers: list[SplitWriter],
    positives: npt.NDArray[np.int64],
    multi_rows: Counter[str],
) -> None:
    """Pass 4 for one input: encode its common features, stream its skeleton into the writers."""
    common = _CommonTable(inp.common, vocab, multi_fields, budget)
    schema = writers[0].schema
    rows: list[TokenRow] = []
    keys: list[int] = []
    labels: list[tuple[int, int, int]] = []

    def flush() -> None:
        if not rows:
            return
        cols = _merge_chunk(rows, np.asarray(keys, dtype=np.int64), common, vocab, multi_fields, multi_rows)
        lab = np.asarray(labels, dtype=np.int64)
        cols["click"], cols["purchase"] = lab[:, 0].astype(np.int8), lab[:, 1].astype(np.int8)
        table = pa.table({n: cols[n] for n in schema.names}, schema=schema)
        for s in np.unique(lab[:, 2]):
            sel = lab[:, 2] == s
            writers[s].write(table.filter(pa.array(sel)))
            positives[s] += lab[sel, :2].sum(axis=0)
        rows.clear()
        keys.clear()
        labels.clear()

    reader = LineReader(inp.skeleton, 6, budget)
    for lineno, parts in tqdm(
        reader, desc=f"write {inp.skeleton.name}", unit="rows", unit_scale=True, total=inp.lines
    ):
        if not parts or (drop and parts[1] == "0" and parts[2] == "1"):
            continue
        row = parse_line(reader, lineno, parts)
        if row is None:
            continue
        key = common.index.get(parts[3])
        if key is None:
            raise DataError(f"{inp.skeleton}:{lineno}: common key {parts[3]!r} not in {inp.common}")
        split = int(codes[inp.code_offset + lineno - 1]) if inp.split < 0 else inp.split
        rows.append(row)
        keys.append(key)
        labels.append((int(parts[1]), int(parts[2]), split))
        if len(rows) >= CHUNK_ROWS:
            flush()
    flush()
