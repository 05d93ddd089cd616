from __future__ import annotations

import subprocess
import sys

import pytest

from mptrec.launch.cli import SUBCOMMANDS, build_parser, main


def test_top_level_help_lists_every_subcommand() -> None:
    out = subprocess.run([sys.executable, "-m", "mptrec.launch.cli", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert set(SUBCOMMANDS) == {"data", "train", "tasks", "prompt-tune", "eval", "report", "bench", "export",
                                "predict"}
    for name in SUBCOMMANDS:
        assert name in out


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_each_subcommand_has_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    assert "usage: mptrec " + name in capsys.readouterr().out


def test_no_subcommand_is_an_error() -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([])
    assert exc.value.code != 0
