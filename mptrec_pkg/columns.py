"""Shard column kinds and the Arrow types that hold them: one rule for the loader and for serving.

A model input column is ``dense`` (floating point), ``int`` (one integer id a row) or ``multi``
(a list of integer ids a row). The training loader (:mod:`mptrec.data_loaders.dataset`) and the
serving path (:mod:`mptrec.pipeline.serve.shard_inputs`) check a shard's column types with
:func:`column_type_fits`. Imports only pyarrow, so the serving path may use it.

Example:
    >>> import pyarrow as pa
    >>> column_type_fits(pa.list_(pa.int64()), "multi"), column_type_fits(pa.float32(), "int")
    (True, False)
"""

from __future__ import annotations

import pyarrow as pa

__all__ = ["column_type_fits"]


def column_type_fits(t: pa.DataType, kind: str) -> bool:
    """Whether Arrow type ``t`` holds a column of ``kind`` (``dense``, ``int`` or ``multi``)."""
    if kind == "multi":
        return (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_integer(t.value_type)
    if kind == "dense":
        return bool(pa.types.is_floating(t))
    return bool(pa.types.is_integer(t))
