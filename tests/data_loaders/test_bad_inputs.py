"""`mptrec data convert` on bad inputs: exit 2, one line naming file and column/line, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mptrec.launch.cli import main
from tests.data_loaders.test_aliccp_raw import write_raw

GOOD_CSV = "click,purchase,101,205\n0,0,1,2\n1,0,2,3\n1,1,3,4\n"
CASES = {
    # name: (format, file name, content, expected message after "<file>")
    "csv_duplicate_column": ("aliccp-csv", "a.csv", "click,purchase,205,205\n0,0,1,2\n",
                             ": header names column '205' twice"),
    "csv_header_only": ("aliccp-csv", "a.csv", "click,purchase,205\n",
                        ": no data rows (only the header click,purchase,205)"),
    "csv_empty": ("aliccp-csv", "a.csv", "", ": cannot read as CSV: "),
    "paddle_field_not_a_number": ("aliccp-paddle", "a.txt", "1,0,0,101:5,itm:917\n",
                                  ":1: token 'itm:917': field 'itm' is not an Ali-CCP field code"),
    "paddle_id_not_an_integer": ("aliccp-paddle", "a.txt", "1,0,0,101:5\n2,1,0,101:6,205:abc\n",
                                 ":2: token '205:abc': field '205': id 'abc' is not a non-negative integer"),
    "paddle_negative_id": ("aliccp-paddle", "a.txt", "1,0,0,101:-5\n",
                           ":1: token '101:-5': field '101': id '-5' is not a non-negative integer"),
    "paddle_empty": ("aliccp-paddle", "a.txt", "\n", ": no data rows"),
    "census_empty": ("census", "a.data", "", ": no data rows"),
}


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    rc = main(["data", "convert", *args])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_named_in_one_line_and_nothing_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    fmt, name, content, expected = CASES[case]
    src = tmp_path / name
    src.write_text(content)
    out = tmp_path / "new" / "out"
    rc, err = _run(capsys, "--format", fmt, "--input", str(src), "--split", "train=1.0", "--out", str(out))
    assert rc == 2
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"mptrec data: error: {src}{expected}"), err
    assert not (tmp_path / "new").exists()  # no --out folder, not even its parent


def test_raw_non_integer_id_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    skel, _, _ = write_raw(tmp_path / "raw", n=20)
    lines = skel.read_text().splitlines()
    lines[3] = lines[3].replace("205\x02", "205\x02abc", 1)
    skel.write_text("\n".join(lines) + "\n")
    rc, err = _run(capsys, "--format", "aliccp-raw", "--input", str(skel), "--split", "train=1.0",
                   "--out", str(tmp_path / "o"))
    err = err.split("\r")[-1].splitlines()[-1]  # after the progress bars (stderr, \r-rewritten)
    assert rc == 2 and "Traceback" not in err, err
    assert err.startswith(f"mptrec data: error: {skel}:4: field '205': id 'abc"), err
    assert "is not a non-negative integer" in err and not (tmp_path / "o").exists()
    # skipped and counted under --max-bad-lines, like any malformed line
    rc, err = _run(capsys, "--format", "aliccp-raw", "--input", str(skel), "--split", "train=1.0",
                   "--max-bad-lines", "1", "--min-count", "1", "--out", str(tmp_path / "o"))
    assert rc == 0, err
    assert json.loads((tmp_path / "o" / "schema.json").read_text())["stats"]["bad_lines_skipped"] == 1


def test_unused_field_codes_are_counted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "a.txt"
    src.write_text("1,0,0,101:5,999:1,999:2\n2,1,0,101:6,888:3\n")
    rc, err = _run(capsys, "--format", "aliccp-paddle", "--input", str(src), "--split", "train=1.0",
                   "--out", str(tmp_path / "o"))
    assert rc == 0, err
    stats = json.loads((tmp_path / "o" / "schema.json").read_text())["stats"]
    assert stats["unused_field_tokens"] == {"888": 1, "999": 2}


def test_failed_overwrite_keeps_the_previous_shards(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    good, bad, out = tmp_path / "good.csv", tmp_path / "bad.csv", tmp_path / "out"
    good.write_text(GOOD_CSV)
    bad.write_text("click,purchase,101,205\n0,0,1,x\n")
    assert _run(capsys, "--format", "aliccp-csv", "--input", str(good), "--split", "train=1.0",
                "--out", str(out))[0] == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    rc, err = _run(capsys, "--format", "aliccp-csv", "--input", str(bad), "--split", "train=1.0",
                   "--out", str(out), "--overwrite")
    assert rc == 2 and f"{bad}: column '205' must hold integers" in err
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder
    # and a successful overwrite replaces them
    assert _run(capsys, "--format", "aliccp-csv", "--input", str(good), str(good), "--split", "train=1.0",
                "--out", str(out), "--overwrite")[0] == 0
    assert json.loads((out / "schema.json").read_text())["stats"]["train"]["rows"] == 6
