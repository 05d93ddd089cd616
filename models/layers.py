"""Tensor-to-tensor building blocks: batched MLPs, gradient reversal and its alpha schedules.

Nothing here knows about configs, tasks or TorchRec. Notation: B batch size, E number of
networks run together, D_in input width, H output width.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
from torch import nn

__all__ = ["GRL_SCHEDULES", "MaskDropout", "StackedMLP", "grad_reverse", "grl_alpha", "half_squared_norm"]


def half_squared_norm(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_p ||p||^2 / 2`` over ``params`` (a 0-dim tensor; 0 for none).

    Example:
        >>> float(half_squared_norm([torch.ones(2, 2), torch.full((3,), 2.0)]))
        8.0
    """
    if not params:
        return torch.zeros(())
    total = params[0].pow(2).sum()
    for p in params[1:]:
        total = total + p.pow(2).sum()
    return total / 2

GRL_SCHEDULES = ("dann", "official", "constant")


class MaskDropout(nn.Module):
    """Dropout whose keep-masks come from 16-bit slices of 64-bit random words.

    The distribution of ``nn.Dropout(p)`` with ``p`` rounded to a multiple of 1/65536: an element
    is kept when its 16 random bits (read as a signed int16) are >= ``p * 65536 - 32768``, and
    kept values are scaled by ``1 / (1 - p)``. One 64-bit draw of the CPU generator gives four
    masks, where ``nn.Dropout`` (``bernoulli_``) draws one random number per element: measured
    1.43x (1.27-1.51) on the whole stage-1 step at the paper's dims
    (``mptrec bench --quick --only dense``, 2026-12-02), where ``bernoulli_`` was 30% of the step.
    The masks use the default torch generator, so seeding and checkpointed RNG states still make
    runs reproducible.

    Args:
        p: drop probability in [0, 1).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> drop = MaskDropout(0.25)
        >>> y = drop(torch.ones(100_000))
        >>> round(float((y == 0).float().mean()), 2), float(y.max())
        (0.25, 1.3333333730697632)
        >>> bool(torch.equal(drop.eval()(torch.ones(3)), torch.ones(3)))
        True
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p: float = float(p)
        self.threshold: int = round(self.p * 65536) - 32768
        self.scale: float = 1.0 / (1.0 - self.p)
        #: build the keep-mask with a bool comparison (the masks before 2026-12-03; same values)
        self.bool_mask: bool = False
        #: build a 16-bit input's keep-mask in float32 and convert it (until 2026-12-03; same values)
        self.float_mask: bool = False
        #: bf16 / fp16 bit pattern of ``scale`` (rounded as ``.to(dtype)`` rounds it)
        self._patterns: dict[torch.dtype, int] = {
            dt: int(torch.tensor(self.scale, dtype=torch.float32).to(dt).view(torch.int16))
            for dt in (torch.bfloat16, torch.float16)
        }

    def keep_scale(self, x: torch.Tensor) -> torch.Tensor:
        """The multiplier for ``x``: ``scale`` where kept, else 0, in ``x``'s dtype (no gradient).

        Kept means ``bits >= threshold`` for the element's 16 random bits. The comparison is
        computed as ``clamp(bits - (threshold - 1), 0, 1)`` in float32, exact for 16-bit
        integers and the same values: on this CPU the ops with a bool output (``>=``, and its
        conversion) were the slow part of the mask. ``bool_mask`` keeps the comparison (the
        diagnostic "keep-masks by bool comparison" of ``mptrec bench --only dense``).

        For a bf16 / fp16 ``x`` (stage 1 under autocast) the mask is built in the random words'
        own int16 storage: ``clamp(bits, threshold - 1, threshold) - (threshold - 1)`` is the keep bit
        (no overflow), times the bit pattern of ``scale`` in ``x``'s dtype, read as that dtype
        (``view``: no conversion pass). The same values as converting the float32 mask, which
        ``float_mask`` keeps (the diagnostic "keep-masks built in float32 and converted").
        """
        n = x.numel()
        words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None)
        bits = words.view(torch.int16)[:n].view(x.shape)
        if self.bool_mask:
            return (bits >= self.threshold).to(x.dtype).mul_(self.scale)
        pattern = self._patterns.get(x.dtype)
        t = self.threshold
        if pattern is not None and not self.float_mask and -32767 <= t <= 32767:  # t - 1 and t in int16
            # out of place first: in-place ops on the int64 words' int16 view break torch.compile
            return bits.clamp(t - 1, t).sub_(t - 1).mul_(pattern).view(x.dtype)
        keep = bits.to(torch.float32).sub_(self.threshold - 1).clamp_(0.0, 1.0).mul_(self.scale)
        return keep.to(x.dtype)  # no copy in float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Drop and rescale in training mode; identity in eval mode."""
        if not self.training or self.p == 0.0:
            return x
        return x * self.keep_scale(x)

    def extra_repr(self) -> str:
        """``p`` shown by ``print(module)``."""
        return f"p={self.p}"


