"""StackedMLP equals separate nn.Linear stacks; gradient reversal; alpha schedules."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mptrec.models.layers import MaskDropout, StackedMLP, grad_reverse, grl_alpha

torch.set_num_threads(1)


def _separate(mlp: StackedMLP, j: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (w, b) in enumerate(zip(mlp.weights, mlp.biases)):
        lin = nn.Linear(w.shape[1], w.shape[2])
        with torch.no_grad():
            lin.weight.copy_(w[j].t())
            lin.bias.copy_(b[j, 0])
        layers.append(lin)
        if i < len(mlp.weights) - 1 or mlp.last_activation:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


@pytest.mark.parametrize("last_activation", [True, False])
def test_stacked_mlp_equals_separate_linear_stacks(last_activation: bool) -> None:
    mlp = StackedMLP(3, 5, (7, 4), last_activation=last_activation)
    nets = [_separate(mlp, j) for j in range(3)]
    assert sum(p.numel() for p in mlp.parameters()) == sum(p.numel() for n in nets for p in n.parameters())
    x = torch.randn(6, 5)
    shared = mlp.forward_shared(x)
    per_net = mlp(torch.randn(3, 6, 5))
    assert shared.shape == per_net.shape == (3, 6, 4)
    xs = torch.randn(3, 6, 5)
    for j, net in enumerate(nets):
        torch.testing.assert_close(shared[j], net(x))
        torch.testing.assert_close(mlp(xs)[j], net(xs[j]))
    if last_activation:
        assert shared.min().item() >= 0


def test_stacked_mlp_init_bounds_like_nn_linear_and_l2() -> None:
    mlp = StackedMLP(2, 16, (9,), last_activation=True)
    bound = 1 / math.sqrt(16)
    assert mlp.weights[0].abs().max() <= bound and mlp.biases[0].abs().max() <= bound
    expected = 0.5 * mlp.weights[0].pow(2).sum()
    torch.testing.assert_close(mlp.weight_l2(), expected)  # biases excluded


def test_stacked_mlp_dropout_only_in_train_mode_and_validation() -> None:
    mlp = StackedMLP(2, 4, (64, 64), last_activation=True, dropout=(0.5, 0.5))
    x = torch.randn(8, 4)
    mlp.eval()
    torch.testing.assert_close(mlp.forward_shared(x), mlp.forward_shared(x))
    mlp.train()
    assert not torch.equal(mlp.forward_shared(x), mlp.forward_shared(x))
    with pytest.raises(ValueError, match="one entry per layer"):
        StackedMLP(2, 4, (8, 8), last_activation=True, dropout=(0.1,))
    with pytest.raises(ValueError, match="num_nets"):
        StackedMLP(0, 4, (8,), last_activation=True)


@pytest.mark.parametrize("bf16", [False, True])
def test_float_keep_masks_equal_the_bool_comparison_and_use_the_same_draws(bf16: bool) -> None:
    torch.manual_seed(0)
    mlp = StackedMLP(3, 16, (32, 8), last_activation=True, dropout=(0.1, 0.3))
    x = torch.randn(300, 16, requires_grad=True)
    got = []
    # the default masks (int16 bit patterns under bf16), float32 masks converted, bool comparison
    for bool_mask, float_mask in ((False, False), (False, True), (True, False)):
        for d in mlp.dropouts:
            d.bool_mask = bool_mask  # type: ignore[assignment]
            d.float_mask = float_mask  # type: ignore[assignment]
        mlp.zero_grad()
        x.grad = None
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = mlp.forward_shared(x)
        y.float().pow(2).sum().backward()
        got.append([y.detach(), x.grad, *(p.grad for p in mlp.parameters()), torch.rand(3)])
    for other in got[1:]:  # bit-identical, and the generator is left at the same state (last item)
        for a, b in zip(got[0], other):
            assert a is not None and b is not None and torch.equal(a, b)
    assert got[0][0].dtype == (torch.bfloat16 if bf16 else torch.float32)
    keep = mlp.dropouts[0].keep_scale(torch.empty(100_000))  # type: ignore[operator]
    assert keep.unique().tolist() == [0.0, pytest.approx(1 / 0.9)]
    assert abs(float((keep == 0).float().mean()) - 0.1) < 0.005


def test_grad_reverse_multiplies_gradient_by_minus_alpha() -> None:
    # hand-built: y = sum(w * GRL(x)); dL/dx = -alpha * w, dL/dw = x (unchanged)
    x = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    w = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    out = grad_reverse(x, 0.3)
    torch.testing.assert_close(out, x)
    (w * out).sum().backward()
    assert x.grad is not None and w.grad is not None
    torch.testing.assert_close(x.grad, -0.3 * w.detach())
    torch.testing.assert_close(w.grad, x.detach())


def test_dann_schedule_is_monotone_from_zero_to_almost_one() -> None:
    steps, epochs = 7, 4
    alphas = [grl_alpha("dann", s, e, steps, epochs, 256) for e in range(1, epochs + 1) for s in range(steps)]
    assert alphas[0] == 0.0
    assert all(b > a for a, b in zip(alphas, alphas[1:]))
    assert 0.99 < grl_alpha("dann", steps - 1, epochs, steps, epochs, 256) < 1.0
    p = (3 + 1 * steps) / (epochs * steps)
    assert grl_alpha("dann", 3, 2, steps, epochs, 256) == pytest.approx(2 / (1 + math.exp(-10 * p)) - 1)


def test_official_schedule_is_a_saw_tooth_when_epochs_have_more_steps_than_the_batch_size() -> None:
    batch, steps, epochs = 4, 10, 3
    a = {(e, s): grl_alpha("official", s, e, steps, epochs, batch) for e in range(1, epochs + 1)
         for s in range(steps)}
    # rises within an epoch, drops at the epoch boundary
    assert all(a[(1, s + 1)] > a[(1, s)] for s in range(steps - 1))
    assert a[(2, 0)] < a[(1, steps - 1)]
    p = (5 + 1 * batch) / (epochs * batch)
    assert a[(2, 5)] == pytest.approx(2 / (1 + math.exp(-10 * p)) - 1)


def test_constant_schedule_and_errors() -> None:
    assert grl_alpha("constant", 5, 3, 10, 4, 256, constant=0.25) == 0.25
    with pytest.raises(ValueError, match="unknown grl_schedule 'linear'"):
        grl_alpha("linear", 0, 1, 10, 4, 256)
    with pytest.raises(ValueError, match="1-based"):
        grl_alpha("dann", 0, 0, 10, 4, 256)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        grl_alpha("dann", 0, 1, 0, 4, 256)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 1e-6, 0.99999])
def test_sixteen_bit_keep_masks_are_the_converted_float32_masks(dtype: torch.dtype, p: float) -> None:
    drop = MaskDropout(p)
    x = torch.empty(50_000, dtype=dtype)
    torch.manual_seed(3)
    fast = drop.keep_scale(x)
    drop.float_mask = True
    torch.manual_seed(3)
    slow = drop.keep_scale(x)
    assert fast.dtype == slow.dtype == dtype
    assert torch.equal(fast.view(torch.int16), slow.view(torch.int16))
    if 0.01 < p < 0.9:  # the kept share and value
        assert abs(float((fast == 0).float().mean()) - p) < 0.01
        assert float(fast.max()) == float(torch.tensor(1 / (1 - p)).to(dtype))


def test_bf16_dropout_masks_compile() -> None:
    """torch.compile (the bench's "torch.compile dense arch") of a stack with dropout under bf16
    autocast: in-place ops on the random words' int16 view broke AOT functionalization."""
    torch.manual_seed(0)
    mlp = StackedMLP(3, 16, (32, 8), last_activation=True, dropout=(0.1, 0.3))
    step = torch.compile(lambda x: mlp.forward_shared(x).float().pow(2).sum())
    x = torch.randn(300, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        step(x).backward()
    assert x.grad is not None and bool(x.grad.abs().sum() > 0)
