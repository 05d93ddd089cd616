"""pipeline/train/em.py: the EM task-label store (initial labels, lookup, merge across ranks, state)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mptrec.data_loaders.batch import Batch
from mptrec.models import em_assign
from mptrec.pipeline.train.em import EMLabelStore, relabel
from tests.dist import run_multiprocess


def test_initial_labels_are_uniform_and_reproducible_from_their_own_seed() -> None:
    a = EMLabelStore(10_000, ["ctr", "cvr", "x"], seed=5)
    torch.manual_seed(123)  # the global RNG plays no part
    b = EMLabelStore(10_000, ["ctr", "cvr", "x"], seed=5)
    assert torch.equal(a.labels, b.labels) and a.labels.dtype == torch.int8
    sizes = a.cluster_sizes()
    assert sum(sizes) == 10_000 and min(sizes) > 3000
    assert not torch.equal(a.labels, EMLabelStore(10_000, ["ctr", "cvr", "x"], seed=6).labels)
    ids = torch.tensor([0, 9999, 5])
    assert torch.equal(a.lookup(ids), a.labels[ids].long())


def test_merge_replaces_only_the_scored_rows_and_state_round_trips() -> None:
    store = EMLabelStore(6, ["ctr", "cvr"], seed=0)
    before = store.labels.clone()
    store.merge(torch.tensor([1, 4]), torch.tensor([1, 0]))
    expect = before.clone()
    expect[1], expect[4] = 1, 0
    assert torch.equal(store.labels, expect)
    other = EMLabelStore(6, ["ctr", "cvr"], seed=99)
    other.load_state_dict(store.state_dict())
    assert torch.equal(other.labels, store.labels)
    with pytest.raises(ValueError, match="tasks"):
        EMLabelStore(6, ["a", "b"], seed=0).load_state_dict(store.state_dict())
    with pytest.raises(ValueError, match=r"sample_ids must be in \[0, 6\)"):
        store.merge(torch.tensor([6]), torch.tensor([0]))


def _batch(ids: list[int], click: list[float], buy: list[float]) -> Batch:
    n = len(ids)
    kjt = KeyedJaggedTensor.from_lengths_sync(["a"], torch.zeros(n, dtype=torch.long),
                                              torch.ones(n, dtype=torch.int32))
    return Batch(torch.zeros(n, 0), kjt, {"ctr": torch.tensor(click), "cvr": torch.tensor(buy)},
                 torch.tensor(ids))


def test_relabel_assigns_the_task_with_the_smallest_bce() -> None:
    store = EMLabelStore(4, ["ctr", "cvr"], seed=0)
    # logits: ctr predicts 1 strongly, cvr predicts 0 strongly
    def score(b: Batch) -> dict[str, torch.Tensor]:
        n = b.batch_size
        return {"ctr": torch.full((n,), 5.0), "cvr": torch.full((n,), -5.0)}

    batches = [(_batch([0, 1], [1, 0], [1, 0]), True), (_batch([2, 3], [1, 1], [1, 1]), True),
               (_batch([0, 1], [0, 0], [0, 0]), False)]  # a filler: scored, ignored
    sizes = relabel(store, batches, score, em_assign)
    # rows 0, 2, 3: ctr right, cvr wrong -> ctr; row 1: ctr wrong, cvr right -> cvr
    assert store.labels.tolist() == [0, 1, 0, 0] and sizes == [3, 1]


def _merge_on_ranks(rank: int, world_size: int) -> Any:
    store = EMLabelStore(8, ["ctr", "cvr"], seed=1)
    mine = torch.arange(rank, 8, world_size)  # each row scored by one rank
    store.merge(mine, (mine + 1) % 2)
    try:
        store.merge(torch.arange(8), torch.zeros(8, dtype=torch.long))  # every row by every rank
    except RuntimeError as e:
        return store.labels.tolist(), str(e)
    return store.labels.tolist(), "no error"


@pytest.mark.slow
def test_merge_across_ranks_gives_every_rank_the_same_labels() -> None:
    results = run_multiprocess(_merge_on_ranks, 2)
    assert results[0][0] == results[1][0] == [(i + 1) % 2 for i in range(8)]
    assert all("more than one rank" in error for _, error in results)
