"""Stage 2's early stopping: patience counts consecutive epochs without a better validation AUC."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from mptrec.pipeline.config import NewTaskSpec
from mptrec.pipeline.tasks import tuning_loop


def _run(monkeypatch: pytest.MonkeyPatch, aucs: list[float], patience: int) -> tuning_loop.StageResult:
    """``train_head`` with its data, training and validation replaced: the validation AUC of
    epoch i is ``aucs[i]`` and each epoch leaves the head's weight at the epoch number."""
    head = nn.Linear(1, 1, bias=False)
    epochs = iter(range(1, len(aucs) + 1))

    def train_epoch(s: Any, source: Any, res: Any, bar: Any) -> float:
        with torch.no_grad():
            head.weight.fill_(float(next(epochs)))
        return 0.0

    scripted = iter(aucs)
    monkeypatch.setattr(tuning_loop, "_dataset", lambda s, split, shuffle: object())
    monkeypatch.setattr(tuning_loop, "_cache_fits", lambda s, train, valid: False)
    monkeypatch.setattr(tuning_loop, "_streamed", lambda s, batches: iter(()))
    monkeypatch.setattr(tuning_loop, "_loader", lambda ds, epoch, workers: [])
    monkeypatch.setattr(tuning_loop, "_train_epoch", train_epoch)
    monkeypatch.setattr(tuning_loop, "_validate", lambda s, valid, cache, workers: next(scripted))
    cfg = NewTaskSpec(name="t3", label="c", epochs=len(aucs), patience=patience)
    run_cfg = SimpleNamespace(data=SimpleNamespace(train_split="train", valid_split="valid"))
    s = SimpleNamespace(sharded=SimpleNamespace(run_cfg=run_cfg), cfg=cfg, head=head, rank=0)
    return tuning_loop.train_head(s, progress=False)  # type: ignore[arg-type]


def test_patience_counts_consecutive_epochs_without_improvement(monkeypatch: pytest.MonkeyPatch) -> None:
    # best at 2; 3-5 worse (3 in a row < patience 4); a new best at 6 restarts the count; 7-10 worse
    aucs = [0.70, 0.75, 0.74, 0.73, 0.74, 0.76, 0.75, 0.75, 0.74, 0.70, 0.80, 0.81]
    res = _run(monkeypatch, aucs, patience=4)
    assert [r["epoch"] for r in res.valid] == list(range(1, 11))  # stopped after epoch 6 + 4
    assert res.best_epoch == 6 and res.best_auc == pytest.approx(0.76)
    assert float(res.best_state["weight"]) == 6.0  # the best epoch's head is kept


def test_patience_zero_never_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    res = _run(monkeypatch, [0.8, 0.7, 0.7, 0.7, 0.7, 0.7], patience=0)
    assert len(res.valid) == 6 and res.best_epoch == 1
