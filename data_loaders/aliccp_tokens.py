"""Ali-CCP token rows (PaddleRec ``field:id`` text, raw Tianchi files): policy, counts, encoding.

A parsed row is ``field -> [raw ids]`` (:data:`TokenRow`). Used by
:mod:`mptrec.data_loaders.aliccp` (PaddleRec), :mod:`mptrec.data_loaders.aliccp_raw` and
:mod:`mptrec.data_loaders.aliccp_raw_lines`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from mptrec.data_loaders.schema import ALICCP_FIELDS
from mptrec.data_loaders.vocab import Vocabulary

TokenRow = dict[str, list[str]]


_FIELD_CODE = re.compile(r"^[0-9]+(_[0-9]+)?$")


def token_problem(field: str, fid: str) -> str:
    """Why a ``field``/``id`` pair of a token format is rejected ("" when it is fine).

    Policy (the token formats ``aliccp-paddle`` and ``aliccp-raw``): a field is an Ali-CCP
    field code, digits with an optional ``_digits`` suffix (``205``, ``109_14``); an id is a
    non-negative decimal integer (ASCII digits). Anything else (``itm:917``, ``205:abc``,
    ``205:-3``) is a malformed token, rejected naming file, line, field and value, never
    dropped or encoded silently. Field codes that are well formed but not among the converted
    fields (e.g. ``999``) are ignored and counted in schema.json ``stats.unused_field_tokens``.
    """
    if not _FIELD_CODE.match(field):
        return f"field {field!r} is not an Ali-CCP field code (digits, optionally _digits)"
    if not (fid.isascii() and fid.isdigit()):
        return f"field {field!r}: id {fid!r} is not a non-negative integer"
    return ""


def count_unused_fields(rows: Sequence[TokenRow], unused: Counter[str]) -> None:
    """Count the tokens of well-formed field codes that are not converted (not in ALICCP_FIELDS)."""
    known = set(ALICCP_FIELDS)
    for row in rows:
        for field, values in row.items():
            if field not in known:
                unused[field] += len(values)


def count_tokens(
    rows: Sequence[TokenRow], counts: dict[str, Counter[str]], multi_fields: Sequence[str]
) -> None:
    """Add the field values of ``rows`` to ``counts`` (single-valued fields: the kept, last value)."""
    for row in rows:
        for field, values in row.items():
            if field in counts:
                counts[field].update(values if field in multi_fields else values[-1:])


def encode_token_rows(
    rows: Sequence[TokenRow],
    vocab: Vocabulary,
    multi_fields: Sequence[str],
    multi_value_rows: Counter[str],
) -> tuple[dict[str, npt.NDArray[np.int64]], dict[str, tuple[npt.NDArray[np.int32], npt.NDArray[np.int64]]]]:
    """Encode rows of ``field -> [raw ids]`` into columns.

    Args:
        rows: parsed rows.
        vocab: fitted vocabulary (unknown values -> 0).
        multi_fields: fields kept as lists.
        multi_value_rows: counter of rows where a single-valued field had several values (last kept).

    Returns:
        ``(singles, multis)``: single field -> int64 ids (-1 where the row lacks the field);
        multi field -> (lengths int32, flat values int64).
    """
    n = len(rows)
    singles = {f: np.full(n, -1, dtype=np.int64) for f in ALICCP_FIELDS if f not in multi_fields}
    multi_vals: dict[str, list[int]] = {f: [] for f in multi_fields}
    multi_lens = {f: np.zeros(n, dtype=np.int32) for f in multi_fields}
    for i, row in enumerate(rows):
        for field, values in row.items():
            ids = vocab.ids.get(field)
            if ids is None:
                continue
            if field in multi_vals:
                multi_vals[field].extend([ids.get(v, 0) for v in values])
                multi_lens[field][i] = len(values)
            else:
                if len(values) > 1:
                    multi_value_rows[field] += 1
                singles[field][i] = ids.get(values[-1], 0)
    multis = {f: (multi_lens[f], np.asarray(multi_vals[f], dtype=np.int64)) for f in multi_fields}
    return singles, multis
