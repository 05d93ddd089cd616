"""launch/relaunch.py: the one command line that starts a job module (plain for 1 process, torchrun for N)."""

from __future__ import annotations

import doctest
import sys

import pytest


def test_docstring_examples_run() -> None:
    import mptrec.launch.relaunch as relaunch

    result = doctest.testmod(relaunch)
    assert result.attempted > 0 and result.failed == 0, result


def test_command_starts_this_interpreter_with_torchrun_only_for_several_processes() -> None:
    from mptrec.launch.relaunch import command

    plain = [sys.executable, "-m", "mptrec.launch.cli", "--help"]
    assert command("mptrec.launch.cli", ["--help"], 0) == plain
    assert command("mptrec.launch.cli", ["--help"], 1) == command("mptrec.launch.cli", ["--help"], 0)
    assert command("mptrec.launch.cli", [], 3)[1:6] == ["-m", "torch.distributed.run", "--standalone",
                                                        "--nproc_per_node=3", "-m"]


def test_run_module_returns_the_exit_code_with_one_thread_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    from mptrec.launch.relaunch import run_module

    seen = {}

    def call(cmd: list[str], env: dict[str, str]) -> int:
        seen.update(cmd=cmd, env=env)
        return 3

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(subprocess, "call", call)
    assert run_module("mptrec.launch.worker_train", ["--config", "c.toml"], 1) == 3
    assert seen["cmd"][1:] == ["-m", "mptrec.launch.worker_train", "--config", "c.toml"]
    assert seen["env"]["OMP_NUM_THREADS"] == "1"
