"""launch/dist.py: process group from torchrun's environment, backend by device, teardown."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from mptrec.launch.dist import init_distributed, resolve_device, teardown

REPO = Path(__file__).resolve().parents[2]
PROBE = REPO / "tests" / "launch" / "_dist_probe.py"
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")


@pytest.fixture
def no_launch_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def _no_leftover_group() -> object:
    yield
    teardown()


def _torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--tee", "3",
         str(PROBE), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )


def _probes(out: str) -> list[dict[str, object]]:
    found = [json.loads(line.split("PROBE ", 1)[1]) for line in out.splitlines() if "PROBE {" in line]
    return sorted(found, key=lambda p: int(str(p["rank"])))


@no_cuda
@pytest.mark.usefixtures("no_launch_env")
@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_without_torchrun_a_one_process_gloo_group(device: str) -> None:
    dev, rank, world_size = init_distributed(device)
    assert (dev, rank, world_size) == (torch.device("cpu"), 0, 1)
    assert dist.get_backend() == "gloo" and dist.get_world_size() == 1
    t = torch.ones(2)
    dist.all_reduce(t)
    assert t.tolist() == [1.0, 1.0]
    teardown()
    assert not dist.is_initialized()
    teardown()  # idempotent


@pytest.mark.usefixtures("no_launch_env")
def test_a_second_init_is_an_error() -> None:
    init_distributed("cpu")
    with pytest.raises(RuntimeError, match="already exists"):
        init_distributed("cpu")


def test_device_names() -> None:
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="'tpu'"):
        init_distributed("tpu")


@no_cuda
def test_cuda_without_a_gpu_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="device 'cuda' was asked for but torch sees no CUDA device"):
        init_distributed("cuda")
    assert not dist.is_initialized()


def test_incomplete_or_bad_launch_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="LOCAL_RANK, MASTER_ADDR, MASTER_PORT missing"):
        init_distributed("cpu")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match=r"RANK=2 is not in \[0, WORLD_SIZE=2\)"):
        init_distributed("cpu")
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(ValueError, match="RANK='one' is not an integer"):
        init_distributed("cpu")
    assert not dist.is_initialized()


@no_cuda
@pytest.mark.slow
def test_two_torchrun_processes_get_gloo_ranks_and_tear_down() -> None:
    r = _torchrun(2, "auto")
    assert r.returncode == 0, r.stdout + r.stderr
    probes = _probes(r.stdout)
    assert [p["rank"] for p in probes] == [0, 1]
    for p in probes:
        assert p == {"rank": p["rank"], "world_size": 2, "device": "cpu", "backend": "gloo", "sum": 3.0}
    assert "PROBE_TORN_DOWN 0 False" in r.stdout and "PROBE_TORN_DOWN 1 False" in r.stdout


@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_picks_nccl_and_the_local_rank_gpu() -> None:
    r = _torchrun(1, "cuda")
    assert r.returncode == 0, r.stdout + r.stderr
    (probe,) = _probes(r.stdout)
    assert probe == {"rank": 0, "world_size": 1, "device": "cuda:0", "backend": "nccl", "sum": 1.0}


@pytest.mark.gpu
def test_local_rank_beyond_the_visible_gpus_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    n = torch.cuda.device_count()
    for name, value in {"RANK": n, "WORLD_SIZE": n + 1, "LOCAL_RANK": n, "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": 29500}.items():
        monkeypatch.setenv(name, str(value))
    with pytest.raises(RuntimeError, match=f"LOCAL_RANK={n} but only {n} CUDA device"):
        init_distributed("cuda")