class StackedMLP(nn.Module):
    """E independent MLPs of the same shape, run together as batched matrix products.

    The weights of layer ``i`` are one tensor of shape (E, in_i, out_i) and the biases one of
    shape (E, 1, out_i), so the parameter count is exactly that of E separate stacks of
    ``nn.Linear`` layers, initialised the same way (``U(-1/sqrt(in), 1/sqrt(in))`` for weights
    and biases). Every layer but the last is followed by ReLU; the last one too when
    ``last_activation`` (spec experts: "ReLU after every layer, including the last"). Dropout
    ``dropout[i]`` (:class:`MaskDropout`) follows layer ``i``'s activation.

    Args:
        num_nets: E, the number of independent networks.
        in_features: D_in, the input width.
        layer_sizes: output width of each layer; the last one is H.
        last_activation: apply ReLU after the last layer as well.
        dropout: one probability per layer, or empty for none.

    Shapes:
        ``forward_shared(x)``: x (B, D_in), the same input for every network -> (E, B, H).
        ``forward(x)``: x (E, B, D_in), one input per network -> (E, B, H).

    Example:
        >>> mlp = StackedMLP(3, 8, (16, 4), last_activation=True)
        >>> mlp.forward_shared(torch.randn(5, 8)).shape
        torch.Size([3, 5, 4])
        >>> mlp(torch.randn(3, 5, 8)).shape
        torch.Size([3, 5, 4])
        >>> sum(p.numel() for p in mlp.parameters()) == 3 * ((8 * 16 + 16) + (16 * 4 + 4))
        True
    """

    def __init__(
        self,
        num_nets: int,
        in_features: int,
        layer_sizes: Sequence[int],
        *,
        last_activation: bool,
        dropout: Sequence[float] = (),
    ) -> None:
        super().__init__()
        if num_nets < 1 or in_features < 1 or not layer_sizes or min(layer_sizes) < 1:
            raise ValueError(
                f"StackedMLP needs num_nets >= 1, in_features >= 1 and positive layer sizes, got "
                f"{num_nets}, {in_features}, {tuple(layer_sizes)}"
            )
        if dropout and len(dropout) != len(layer_sizes):
            raise ValueError(f"dropout {tuple(dropout)} needs one entry per layer {tuple(layer_sizes)}")
        self.num_nets: int = num_nets
        self.in_features: int = in_features
        self.layer_sizes: tuple[int, ...] = tuple(layer_sizes)
        self.last_activation: bool = last_activation
        self.weights: nn.ParameterList = nn.ParameterList()
        self.biases: nn.ParameterList = nn.ParameterList()
        self.dropouts: nn.ModuleList = nn.ModuleList()
        fan_in = in_features
        for i, out in enumerate(self.layer_sizes):
            bound = 1.0 / math.sqrt(fan_in)
            self.weights.append(nn.Parameter(torch.empty(num_nets, fan_in, out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(num_nets, 1, out).uniform_(-bound, bound)))
            p = dropout[i] if dropout else 0.0
            self.dropouts.append(MaskDropout(p) if p > 0 else nn.Identity())
            fan_in = out

    @property
    def out_features(self) -> int:
        """H, the width of the last layer."""
        return self.layer_sizes[-1]

    def _activate(self, i: int, h: torch.Tensor) -> torch.Tensor:
        if i < len(self.layer_sizes) - 1 or self.last_activation:
            h = torch.relu(h)
        return self.dropouts[i](h)

    def forward_shared(self, x: torch.Tensor) -> torch.Tensor:
        """Run every network on the same input.

        Args:
            x: (B, D_in).

        Returns:
            (E, B, H).
        """
        # baddbmm on a stride-0 expand: measured ~1.7x faster fwd+bwd than torch.matmul's
        # broadcast of (B, D_in) @ (E, D_in, out) on CPU, and as fast as E separate Linear layers
        h = torch.baddbmm(self.biases[0], x.unsqueeze(0).expand(self.num_nets, -1, -1), self.weights[0])
        h = self._activate(0, h)
        for i in range(1, len(self.layer_sizes)):
            h = self._activate(i, torch.baddbmm(self.biases[i], h, self.weights[i]))
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run network ``j`` on input ``x[j]``.

        Args:
            x: (E, B, D_in).

        Returns:
            (E, B, H).
        """
        h = x
        for i in range(len(self.layer_sizes)):
            h = self._activate(i, torch.baddbmm(self.biases[i], h, self.weights[i]))
        return h

    def l2_weights(self) -> list[nn.Parameter]:
        """The weight matrices (biases excluded): what the L2 terms of the spec regularise."""
        return list(self.weights)

    def weight_l2(self) -> torch.Tensor:
        """Half the squared Frobenius norm of the weight matrices (biases excluded)."""
        return half_squared_norm(self.l2_weights())

    def extra_repr(self) -> str:
        """Sizes shown by ``print(module)``."""
        return (
            f"num_nets={self.num_nets}, in_features={self.in_features}, "
            f"layer_sizes={self.layer_sizes}, last_activation={self.last_activation}"
        )


class _GradReverse(torch.autograd.Function):
    """Identity forward; the backward multiplies the incoming gradient by ``-alpha``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, alpha: float) -> torch.Tensor:  # type: ignore[override]
        ctx.alpha = alpha
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad.neg() * ctx.alpha, None


