"""Ali-CCP sample files (AITM / torch-rechub CSV, PaddleRec ``field:id`` text) -> Parquet shards.

All quirks of these formats stay here; the raw Tianchi format is in
:mod:`mptrec.data_loaders.aliccp_raw`; the token policy and the counting and encoding of
parsed token rows, shared by PaddleRec and raw, in :mod:`mptrec.data_loaders.aliccp_tokens`.

* CSV (``aliccp-csv``): header ``click,purchase,<field>...,[D<field>...]``. The sparse ids are
  already encoded by the source's preprocessing and are kept as given (table size = largest id
  + 1 over all inputs); ``*_14`` columns hold one id each there, so they stay single-valued;
  ``D*`` columns are dense (already min-max scaled by the source).
* PaddleRec (``aliccp-paddle``): ``row_id,click,purchase,field:id,...``. Ids are re-encoded
  per field with a vocabulary fitted on the training split (``min_count``), 0 = missing/rare.
  Multi-valued fields (:data:`ALICCP_MULTI_FIELDS`) become ``list<int64>``; a single-valued
  field with several values in a row keeps the last one (AITM's dict semantics) and the rows
  where that happened are counted in schema.json ``stats``.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from mptrec.data_loaders.aliccp_tokens import (
    TokenRow,
    count_tokens,
    count_unused_fields,
    encode_token_rows,
    token_problem,
)
from mptrec.data_loaders.layout import DEFAULT_ROW_GROUP_SIZE, SCHEMA_VERSION, assign_splits, write_schema
from mptrec.data_loaders.schema import ALICCP_FIELDS, ALICCP_LABELS, ALICCP_MULTI_FIELDS, DataError
from mptrec.data_loaders.shard_writer import file_sources, staged_out_dir, write_table_splits
from mptrec.data_loaders.vocab import Vocabulary


def aliccp_arrow_schema(multi_fields: Sequence[str] = ALICCP_MULTI_FIELDS) -> pa.Schema:
    """Arrow schema of converted (raw / PaddleRec) and synthetic Ali-CCP shards."""
    return pa.schema(
        [(lab, pa.int8()) for lab in ALICCP_LABELS]
        + [(f, pa.list_(pa.int64()) if f in multi_fields else pa.int64()) for f in ALICCP_FIELDS]
    )


def aliccp_schema(
    num_embeddings: Mapping[str, int], multi_fields: Sequence[str], splits: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    """schema.json for token-format Ali-CCP shards (all :data:`ALICCP_FIELDS`, declared order)."""
    return {
        "dataset": "aliccp",
        "version": SCHEMA_VERSION,
        "features": [
            {
                "name": f,
                "column": f,
                "kind": "sparse",
                "num_embeddings": int(num_embeddings[f]),
                "multivalent": f in multi_fields,
            }
            for f in ALICCP_FIELDS
        ],
        "labels": {
            "click": {"values": [0, 1]},
            "purchase": {"values": [0, 1]},
            "301": {"values": list(range(int(num_embeddings["301"])))},
        },
        "splits": splits,
        **extra,
    }


def list_array(lengths: npt.NDArray[np.integer[Any]], values: npt.NDArray[np.int64]) -> pa.ListArray:
    """A ``list<int64>`` array from per-row lengths and flat values."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.int64()))


# --------------------------------------------------------------------------------------------
# PaddleRec field:id text
# --------------------------------------------------------------------------------------------


