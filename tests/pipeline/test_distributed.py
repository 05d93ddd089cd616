"""The collective helpers of mptrec.pipeline.distributed: single-process answers and 2 gloo ranks."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from mptrec.pipeline import distributed as pdist
from tests.dist import run_multiprocess


def test_docstring_examples_run() -> None:
    import doctest

    result = doctest.testmod(pdist)
    assert result.attempted >= 6 and result.failed == 0


def test_without_process_group() -> None:
    cpu = torch.device("cpu")
    assert (pdist.get_rank(), pdist.get_world_size(), pdist.is_distributed()) == (0, 1, False)
    pdist.barrier()
    assert pdist.agree_min(3, cpu) == 3
    assert pdist.max_over_ranks(1.5, cpu) == 1.5
    assert list(pdist.lockstep_min(iter([1, 2, 3]), cpu)) == [1, 2, 3]
    assert list(pdist.lockstep_min([1, 2, 3], cpu, steps=0)) == []


def _worker(rank: int, world: int) -> dict[str, Any]:
    cpu = torch.device("cpu")
    pdist.barrier()
    return {
        "rank": pdist.get_rank(), "world": pdist.get_world_size(), "distributed": pdist.is_distributed(),
        "min": pdist.agree_min(10 + rank, cpu), "max": pdist.max_over_ranks(0.5 + rank, cpu),
        # rank 0 has 3 items, rank 1 has 5: both stop after 3; with steps=2 both stop after 2
        "lockstep_min": list(pdist.lockstep_min(range(3 + 2 * rank), cpu)),
        "lockstep_min_steps": list(pdist.lockstep_min(range(3 + 2 * rank), cpu, steps=2)),
    }


@pytest.mark.slow
def test_two_ranks_agree() -> None:
    out = run_multiprocess(_worker, 2)
    assert [o["rank"] for o in out] == [0, 1]
    for o in out:
        assert o["world"] == 2 and o["distributed"]
        assert o["min"] == 10 and o["max"] == 1.5
        assert o["lockstep_min"] == [0, 1, 2] and o["lockstep_min_steps"] == [0, 1]