def grad_reverse(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """DANN gradient-reversal layer (spec Eq. 4): identity forward, gradient times ``-alpha``.

    Args:
        x: any tensor.
        alpha: reversal strength (>= 0).

    Returns:
        ``x`` (a view); its backward multiplies the gradient by ``-alpha``.

    Example:
        >>> x = torch.ones(2, requires_grad=True)
        >>> grad_reverse(x, 0.5).sum().backward()
        >>> x.grad
        tensor([-0.5000, -0.5000])
    """
    out: torch.Tensor = _GradReverse.apply(x, alpha)
    return out


torch.fx.wrap("grad_reverse")


def grl_alpha(
    schedule: str,
    step: int,
    epoch: int,
    steps_per_epoch: int,
    epochs: int,
    batch_size: int,
    constant: float = 1.0,
) -> float:
    """The gradient-reversal strength alpha at a training step (spec Eq. 4).

    ``alpha = 2 / (1 + exp(-10 p)) - 1`` where the progress ``p`` is

    - ``dann``: ``(step + (epoch - 1) * steps_per_epoch) / (epochs * steps_per_epoch)``, clipped
      to [0, 1]: the intended monotone DANN schedule;
    - ``official``: the authors' code, with the batch size in place of ``steps_per_epoch``
      (``(step + (epoch - 1) * batch_size) / (epochs * batch_size)``, not clipped): a saw-tooth
      that restarts lower at each epoch whenever an epoch has more steps than the batch size;
    - ``constant``: alpha is ``constant``.

    Args:
        schedule: ``dann``, ``official`` or ``constant``.
        step: 0-based step within the epoch.
        epoch: 1-based epoch (as in the spec and the authors' loop).
        steps_per_epoch: number of steps in an epoch (``dann``).
        epochs: total number of epochs.
        batch_size: batch size (``official``).
        constant: alpha of the ``constant`` schedule.

    Returns:
        alpha.

    Example:
        >>> grl_alpha("dann", 0, 1, 10, 2, 256)
        0.0
        >>> round(grl_alpha("dann", 0, 2, 10, 2, 256), 4)
        0.9866
    """
    if schedule == "constant":
        return float(constant)
    if schedule not in GRL_SCHEDULES:
        raise ValueError(f"unknown grl_schedule {schedule!r}; expected one of {GRL_SCHEDULES}")
    if step < 0 or epoch < 1 or epochs < 1:
        raise ValueError(
            f"grl_alpha needs step >= 0, epoch >= 1 (1-based), epochs >= 1; got {step}, {epoch}, {epochs}"
        )
    if schedule == "dann":
        if steps_per_epoch < 1:
            raise ValueError(f"grl_alpha('dann') needs steps_per_epoch >= 1, got {steps_per_epoch}")
        p = (step + (epoch - 1) * steps_per_epoch) / (epochs * steps_per_epoch)
        p = min(max(p, 0.0), 1.0)
    else:
        if batch_size < 1:
            raise ValueError(f"grl_alpha('official') needs batch_size >= 1, got {batch_size}")
        p = (step + (epoch - 1) * batch_size) / (epochs * batch_size)
    return 2.0 / (1.0 + math.exp(-10.0 * p)) - 1.0
