"""mptrec.data_loaders: converters, the synthetic generator, the shard layout and the loader.

Public API (imported lazily, so ``import mptrec.data_loaders.schema`` stays light):

* layout: :func:`read_schema`, :func:`resolve_features`, :func:`parse_split_spec`
* loading: :class:`ShardDataset`, :func:`make_dataloader`, :func:`table_to_batch`, :class:`Batch`
* declarations: :class:`FeatureSpec`, :class:`LabelSpec`, :class:`DataError`
* writing: :func:`convert_census`, :func:`convert_aliccp_csv`, :func:`convert_aliccp_paddle`,
  :func:`convert_aliccp_raw`, :func:`generate_aliccp`
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Batch": "batch",
    "DataError": "schema",
    "FeatureSpec": "schema",
    "LabelSpec": "schema",
    "read_schema": "layout",
    "resolve_features": "layout",
    "parse_split_spec": "layout",
    "ShardDataset": "dataset",
    "ShardDataLoader": "dataset",
    "make_dataloader": "dataset",
    "table_to_batch": "to_batch",
    "convert_census": "census",
    "convert_aliccp_csv": "aliccp",
    "convert_aliccp_paddle": "aliccp",
    "convert_aliccp_raw": "aliccp_raw",
    "generate_aliccp": "synth",
}
__all__ = [
    "Batch",
    "DataError",
    "FeatureSpec",
    "LabelSpec",
    "ShardDataLoader",
    "ShardDataset",
    "convert_aliccp_csv",
    "convert_aliccp_paddle",
    "convert_aliccp_raw",
    "convert_census",
    "generate_aliccp",
    "make_dataloader",
    "parse_split_spec",
    "read_schema",
    "resolve_features",
    "table_to_batch",
]

if TYPE_CHECKING:
    from mptrec.data_loaders.aliccp import convert_aliccp_csv, convert_aliccp_paddle
    from mptrec.data_loaders.aliccp_raw import convert_aliccp_raw
    from mptrec.data_loaders.batch import Batch
    from mptrec.data_loaders.census import convert_census
    from mptrec.data_loaders.dataset import ShardDataLoader, ShardDataset, make_dataloader
    from mptrec.data_loaders.layout import parse_split_spec, read_schema, resolve_features
    from mptrec.data_loaders.schema import DataError, FeatureSpec, LabelSpec
    from mptrec.data_loaders.synth import generate_aliccp
    from mptrec.data_loaders.to_batch import table_to_batch


def __getattr__(name: str) -> Any:
    """Import the public names on first use."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mptrec.data_loaders' has no attribute {name!r}")
    return getattr(importlib.import_module(f"mptrec.data_loaders.{module}"), name)
