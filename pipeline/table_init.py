"""Plan-independent table initialisation: every table N(0, std^2), the same on any plan and world size.

DMP initialises each local shard with the table's ``init_fn`` on the process's global RNG, so the
values depend on the plan and the world size. After sharding,
:func:`mptrec.pipeline.sharding.shard_model` calls :func:`init_embedding_tables`, which
overwrites every table with N(0, 1) values (spec Eq. 1: PyTorch's default embedding
initialisation; times ``train.embedding_init_std``) drawn from per-(table, row block)
generators seeded from ``train.seed``: any shard of a table gets the values the whole table
would have.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor

from mptrec.data_loaders.schema import FeatureSpec
from mptrec.pipeline.build import TABLE_KEY, table_name

__all__ = ["init_embedding_tables", "table_init_values"]

_INIT_BLOCK_ROWS = 4096


def _block_seed(seed: int, table: str, block: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{table}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def table_init_values(seed: int, table: str, rows: tuple[int, int], cols: tuple[int, int],
                      embedding_dim: int) -> torch.Tensor:
    """N(0, 1) values of ``table[rows[0]:rows[1], cols[0]:cols[1]]``, independent of the plan.

    Rows are drawn in blocks of 4096 from generators seeded by (seed, table, block), so any
    shard of the table gets the values the whole table would have.
    """
    r0, r1 = rows
    c0, c1 = cols
    out = torch.empty(r1 - r0, c1 - c0)
    first, last = r0 // _INIT_BLOCK_ROWS, (max(r1, r0 + 1) - 1) // _INIT_BLOCK_ROWS
    for block in range(first, last + 1):
        b0 = block * _INIT_BLOCK_ROWS
        g = torch.Generator().manual_seed(_block_seed(seed, table, block))
        values = torch.randn(_INIT_BLOCK_ROWS, embedding_dim, generator=g)
        lo, hi = max(r0, b0), min(r1, b0 + _INIT_BLOCK_ROWS)
        if hi > lo:
            out[lo - r0:hi - r0] = values[lo - b0:hi - b0, c0:c1]
    return out


def _local_pieces(value: Any) -> Iterable[tuple[torch.Tensor, tuple[int, int], tuple[int, int]]]:
    if isinstance(value, ShardedTensor):
        for shard in value.local_shards():
            (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
            yield shard.tensor, (r0, r0 + nr), (c0, c0 + nc)
    elif isinstance(value, torch.Tensor) and value.dim() == 2:
        yield value, (0, value.shape[0]), (0, value.shape[1])
    else:
        raise ValueError(f"unexpected embedding table state of type {type(value).__name__}")


def init_embedding_tables(module: nn.Module, features: Sequence[FeatureSpec], seed: int,
                          std: float = 1.0) -> None:
    """Overwrite every ``t_<feature>`` table with plan-independent N(0, std^2) values.

    Works on a DMP (sharded tables: each rank fills its local shards) or a plain module.
    """
    dims = {table_name(f.name): f.embedding_dim for f in features if f.kind == "sparse"}
    state = module.state_dict()
    touched = {}
    with torch.no_grad():
        for key, value in state.items():
            m = TABLE_KEY.search(key)
            if not m or m.group(1) not in dims:
                continue
            table = m.group(1)
            for tensor, rows, cols in _local_pieces(value):
                values = std * table_init_values(seed, table, rows, cols, dims[table])
                tensor.copy_(values.to(tensor.device, tensor.dtype))
            touched[key] = value
    missing = sorted(set(dims) - {TABLE_KEY.search(k).group(1) for k in touched})  # type: ignore[union-attr]
    if missing:
        raise ValueError(f"tables {missing} were not found in the model's state dict")
    # through the module's load hooks, so kernels that cache rows see the new values
    module.load_state_dict(touched, strict=False)
