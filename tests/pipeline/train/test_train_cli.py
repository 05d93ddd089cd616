"""`mptrec train` end to end: --nproc 2 (torchrun), --resume, and a clean error exit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mptrec.pipeline.train.metrics_log import read_metrics
from tests.pipeline.train.test_train_data import DEBUG_TOML, write_tiny_shards


def _mptrec(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mptrec.launch.cli", "train", *args], capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_mptrec_train_nproc_2_then_resume_and_errors(tmp_path: Path) -> None:
    data = write_tiny_shards(tmp_path / "data")
    run = tmp_path / "run"
    base = ["--config", str(DEBUG_TOML), "--set", f"data.path={str(data)!r}",
            "--set", f"out_dir={str(run)!r}", "--no-progress"]
    first = _mptrec(*base, "--nproc", "2", "--set", "train.epochs=1")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "trained 5 steps on 2 process(es)" in first.stderr
    assert (run / "checkpoints" / "best").is_dir()
    # --resume continues the same run (epochs raised to 2): steps 6-10, on one process this time
    again = _mptrec(*base, "--resume", "--set", "train.epochs=2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr and "not restored" in again.stderr  # 2 -> 1: resharded
    steps = [x["step"] for x in read_metrics(run) if "loss" in x]
    assert steps[:5] == [1, 2, 3, 4, 5] and steps[-1] > 5
    bad = _mptrec(*base, "--set", "features.embedding_dim=6", "--set", f"out_dir={str(tmp_path / 'r2')!r}")
    assert bad.returncode == 2 and "feature 'f0' has embedding_dim 6" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.slow
def test_bad_data_with_nproc_2_is_one_line_without_torchrun_report(tmp_path: Path) -> None:
    from tests.pipeline.train.test_train_reliability import _break

    data = write_tiny_shards(tmp_path / "data")
    path = _break(data, "purchase", 2)
    run = tmp_path / "run"
    bad = _mptrec("--config", str(DEBUG_TOML), "--set", f"data.path={str(data)!r}", "--set",
                  f"out_dir={str(run)!r}", "--no-progress", "--nproc", "2")
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr, bad.stderr[-3000:]
    assert bad.stderr.startswith(f"mptrec train: error: {path} row group 3: label column 'purchase'")
    assert not run.exists()
