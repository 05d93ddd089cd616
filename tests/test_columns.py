"""mptrec.columns: the one rule for a column kind's Arrow types (loader and serving)."""

from __future__ import annotations

import doctest

import pyarrow as pa
import pytest

from mptrec import columns


def test_doctest() -> None:
    result = doctest.testmod(columns)
    assert result.attempted > 0 and result.failed == 0, result


@pytest.mark.parametrize(
    ("t", "kind", "fits"),
    [(pa.float64(), "dense", True), (pa.int64(), "dense", False), (pa.int32(), "int", True),
     (pa.large_list(pa.int64()), "multi", True), (pa.list_(pa.float32()), "multi", False),
     (pa.int64(), "multi", False)],
)
def test_column_type_fits(t: pa.DataType, kind: str, fits: bool) -> None:
    assert columns.column_type_fits(t, kind) is fits