def read_paddle(
    path: str | os.PathLike[str],
) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.int8], list[TokenRow]]:
    """Read a PaddleRec ESMM file: ``row_id,click,purchase,field:id,...`` per line.

    Returns:
        ``(click, purchase, rows)`` with rows as ``field -> [raw ids]``.

    Raises:
        DataError: a malformed line or token, naming file and line.
    """
    clicks: list[int] = []
    buys: list[int] = []
    rows: list[TokenRow] = []
    try:
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                parts = line.strip().split(",")
                if parts == [""]:
                    continue
                if len(parts) < 3 or parts[1] not in ("0", "1") or parts[2] not in ("0", "1"):
                    raise DataError(
                        f"{path}:{lineno}: expected row_id,click,purchase,field:id,... "
                        f"with 0/1 labels, got {','.join(parts[:3])!r}"
                    )
                row: TokenRow = {}
                for tok in parts[3:]:
                    field, sep, fid = tok.partition(":")
                    if not sep or not fid:
                        raise DataError(f"{path}:{lineno}: token {tok!r} is not field:id")
                    problem = token_problem(field, fid)
                    if problem:
                        raise DataError(f"{path}:{lineno}: token {tok!r}: {problem}")
                    row.setdefault(field, []).append(fid)
                clicks.append(int(parts[1]))
                buys.append(int(parts[2]))
                rows.append(row)
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read: {e}") from e
    if not rows:
        raise DataError(f"{path}: no data rows")
    return np.array(clicks, dtype=np.int8), np.array(buys, dtype=np.int8), rows


def _read_paddle_pool(
    inputs: Sequence[str | os.PathLike[str]],
    assigned: Sequence[tuple[str, str | os.PathLike[str]]],
    split: dict[str, float],
    seed: int,
    names: list[str],
) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.int8], list[TokenRow], npt.NDArray[np.int8]]:
    """Read the pooled and the assigned files: clicks, purchases, rows and split codes."""
    parts = [read_paddle(p) for p in inputs]
    click = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int8)
    buy = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int8)
    rows = [r for p in parts for r in p[2]]
    codes = assign_splits(len(rows), split, seed)
    for name, path in assigned:
        c, b, r = read_paddle(path)
        click, buy, rows = np.concatenate([click, c]), np.concatenate([buy, b]), rows + r
        codes = np.concatenate([codes, np.full(len(r), names.index(name), np.int8)])
    return click, buy, rows, codes


def _encode_paddle(
    rows: list[TokenRow],
    click: npt.NDArray[np.int8],
    buy: npt.NDArray[np.int8],
    train: list[TokenRow],
    min_count: int,
    multi_fields: Sequence[str],
) -> tuple[pa.Table, Vocabulary, Counter[str]]:
    """Fit the vocabulary on the ``train`` rows and encode all rows into a table.

    Also returns, per field, the rows where a single-valued field kept the last of several values.
    """
    counts: dict[str, Counter[str]] = {f: Counter() for f in ALICCP_FIELDS}
    count_tokens(train, counts, multi_fields)
    vocab = Vocabulary.fit(counts, min_count=min_count)
    multi_rows: Counter[str] = Counter()
    singles, multis = encode_token_rows(rows, vocab, multi_fields, multi_rows)
    cols: dict[str, Any] = {"click": click, "purchase": buy}
    for f in ALICCP_FIELDS:
        cols[f] = list_array(*multis[f]) if f in multi_fields else np.maximum(singles[f], 0)
    return pa.table(cols, schema=aliccp_arrow_schema(multi_fields)), vocab, multi_rows


