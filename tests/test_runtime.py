"""The allocator settings every job applies (``mptrec.runtime``), each in a fresh interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# a fresh interpreter: 50 training steps of a small MLP on a batch of 16,000 (16 MiB blocks of
# activations and gradients a step), the minor page faults per step
PROBE = """
import json, resource, torch
from mptrec.runtime import allocator_status, tune_allocator
applied = tune_allocator()
torch.set_num_threads(1)
torch.manual_seed(0)
nn = torch.nn
net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Dropout(0.1), nn.Linear(256, 1))
x = torch.randn(16000, 64)
def step():
    net(x).sum().backward()
for _ in range(5):
    step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    step()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 50
again = tune_allocator()
print(json.dumps({"applied": applied, "again": again, "faults": faults, "status": allocator_status()}))
"""


def _probe(env_value: str | None) -> dict[str, object]:
    env = dict(os.environ)
    env.pop("MPTREC_MALLOC_TUNING", None)
    if env_value is not None:
        env["MPTREC_MALLOC_TUNING"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120,
                         check=True)
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_raised_thresholds_keep_freed_blocks_in_the_heap() -> None:
    tuned, defaults = _probe(None), _probe("0")
    assert tuned["applied"] is True and tuned["again"] is True
    assert "mmap threshold 32 MiB" in str(tuned["status"])
    assert defaults["applied"] is False and "MPTREC_MALLOC_TUNING=0" in str(defaults["status"])
    # a step allocates over 64 MiB of activation and gradient blocks (16k+ pages). Raised: they are
    # reused from the heap (240 to 480 faults a step in 5 runs here). glibc's defaults return them
    # to the kernel and fault them in again, but its dynamic threshold makes how often vary with
    # the machine's load (1,500 to 5,000 a step here), so the test bounds the tuned count, and
    # compares it with the defaults only by order
    tuned_faults, default_faults = float(tuned["faults"]), float(defaults["faults"])  # type: ignore[arg-type]
    assert tuned_faults < 1000, (tuned_faults, default_faults)
    assert tuned_faults < default_faults, (tuned_faults, default_faults)
