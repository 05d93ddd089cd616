"""Parameter and FLOP accounting (spec sections 4 and 8: #Params, %Params, #FLOPs, %FLOPs)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_parameters", "forward_flops_per_sample"]


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """Trainable and total parameter counts (shared parameters counted once).

    Works on meta-device modules too (counts only shapes).

    Args:
        module: any module.

    Returns:
        ``(trainable, total)``.

    Example:
        >>> count_parameters(nn.Linear(3, 2))
        (8, 8)
    """
    trainable = total = 0
    for p in module.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def _batch_size(inputs: tuple[object, ...]) -> int:
    first = inputs[0] if inputs else None
    if isinstance(first, Mapping):
        first = next(iter(first.values()), None)
    if not isinstance(first, torch.Tensor) or first.dim() == 0 or first.size(0) == 0:
        raise ValueError("forward_flops_per_sample: the first input must be a non-empty batch-first tensor "
                         "or a dict whose first value is one")
    return int(first.size(0))


def forward_flops_per_sample(module: nn.Module, *inputs: object) -> float:
    """Forward multiply-adds per sample, counted with ``torch.utils.flop_counter``.

    Convention: **one multiply-add = one flop**, as fvcore (the authors' counter) counts.
    ``FlopCounterMode`` counts two flops per multiply-add, so its total is halved. It counts
    matrix products (mm, addmm, bmm, baddbmm, einsum via bmm), not element-wise ops, softmax,
    LayerNorm or embedding lookups (fvcore's defaults also skip element-wise ops and lookups).
    The forward runs under ``torch.no_grad()``.

    Args:
        module: the module to measure (a model, a :class:`NewTaskModel`, or a head).
        *inputs: its forward arguments, e.g. ``(dense, kjt)`` or ``(feats,)``; the batch size
            is the first dimension of the first tensor (or of a dict's first value).

    Returns:
        Multiply-adds per sample.

    Example:
        >>> forward_flops_per_sample(nn.Linear(3, 2), torch.rand(4, 3))
        6.0
    """
    batch = _batch_size(inputs)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module(*inputs)
    return counter.get_total_flops() / 2.0 / batch
