"""Where the time of a training step goes: ``torch.profiler`` over a few steps, top ops and categories."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from torch.profiler import ProfilerActivity, profile

#: Op-name patterns -> category (first match wins).
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "embedding lookup + fused update (FBGEMM)",
        (
            "fbgemm::",
            "lookup",
            "embedding",
            "input_dist",
            "output_dist",
            "keyed",
            "jagged",
            "kjt",
            "permute_",
        ),
    ),
    ("dropout (random masks)", ("bernoulli", "dropout", "rand")),
    ("matmul (experts, towers, gates)", ("mm", "bmm", "addmm", "baddbmm", "matmul", "linear")),
    ("dense optimizer (Adam)", ("optimizer.step", "adam", "_foreach", "lerp", "sqrt")),
    (
        "data movement (copy, cat, index)",
        ("copy_", "cat", "index", "to_copy", "clone", "contiguous", "stack", "split", "narrow"),
    ),
    ("autograd / collectives / other", ()),
)
ELEMENTWISE = (
    "relu",
    "threshold",
    "clamp",
    "mul",
    "add",
    "sub",
    "div",
    "softmax",
    "sigmoid",
    "binary_cross",
    "log",
    "exp",
    "neg",
    "sum",
    "mean",
    "pow",
    "nll",
    "where",
    "fill",
    "zero",
    "gt",
    "lt",
)


def categorize(name: str) -> str:
    """The category of a profiler op name."""
    low = name.lower()
    for cat, pats in CATEGORIES[:-1]:
        if any(p in low for p in pats):
            return cat
    if any(p in low for p in ELEMENTWISE):
        return "element-wise (activations, gates, loss)"
    return CATEGORIES[-1][0]


def profile_steps(
    step: Callable[[int], Any], steps: int, samples_per_step: int, top: int = 15
) -> dict[str, Any]:
    """Profile ``steps`` calls of ``step``: the top ops by self CPU time and a breakdown by category.

    Self times of leaf ops are used (no double counting); percentages are of the total self CPU
    time recorded, which includes the profiler's own overhead on small ops.
    """
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            step(i)
    wall = time.perf_counter() - t0
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total_us = sum(e.self_cpu_time_total for e in events) or 1.0
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
    cats: dict[str, float] = {}
    for e in events:
        c = categorize(e.key)
        cats[c] = cats.get(c, 0.0) + e.self_cpu_time_total
    return {
        "steps": steps,
        "samples_per_step": samples_per_step,
        "wall_ms_per_step_profiled": round(wall / steps * 1e3, 3),
        "self_cpu_ms_per_step": round(total_us / steps / 1e3, 3),
        "top_ops": [
            {
                "op": e.key,
                "self_ms_per_step": round(e.self_cpu_time_total / steps / 1e3, 3),
                "percent": round(100 * e.self_cpu_time_total / total_us, 1),
                "calls_per_step": e.count / steps,
                "category": categorize(e.key),
            }
            for e in ranked[:top]
        ],
        "categories": {
            c: {"ms_per_step": round(v / steps / 1e3, 3), "percent": round(100 * v / total_us, 1)}
            for c, v in sorted(cats.items(), key=lambda kv: -kv[1])
        },
    }
