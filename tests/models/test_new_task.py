"""Stage 2: the backbone is really frozen; old tasks are bit-identical; only the new head trains."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F
import torchrec.fx

from mptrec.models import MultiTaskModel, NewTaskModel, count_parameters
from tests.models.tiny import DENSE_DIM, DIM, MODEL_CASES, TASKS, state_bytes, tiny_batch, tiny_model

torch.set_num_threads(1)

STAGE2 = [
    ("mptrec", "mptrec"), ("mptrec", "fw"), ("mptrec", "tes"), ("mptrec_share", "mptrec"),
    ("mptrec_specific", "mptrec"), ("mptrec_no_gan", "tes"), ("single_task", "single_task"),
    ("shared_bottom", "shared_bottom*"), ("mmoe", "mmoe*"), ("ple", "ple*"), ("ple_wide", "ple*"),
]
D_IN = DENSE_DIM + 3 * DIM


def _mlp(sizes: Sequence[int]) -> int:
    return sum(a * b + b for a, b in zip(sizes, sizes[1:]))


def _expected_trainable(model: MultiTaskModel, method: str) -> int:
    cfg = model.cfg
    tower = _mlp((model.hidden_dim, *cfg.tower_hidden, 1))
    h = model.hidden_dim
    if method == "mptrec":
        return h + D_IN * (h // 2) + (h // 2) * h + 2 * h + 2 * D_IN + tower
    if method in ("fw", "tes"):
        return h + 2 * D_IN + tower
    if method == "shared_bottom*":
        return tower
    if method == "mmoe*":
        return D_IN * cfg.num_experts + tower
    if method == "single_task":
        return _mlp((D_IN, *cfg.expert_hidden)) + tower
    p, s, total = cfg.ple_specific_experts, cfg.ple_shared_experts, tower  # ple*
    for level in range(cfg.ple_levels):
        in_dim = D_IN if level == 0 else h
        total += p * _mlp((in_dim, *cfg.ple_expert_hidden)) + in_dim * (p + s) + (p + s)
    return total


@pytest.mark.parametrize(("case", "method"), STAGE2, ids=[f"{c}-{m}" for c, m in STAGE2])
def test_stage2_trains_only_the_head(case: str, method: str) -> None:
    drop = {"expert_dropout": (0.5, 0.5)} if MODEL_CASES[case][0] != "ple" else {}
    backbone = tiny_model(case, **drop)
    dense, kjt, labels = tiny_batch(32, tasks=[*TASKS, "t3"])
    before = state_bytes(backbone)
    with torch.no_grad():
        old_ref = backbone.eval()(dense, kjt)
    head = backbone.new_task_head("t3", method)
    model = NewTaskModel(backbone, {"t3": head}).train()
    assert not backbone.training and head.training
    assert all(not p.requires_grad for p in backbone.parameters())
    trainable, total = count_parameters(model)
    assert trainable == count_parameters(head)[0] == _expected_trainable(backbone, method)
    assert total == trainable + count_parameters(backbone)[1]
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in head.parameters()}

    head_before = state_bytes(head)
    opt = torch.optim.Adam(model.trainable_parameters(), lr=0.02)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        out = model(dense, kjt)
        loss = F.binary_cross_entropy_with_logits(out["t3"], labels["t3"]) + 1e-3 * model.l2_penalty()
        loss.backward()
        assert all(p.grad is None for p in backbone.parameters())
        assert all(p.grad is not None for p in head.parameters())
        assert all(not out[t].requires_grad for t in TASKS)
        opt.step()
        losses.append(loss.item())
        assert all(torch.equal(out[t], old_ref[t]) for t in TASKS)  # old tasks bit-identical
    after = state_bytes(backbone)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert any(not torch.equal(v, head_before[k]) for k, v in state_bytes(head).items())
    assert losses[-1] < losses[0]
    with torch.no_grad():
        final = model(dense, kjt)
    assert list(final) == [*TASKS, "t3"] and all(torch.equal(final[t], old_ref[t]) for t in TASKS)


def test_prompt_tuned_model_traces_and_takes_several_heads() -> None:
    backbone = tiny_model("mptrec")
    heads = {"t3": backbone.new_task_head("t3", "mptrec"), "t4": backbone.new_task_head("t4", "fw")}
    model = NewTaskModel(backbone, heads).eval()
    assert model.task_names == [*TASKS, "t3", "t4"] and model.new_task_names == ["t3", "t4"]
    gm = torchrec.fx.symbolic_trace(model)
    dense, kjt, _ = tiny_batch(5)
    ref, got = model(dense, kjt), gm(dense, kjt)
    assert all(torch.equal(ref[t], got[t]) for t in model.task_names)
    torch.testing.assert_close(model.l2_penalty(), heads["t3"].l2_penalty() + heads["t4"].l2_penalty())


def test_prompt_tuned_model_errors() -> None:
    backbone = tiny_model("mmoe")
    head = backbone.new_task_head("t3", "mmoe*")
    with pytest.raises(ValueError, match="at least one"):
        NewTaskModel(backbone, {})
    with pytest.raises(ValueError, match="another task's name"):
        NewTaskModel(backbone, {"t4": head})
    with pytest.raises(ValueError, match=r"\['ctr'\] are already tasks"):
        NewTaskModel(backbone, {"ctr": head})
    with pytest.raises(ValueError, match=r"'mptrec' does not apply to model MMoE; use one of \['mmoe\*'\]"):
        backbone.new_task_head("t3", "mptrec")
