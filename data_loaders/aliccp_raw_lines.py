r"""Line parsing of the raw Tianchi Ali-CCP files (converted by :mod:`mptrec.data_loaders.aliccp_raw`).

Format: a skeleton line is ``sample_id,click,buy,common_key,feature_num,feature_list`` and a
common-features line is ``common_key,feature_num,feature_list``; a feature list is
``field\\x02feature_id\\x03value`` tokens joined by ``\\x01``. The ``value`` part is dropped (as
AITM does). Malformed lines raise :class:`DataError` naming the file and line, or are skipped
and counted against a shared budget (``--max-bad-lines``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from mptrec.data_loaders.aliccp_tokens import TokenRow, token_problem
from mptrec.data_loaders.schema import DataError


def count_lines(path: Path) -> int:
    """Number of lines (a last line without a newline counts)."""
    n, last = 0, b"\n"
    with open(path, "rb") as fh:
        while block := fh.read(1 << 24):
            n += block.count(b"\n")
            last = block[-1:]
    return n + (last != b"\n")


def parse_features(text: str, expected: int) -> TokenRow:
    r"""Parse ``field\x02id\x03value`` tokens joined by ``\x01`` into ``field -> [ids]``.

    Raises:
        ValueError: the list does not hold ``expected`` well-formed tokens.
    """
    items = text.replace("\x02", "\x01").replace("\x03", "\x01").split("\x01")
    if len(items) != 3 * expected or "" in items[0::3] or "" in items[1::3]:
        toks = text.split("\x01")
        if len(toks) != expected:
            raise ValueError(f"feature_num says {expected} features, the list has {len(toks)}")
        bad = next(
            t
            for t in toks
            if t.count("\x02") != 1 or t.count("\x03") != 1 or t.startswith("\x02") or "\x02\x03" in t
        )
        raise ValueError(f"token {bad!r} is not field\\x02id\\x03value")
    fields, ids = items[0::3], items[1::3]
    joined_ids = "".join(ids)
    if not (joined_ids.isascii() and joined_ids.isdigit()) or not _plain_fields(fields):
        problem = next(p for p in map(token_problem, fields, ids) if p)
        raise ValueError(problem)
    row: TokenRow = {}
    for field, fid in zip(fields, ids):
        lst = row.get(field)
        if lst is None:
            row[field] = [fid]
        else:
            lst.append(fid)
    return row


_FIELD_LIST = re.compile(r"[0-9]+(?:_[0-9]+)?(?:\x01[0-9]+(?:_[0-9]+)?)*")


def _plain_fields(fields: list[str]) -> bool:
    """All field codes are digits with an optional ``_digits`` suffix (fast path of token_problem)."""
    return _FIELD_LIST.fullmatch("\x01".join(fields)) is not None


class LineReader:
    """Iterate parsed lines of one file, turning format errors into DataError or counted skips."""

    def __init__(self, path: Path, num_fields: int, bad_budget: list[int]) -> None:
        self.path, self.num_fields, self.budget = path, num_fields, bad_budget

    def bad(self, lineno: int, why: str) -> None:
        """Raise a DataError for line ``lineno``, or (budget left) count it as skipped."""
        if self.budget[0] <= 0:
            raise DataError(f"{self.path}:{lineno}: {why}")
        self.budget[0] -= 1

    def __iter__(self) -> Iterator[tuple[int, list[str]]]:
        lineno = 0
        try:
            for lineno, parts in self._lines():
                yield lineno, parts
        except UnicodeDecodeError as e:
            bad = e.object[e.start:e.start + 1]
            raise DataError(f"{self.path}:{lineno + 1}: not UTF-8 text (byte {bad!r} in the block read "
                            "from here on)") from None
        except OSError as e:
            raise DataError(f"{self.path}: cannot read: {e}") from None

    def _lines(self) -> Iterator[tuple[int, list[str]]]:
        with open(self.path, encoding="utf-8", newline="") as fh:
            for lineno, line in enumerate(fh, 1):
                parts = line.rstrip("\r\n").split(",")
                if len(parts) != self.num_fields:
                    self.bad(lineno, f"{len(parts)} comma-separated fields, expected {self.num_fields}")
                    yield lineno, []
                    continue
                if self.num_fields == 6 and (parts[1] not in ("0", "1") or parts[2] not in ("0", "1")):
                    self.bad(lineno, f"click/buy {parts[1]!r}/{parts[2]!r} are not 0/1")
                    yield lineno, []
                    continue
                yield lineno, parts


def parse_line(reader: LineReader, lineno: int, parts: list[str]) -> TokenRow | None:
    """The feature list of a line split by :class:`LineReader`, or None (a bad line, counted)."""
    try:
        return parse_features(parts[-1], int(parts[-2]))
    except ValueError as e:
        reader.bad(lineno, str(e))
        return None
