"""SIGKILL the whole `mptrec train --nproc 2` process tree mid-epoch, resume: the same losses and AUCs.

No ``finally`` block, no exception handler and no atexit hook runs under SIGKILL, so this is
the crash the checkpoints exist for. The killed run is resumed with ``--resume`` (2 processes
again) and every logged step loss and validation AUC must equal those of an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from mptrec.pipeline.train.metrics_log import read_metrics
from tests.pipeline.train.test_train_data import DEBUG_TOML, write_tiny_shards


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _cmd(base: list[str], *extra: str) -> list[str]:
    return [sys.executable, "-m", "mptrec.launch.cli", "train", *base, "--nproc", "2", *extra]


def _logged(run: Path) -> tuple[list[Any], list[Any]]:
    lines = read_metrics(run)
    steps = [(x["step"], x["loss"], x["losses"]) for x in lines if "loss" in x]
    valid = [(x["step"], x["auc"]) for x in lines if x.get("split") == "valid"]
    return steps, valid


@pytest.mark.slow
def test_sigkill_of_the_process_tree_then_resume_gives_the_same_losses(tmp_path: Path) -> None:
    data = write_tiny_shards(tmp_path / "data", rows={"train": 704, "valid": 256, "test": 64})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def base(run: Path) -> list[str]:
        return ["--config", str(DEBUG_TOML), "--no-progress", "--set", f"data.path={str(data)!r}",
                "--set", f"out_dir={str(run)!r}", "--set", "train.epochs=4",
                "--set", "train.checkpoint_every=3", "--set", "train.keep_last=2"]

    full_run, killed_run = tmp_path / "full", tmp_path / "killed"
    full = subprocess.run(_cmd(base(full_run)), capture_output=True, text=True, timeout=600, env=env)
    assert full.returncode == 0, full.stderr[-3000:]

    proc = subprocess.Popen(_cmd(base(killed_run)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env)
    trigger = killed_run / "checkpoints" / "step-000009"  # mid-epoch 2 (about 5 steps per epoch)
    deadline = time.monotonic() + 500
    while not (trigger / "meta.json").exists():
        assert proc.poll() is None, f"the run ended before the kill: {proc.stderr.read()[-3000:]}"  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "no checkpoint step-000009"
        time.sleep(0.002)
    pids = _tree(proc.pid)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)
    assert len(pids) >= 3  # the CLI, torchrun and its 2 workers
    t0 = time.monotonic()
    while any(_alive(p) for p in pids[1:]) and time.monotonic() - t0 < 60:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids), "a process of the killed tree survived"
    steps_killed, _ = _logged(killed_run)
    full_steps, full_valid = _logged(full_run)
    assert steps_killed[-1][0] < full_steps[-1][0], "killed after the end"

    resumed = subprocess.run(_cmd(base(killed_run), "--resume"), capture_output=True, text=True, timeout=600,
                             env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    steps, valid = _logged(killed_run)
    assert [s for s, _, _ in steps] == [s for s, _, _ in full_steps] == list(range(1, len(full_steps) + 1))
    assert steps == full_steps  # every loss (and loss part) identical, bit for bit as logged
    assert valid == full_valid and len(valid) == 4
