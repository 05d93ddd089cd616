from __future__ import annotations

import argparse
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mptrec.bench.bench_dataload import run as bench_run
from mptrec.data_loaders.layout import DEFAULT_ROW_GROUP_SIZE, read_schema
from mptrec.launch import cmd_data
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


def test_row_group_size_default_and_option(
    shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # several row groups per split by default (the loader's unit of sharing and of shuffling)
    parser = argparse.ArgumentParser()
    cmd_data.add_arguments(parser)
    for cmd in (["synth", "--dataset", "aliccp", "--rows", "9"], ["convert", "--format", "census"]):
        assert parser.parse_args([*cmd, "--out", "x"]).row_group_size == DEFAULT_ROW_GROUP_SIZE == 16_384
    census = shared_data / "census" / "census-income.data.subset.gz"
    args = ["data", "convert", "--format", "census", "--input", str(census), "--shards", "2"]
    assert main([*args, "--row-group-size", "300", "--out", str(tmp_path / "c")]) == 0
    capsys.readouterr()
    for f in read_schema(tmp_path / "c")["splits"]["train"]["files"]:  # 835 and 834 rows
        meta = pq.ParquetFile(tmp_path / "c" / f).metadata
        assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)][:2] == [300, 300]
        assert meta.num_row_groups == 3


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
