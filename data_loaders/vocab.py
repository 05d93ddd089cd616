"""Categorical value -> id maps, fitted on the training split only and saved with the shards.

Id 0 is reserved for "missing, rare or unseen"; the values kept get ids 1..V-1 in sorted order
(numerically when every value is an integer string), so a vocabulary is a plain, reproducible
function of the training counts.

Example:
    >>> from collections import Counter
    >>> v = Vocabulary.fit({"color": Counter({"red": 5, "blue": 1})}, min_count=2)
    >>> v.num_embeddings("color"), v.encode("color", "red"), v.encode("color", "blue")
    (2, 1, 0)
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mptrec.data_loaders.schema import DataError
from mptrec.io import atomic_write_json

VOCAB_FILE = "vocab.json"


def _sort_key(values: Iterable[str]) -> list[str]:
    vals = list(values)
    if all(v.lstrip("-").isdigit() for v in vals):
        return sorted(vals, key=int)
    return sorted(vals)


class Vocabulary:
    """Per-field value -> id maps (0 = missing / rare / unseen).

    Args:
        fields: field name -> values in id order (the value at position i has id i + 1).
    """

    def __init__(self, fields: Mapping[str, list[str]]) -> None:
        self.values: dict[str, list[str]] = {k: list(v) for k, v in fields.items()}
        self.ids: dict[str, dict[str, int]] = {
            k: {val: i + 1 for i, val in enumerate(v)} for k, v in self.values.items()
        }

    @classmethod
    def fit(
        cls, counts: Mapping[str, Counter[str]], min_count: int = 1, exclude: Iterable[str] = ()
    ) -> Vocabulary:
        """Keep the values seen at least ``min_count`` times (``exclude``: values never kept).

        Args:
            counts: field -> value counts on the training split.
            min_count: minimum count to get an id.
            exclude: values that always map to 0 (e.g. the missing token ``?``).

        Returns:
            The vocabulary.
        """
        if min_count < 1:
            raise DataError(f"min_count must be >= 1, got {min_count}")
        skip = set(exclude)
        return cls(
            {
                f: _sort_key(v for v, c in cnt.items() if c >= min_count and v not in skip)
                for f, cnt in counts.items()
            }
        )

    def num_embeddings(self, field: str) -> int:
        """Table size of ``field``: kept values + 1 (id 0)."""
        return len(self.values[field]) + 1

    def encode(self, field: str, value: str) -> int:
        """Id of ``value`` in ``field`` (0 when not in the vocabulary)."""
        return self.ids[field].get(value, 0)

    def to_json(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"id0": "missing, rare or unseen", "fields": self.values}

    def save(self, out_dir: str | os.PathLike[str], extra: Mapping[str, Any] | None = None) -> Path:
        """Write ``DIR/vocab.json`` atomically (``extra`` keys are stored beside ``fields``)."""
        return atomic_write_json(Path(out_dir) / VOCAB_FILE, {**self.to_json(), **(extra or {})}, indent=None)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Vocabulary:
        """Read a saved ``vocab.json``."""
        try:
            data = json.loads(Path(path).read_text())
            return cls(data["fields"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{path}: not a vocabulary file: {e}") from e