def convert_aliccp_paddle(
    inputs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    split: dict[str, float],
    seed: int,
    shards: int = 1,
    assigned: Sequence[tuple[str, str | os.PathLike[str]]] = (),
    min_count: int = 1,
    multi_fields: Sequence[str] = ALICCP_MULTI_FIELDS,
    drop_purchase_without_click: bool = False,
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Convert PaddleRec ``field:id`` files; vocabulary fitted on the train split.

    Args:
        inputs: files pooled and split by ``split``.
        out_dir: output shard folder.
        split: split name -> fraction (must contain ``train``).
        seed: split seed.
        shards: files per split.
        assigned: (split, file) pairs whose rows all go to that split.
        min_count: minimum train count of a value to get an id.
        multi_fields: fields kept as lists.
        drop_purchase_without_click: drop rows with click 0 and purchase 1 (AITM does).
        row_group_size: rows per row group.
        overwrite: replace existing shards.

    Returns:
        The schema written.
    """
    if "train" not in split:
        raise DataError(f"--split must contain 'train' (the vocabulary is fitted on it), got {split}")
    unknown = sorted(set(multi_fields) - set(ALICCP_FIELDS))
    if unknown:
        raise DataError(f"--multi-fields: unknown Ali-CCP field(s) {unknown}")
    with staged_out_dir(out_dir, overwrite) as out:
        names = list(split) + [s for s, _ in assigned if s not in split]
        click, buy, rows, codes = _read_paddle_pool(inputs, assigned, split, seed, names)
        keep = ~((click == 0) & (buy == 1)) if drop_purchase_without_click else np.ones(len(rows), bool)
        rows = [r for r, k in zip(rows, keep) if k]
        click, buy, codes = click[keep], buy[keep], codes[keep]
        train = [r for r, c in zip(rows, codes) if c == names.index("train")]
        table, vocab, multi_rows = _encode_paddle(rows, click, buy, train, min_count, multi_fields)
        splits_meta, stats = write_table_splits(
            out, table, codes, names, shards, row_group_size, ALICCP_LABELS
        )
        vocab.save(out)
        paths = list(inputs) + [p for _, p in assigned]
        unused: Counter[str] = Counter()
        count_unused_fields(rows, unused)
        stats.update(
            dropped_purchase_without_click=int((~keep).sum()),
            multi_value_rows_last_kept=dict(multi_rows),
            unused_field_tokens=dict(sorted(unused.items())),
        )
        schema = aliccp_schema(
            {f: vocab.num_embeddings(f) for f in ALICCP_FIELDS},
            multi_fields,
            splits_meta,
            stats=stats,
            sources=file_sources(paths),
            vocab_file="vocab.json",
            split_spec={"fractions": split, "seed": seed, "assigned": [[s, str(p)] for s, p in assigned]},
            notes=f"Ali-CCP from PaddleRec field:id text; ids re-encoded per field on the train split "
            f"(min_count {min_count}), 0 = missing/rare/unseen; list fields {list(multi_fields)}; a "
            "single-valued field with several values in a row keeps the last one (AITM). T3 label: "
            "column 301 (its ids) binarised by the task config. Tokens: a field must be an Ali-CCP "
            "field code (digits, optionally _digits) and an id a non-negative integer, else the "
            "conversion fails naming file, line, field and value; tokens of other field codes are "
            "ignored and counted in stats.unused_field_tokens.",
        )
        write_schema(out, schema)
        return schema

# --------------------------------------------------------------------------------------------
# AITM / torch-rechub CSV
# --------------------------------------------------------------------------------------------


def read_aliccp_csv(path: str | os.PathLike[str]) -> pa.Table:
    """Read one Ali-CCP CSV and check its columns and types.

    Raises:
        DataError: an unknown column, a missing label, a non-integer sparse or label value,
            naming file and column.
    """
    try:
        table = pacsv.read_csv(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: cannot read as CSV: {str(e).splitlines()[0] if str(e) else e!r}") from e
    seen: set[str] = set()
    for name in table.column_names:
        if name in seen:
            raise DataError(f"{path}: header names column {name!r} twice")
        seen.add(name)
    if table.num_rows == 0:
        raise DataError(f"{path}: no data rows (only the header {','.join(table.column_names)})")
    for lab in ALICCP_LABELS:
        if lab not in table.column_names:
            raise DataError(f"{path}: label column {lab!r} missing (header {table.column_names})")
    cols: dict[str, pa.Array] = {}
    for name in table.column_names:
        col = table.column(name)
        if name in ALICCP_LABELS or name in ALICCP_FIELDS:
            if not pa.types.is_integer(col.type) or col.null_count:
                raise DataError(f"{path}: column {name!r} must hold integers without gaps, got {col.type}")
            if pc.min(col).as_py() < 0:
                raise DataError(f"{path}: column {name!r} has a negative id {pc.min(col).as_py()}")
            cols[name] = pc.cast(col, pa.int8() if name in ALICCP_LABELS else pa.int64())
        elif name.startswith("D") and name[1:] in ALICCP_FIELDS:
            if not (pa.types.is_floating(col.type) or pa.types.is_integer(col.type)) or col.null_count:
                raise DataError(f"{path}: dense column {name!r} must hold numbers, got {col.type}")
            cols[name] = pc.cast(col, pa.float32())
        else:
            raise DataError(
                f"{path}: unknown column {name!r} (expected click, purchase, Ali-CCP field "
                f"codes and D<field> dense columns)"
            )
    for lab in ALICCP_LABELS:
        bad = pc.max(cols[lab]).as_py()
        if bad is not None and bad > 1:
            raise DataError(f"{path}: label column {lab!r} holds {bad}, expected 0/1")
    return pa.table(cols)


def _csv_features(table: pa.Table) -> list[dict[str, Any]]:
    """Dense ``D*`` columns first, then the sparse fields (table size = largest id + 1)."""
    dense = [{"name": c, "column": c, "kind": "dense"} for c in table.column_names if c.startswith("D")]
    sparse = [
        {
            "name": c,
            "column": c,
            "kind": "sparse",
            "num_embeddings": int(pc.max(table.column(c)).as_py()) + 1,
            "multivalent": False,
        }
        for c in table.column_names
        if c in ALICCP_FIELDS
    ]
    return dense + sparse


def convert_aliccp_csv(
    inputs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    split: dict[str, float],
    seed: int,
    shards: int = 1,
    assigned: Sequence[tuple[str, str | os.PathLike[str]]] = (),
    drop_purchase_without_click: bool = False,
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Convert AITM / torch-rechub CSV files (ids kept as given).

    Args:
        inputs: files pooled and split by ``split`` (all with the same header).
        out_dir: output shard folder.
        split: split name -> fraction.
        seed: split seed.
        shards: files per split.
        assigned: (split, file) pairs whose rows all go to that split.
        drop_purchase_without_click: drop rows with click 0 and purchase 1.
        row_group_size: rows per row group.
        overwrite: replace existing shards.

    Returns:
        The schema written.
    """
    with staged_out_dir(out_dir, overwrite) as out:
        names = list(split) + [s for s, _ in assigned if s not in split]
        pooled = [read_aliccp_csv(p) for p in inputs]
        fixed = [(names.index(s), read_aliccp_csv(p)) for s, p in assigned]
        tables = pooled + [t for _, t in fixed]
        if not tables:
            raise DataError("aliccp-csv: no input files")
        for p, t in zip(list(inputs) + [p for _, p in assigned], tables):
            if t.column_names != tables[0].column_names:
                raise DataError(
                    f"{p}: header {t.column_names} differs from the first file's {tables[0].column_names}"
                )
        n_pool = sum(t.num_rows for t in pooled)
        codes = np.concatenate(
            [assign_splits(n_pool, split, seed)] + [np.full(t.num_rows, i, np.int8) for i, t in fixed]
        )
        table = pa.concat_tables(tables)
        keep = np.ones(table.num_rows, dtype=bool)
        if drop_purchase_without_click:
            keep = ~((table.column("click").to_numpy() == 0) & (table.column("purchase").to_numpy() == 1))
            table, codes = table.filter(pa.array(keep)), codes[keep]
        splits_meta, stats = write_table_splits(
            out, table, codes, names, shards, row_group_size, ALICCP_LABELS
        )
        schema = {
            "dataset": "aliccp",
            "version": SCHEMA_VERSION,
            "features": _csv_features(table),
            "labels": {"click": {"values": [0, 1]}, "purchase": {"values": [0, 1]}},
            "splits": splits_meta,
            "stats": {**stats, "dropped_purchase_without_click": int((~keep).sum())},
            "sources": file_sources(list(inputs) + [p for _, p in assigned]),
            "split_spec": {"fractions": split, "seed": seed, "assigned": [[s, str(p)] for s, p in assigned]},
            "notes": "Ali-CCP from AITM/torch-rechub CSV: sparse ids kept as given by the source's "
            "preprocessing (table size = largest id + 1 over all inputs); *_14 columns are single ids "
            "there; D* columns are dense as given.",
        }
        if "301" in table.column_names:
            schema["labels"]["301"] = {"values": list(range(int(pc.max(table.column("301")).as_py()) + 1))}
        write_schema(out, schema)
        return schema
