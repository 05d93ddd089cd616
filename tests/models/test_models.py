"""Every model (5 registered + MPT-Rec variants): shapes, input layer, backward, overfit, fx trace."""

from __future__ import annotations

import pytest
import torch
import torchrec.fx
from torch import nn

from mptrec.models import MultiTaskModel
from tests.models.tiny import DENSE_DIM, MODEL_CASES, SPARSE, TASKS, tiny_batch, tiny_model

torch.set_num_threads(1)
CASES = list(MODEL_CASES)


def _loss(model: MultiTaskModel, dense: torch.Tensor, kjt: object, labels: dict[str, torch.Tensor],
          assign: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    out = model.forward_train(dense, kjt)  # type: ignore[arg-type]
    return model.loss(out, labels, assign if model.uses_em else None)


@pytest.mark.parametrize("case", CASES)
def test_forward_shapes_and_features_round_trip(case: str) -> None:
    model = tiny_model(case).eval()
    dense, kjt, _ = tiny_batch(9)
    out = model(dense, kjt)
    assert list(out) == TASKS and all(v.shape == (9,) and v.dtype == torch.float32 for v in out.values())
    feats = model.features(dense, kjt)
    assert feats["e"].shape == (9, model.input_dim) == (9, DENSE_DIM + 3 * 4)
    again = model.logits_from_features(feats)
    assert all(torch.equal(out[t], again[t]) for t in TASKS)  # bit-identical
    train_out = model.forward_train(dense, kjt)
    assert all(torch.equal(out[t], train_out.logits[t]) for t in TASKS)  # eval: same numbers


@pytest.mark.parametrize("case", ["mptrec", "mmoe"])
def test_input_vector_follows_sparse_features_order_not_the_ebc_order(case: str) -> None:
    model = tiny_model(case, ebc_order=["c", "a", "b"])
    dense, kjt, _ = tiny_batch(5)
    e = model.embed(dense, kjt)
    pooled = model.ebc(kjt).to_dict()
    assert torch.equal(e, torch.cat([dense] + [pooled[f] for f in SPARSE], dim=1))
    # the KeyedTensor itself is in EBC order, so values() would differ
    assert not torch.equal(e[:, DENSE_DIM:], model.ebc(kjt).values())


@pytest.mark.parametrize("case", CASES)
def test_backward_reaches_every_parameter(case: str) -> None:
    model = tiny_model(case, r_dnn=1e-3).train()
    dense, kjt, labels = tiny_batch(16)
    loss, parts = _loss(model, dense, kjt, labels, torch.randint(0, 2, (16,)))
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert all(not v.requires_grad for v in parts.values())
    assert set(TASKS) | {"l2"} <= set(parts)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing  # no unused parameters (DDP-safe)


@pytest.mark.parametrize("case", CASES)
def test_overfits_fifty_samples(case: str) -> None:
    torch.manual_seed(0)
    model = tiny_model(case).train()
    dense, kjt, labels = tiny_batch(50, seed=1)
    assign = torch.randint(0, 2, (50,), generator=torch.Generator().manual_seed(2))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(800):  # dropout (ple_wide) slows memorising: 400 steps left 0.14 on seed 0
        opt.zero_grad()
        loss, parts = _loss(model, dense, kjt, labels, assign)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        out = model(dense, kjt)
    bce = {t: nn.functional.binary_cross_entropy_with_logits(out[t], labels[t]).item() for t in TASKS}
    assert all(v < 0.1 for v in bce.values()), bce  # random labels: ~0.69 at init


@pytest.mark.parametrize("case", CASES)
def test_forward_traces_with_torchrec_fx(case: str) -> None:
    model = tiny_model(case).eval()
    gm = torchrec.fx.symbolic_trace(model)
    dense, kjt, _ = tiny_batch(7, seed=3)
    ref, got = model(dense, kjt), gm(dense, kjt)
    assert list(got) == TASKS and all(torch.equal(ref[t], got[t]) for t in TASKS)


class _TrainStep(nn.Module):
    def __init__(self, model: MultiTaskModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, dense: torch.Tensor, kjt: object) -> torch.Tensor:
        out = self.model.forward_train(dense, kjt)  # type: ignore[arg-type]
        total = sum(out.logits.values()) + sum(out.aux_logits.values())
        if out.task_logits is not None:
            total = total + out.task_logits.sum(dim=1)
        return total  # type: ignore[return-value]


def test_forward_train_traces_with_the_grl_as_one_call() -> None:
    model = tiny_model("mptrec").eval()
    gm = torchrec.fx.symbolic_trace(_TrainStep(model))
    assert any(getattr(n.target, "__name__", "") == "grad_reverse" for n in gm.graph.nodes)
    dense, kjt, _ = tiny_batch(4)
    assert torch.equal(gm(dense, kjt), _TrainStep(model)(dense, kjt))


def test_dense_width_is_checked() -> None:
    model = tiny_model("mmoe")
    _, kjt, _ = tiny_batch(3)
    with pytest.raises(Exception, match="dense features have the wrong number of columns"):
        model(torch.zeros(3, DENSE_DIM + 1), kjt)
