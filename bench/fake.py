"""Random ``Batch`` es straight from feature specs (for smoke tests and micro-benchmarks)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mptrec.data_loaders.batch import Batch
from mptrec.data_loaders.schema import FeatureSpec


def random_batches(
    features: Sequence[FeatureSpec],
    tasks: Sequence[str],
    batch_size: int,
    n: int,
    seed: int = 0,
    positive_rate: float = 0.2,
) -> list[Batch]:
    """``n`` random batches: uniform ids, uniform dense values, Bernoulli labels."""
    g = torch.Generator().manual_seed(seed)
    sparse = [f for f in features if f.kind == "sparse"]
    dense_dim = sum(1 for f in features if f.kind == "dense")
    out = []
    for b in range(n):
        lengths = []
        values = []
        for f in sparse:
            ln = (
                torch.randint(1, 4, (batch_size,), generator=g)
                if f.multivalent
                else torch.ones(batch_size, dtype=torch.long)
            )
            lengths.append(ln)
            values.append(torch.randint(0, f.num_embeddings, (int(ln.sum()),), generator=g))
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=[f.name for f in sparse],
            values=torch.cat(values) if values else torch.zeros(0, dtype=torch.long),
            lengths=torch.cat(lengths).int() if lengths else torch.zeros(0, dtype=torch.int),
        )
        out.append(
            Batch(
                dense_features=torch.rand(batch_size, dense_dim, generator=g),
                sparse_features=kjt,
                labels={t: (torch.rand(batch_size, generator=g) < positive_rate).float() for t in tasks},
                sample_ids=torch.arange(b * batch_size, (b + 1) * batch_size),
            )
        )
    return out
