"""The prompt-tuning job's feature cache: batches in the collected order or a permutation."""

from __future__ import annotations

import torch

from mptrec.pipeline.tasks.tuning_loop import FeatureCache


def test_batches_follow_the_order_and_cover_every_row_once() -> None:
    n = 23
    rows = {"e": torch.arange(n * 3, dtype=torch.float32).view(n, 3),
            "h_specific": torch.arange(n * 4, dtype=torch.float32).view(n, 2, 2)}
    cache = FeatureCache(rows, {"prompts": torch.ones(2, 2)}, torch.arange(n, dtype=torch.float32))
    assert cache.num_rows == n and cache.num_batches(5) == 5
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    seen = []
    for i, (feats, labels) in enumerate(cache.batches(5, order)):
        sel = order[5 * i:5 * i + 5]
        assert torch.equal(labels, sel.float())  # label j belongs to row j
        assert torch.equal(feats["e"], rows["e"][sel])
        assert torch.equal(feats["h_specific"], rows["h_specific"][sel])
        assert torch.equal(feats["prompts"], torch.ones(2, 2))
        seen += labels.long().tolist()
    assert sorted(seen) == list(range(n)) and len(feats["e"]) == 3  # the last batch is partial
    in_order = [labels.long().tolist() for _, labels in cache.batches(10)]
    assert in_order == [list(range(10)), list(range(10, 20)), [20, 21, 22]]
