from __future__ import annotations

from pathlib import Path

import pytest

from mptrec.bench.bench_dataload import run as bench_run
from mptrec.data_loaders.layout import read_schema
from mptrec.launch.cli import main


def test_synth_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s"
    assert (
        main(
            [
                "data",
                "synth",
                "--dataset",
                "aliccp",
                "--rows",
                "5000",
                "--shards",
                "2",
                "--seed",
                "3",
                "--out",
                str(out),
                "--click-rate",
                "0.1",
            ]
        )
        == 0
    )
    assert "bayes_auc" in capsys.readouterr().out
    s = read_schema(out)
    assert s["synth"]["click_rate"] == 0.1 and len(s["splits"]["train"]["files"]) == 2
    assert main(["data", "synth", "--dataset", "aliccp", "--rows", "10", "--out", str(out)]) == 2
    assert "already holds shards" in capsys.readouterr().err


def test_convert_commands(shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = shared_data / "aliccp"
    assert (
        main(
            [
                "data",
                "convert",
                "--format",
                "aliccp-paddle",
                "--input",
                str(a / "paddlerec_esmm_train_small.txt"),
                "--split",
                "train=1.0",
                "--out",
                str(tmp_path / "p"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "data",
                "convert",
                "--format",
                "aliccp-csv",
                "--input",
                str(a / "torchrechub_ali_ccp_train_sample.csv"),
                "--split",
                "train=1.0",
                "--split-input",
                f"valid={a / 'torchrechub_ali_ccp_val_sample.csv'}",
                "--out",
                str(tmp_path / "c"),
            ]
        )
        == 0
    )
    assert sum(read_schema(tmp_path / "c")["splits"]["valid"]["rows"]) == 50
    c = shared_data / "census" / "census-income.data.subset.gz"
    assert (
        main(
            [
                "data",
                "convert",
                "--format",
                "census",
                "--input",
                str(c),
                "--shards",
                "2",
                "--seed",
                "5",
                "--drop-instance-weight",
                "--out",
                str(tmp_path / "census"),
            ]
        )
        == 0
    )
    assert "rows {'train': 1669, 'valid': 208, 'test': 209}" in capsys.readouterr().out


def test_convert_rejects_options_of_other_formats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "data",
                "convert",
                "--format",
                "census",
                "--input",
                "x.gz",
                "--min-count",
                "3",
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "--min-count does not apply to --format census" in capsys.readouterr().err
    assert (
        main(["data", "convert", "--format", "census", "--split-input", "trainx.gz", "--out", str(tmp_path)])
        == 2
    )
    assert "expected SPLIT=PATH" in capsys.readouterr().err
    assert (
        main(
            [
                "data",
                "convert",
                "--format",
                "census",
                "--input",
                "x.gz",
                "--split",
                "train=0.5",
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "sum to 0.5" in capsys.readouterr().err


@pytest.mark.slow  # DataLoader worker processes
def test_bench_dataload_run(synth_dir: Path) -> None:
    out = bench_run(str(synth_dir), batch_size=1024, num_workers=2, repeats=1)
    assert out["rows"] == 16_000
    assert out["loader_samples_per_s"] > 0 and out["bare_samples_per_s"] > 0
    assert out["ratio"] == pytest.approx(out["loader_samples_per_s"] / out["bare_samples_per_s"], rel=1e-2)
