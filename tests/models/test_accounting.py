"""count_parameters and forward_flops_per_sample (multiply-adds per sample, fvcore convention)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mptrec.models import NewTaskModel, count_parameters, forward_flops_per_sample
from mptrec.models.mptrec import MPTRecNewTaskHead
from tests.models.tiny import DENSE_DIM, DIM, TASKS, tiny_batch, tiny_model

torch.set_num_threads(1)


def test_count_parameters_trainable_and_total() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    assert count_parameters(model) == (23, 23)
    model[0].requires_grad_(False)
    assert count_parameters(model) == (8, 23)
    backbone = tiny_model("mptrec")
    total = count_parameters(backbone)[1]
    stage2 = NewTaskModel(backbone, {"t3": backbone.new_task_head("t3", "fw")})
    head_n = count_parameters(stage2.heads)[1]
    assert count_parameters(stage2) == (head_n, total + head_n)


def test_flops_of_a_linear_layer_are_its_multiply_adds() -> None:
    assert forward_flops_per_sample(nn.Linear(5, 3), torch.rand(7, 5)) == 15.0
    with pytest.raises(ValueError, match="batch-first"):
        forward_flops_per_sample(nn.Linear(5, 3), 3.0)


def test_census_new_task_head_flops() -> None:
    head = MPTRecNewTaskHead("t3", "mptrec", input_dim=123, hidden_dim=128, num_tasks=2,
                             tower_hidden=(64, 32), tau=150.0)
    b = 16
    feats = {"e": torch.rand(b, 123), "h_shared": torch.rand(b, 128), "h_specific": torch.rand(b, 2, 128),
             "prompts": torch.randn(2, 128)}
    # projection, z . p^k, gate, tower; Eq. 12's weighted sum over K (2 x 128 multiply-adds) is an
    # element-wise product summed (faster than B tiny bmm's), which fvcore's convention skips
    macs = (123 * 64 + 64 * 128) + 128 * 2 + 123 * 2 + (128 * 64 + 64 * 32 + 32)
    assert forward_flops_per_sample(head, feats) == macs == 26_838  # spec estimate: ~27K


def test_model_flops_count_every_dense_matmul_and_no_lookup() -> None:
    model = tiny_model("mptrec").eval()
    assert (model.cfg.expert_hidden, model.cfg.tower_hidden) == ((32, 16), (8,))
    d_in, k = DENSE_DIM + 3 * DIM, len(TASKS)
    experts = (k + 1) * (d_in * 32 + 32 * 16)
    macs = experts + d_in * 2 * k + k * (16 * 8 + 8)
    dense, kjt, _ = tiny_batch(10)
    assert forward_flops_per_sample(model, dense, kjt) == macs
