"""`mptrec train` on bad shards: one line naming file, row group and column; no run folder left.

The shards are broken in a row group that is NOT the first of its file (row group 3 of the
second train shard), so the check has to look past the first rows. One subprocess runs every
case through the real CLI entry point (``mptrec.launch.cli.main``), so the exit code and the
exact stderr are what a user sees.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mptrec.data_loaders.dataset import ShardDataset
from mptrec.data_loaders.layout import file_crc32, read_schema
from mptrec.data_loaders.schema import DataError, FeatureSpec, LabelSpec
from mptrec.data_loaders.validate import validate_split
from tests.pipeline.train.test_train_data import DEBUG_TOML, VOCAB, write_tiny_shards

ROW = 3 * 64 + 5  # row 5 of row group 3


def _break(data: Path, column: str, value: object, split: str = "train", shard: int = 1,
           refresh_crc: bool = True) -> Path:
    """Set one value of a shard (row group 3 of its second file), keeping types and row groups."""
    path = data / read_schema(data)["splits"][split]["files"][shard]
    table = pq.read_table(path)
    values = table.column(column).to_pylist()
    values[ROW] = value
    i = table.schema.get_field_index(column)
    table = table.set_column(i, table.schema.field(i), pa.array(values, table.schema.field(i).type))
    pq.write_table(table, path, row_group_size=64)
    if refresh_crc:  # as if a buggy converter had written the bad value (a valid checksum)
        schema = json.loads((data / "schema.json").read_text())
        schema["splits"][split]["crc32"][shard] = file_crc32(path)
        (data / "schema.json").write_text(json.dumps(schema))
    return path


CASES = {
    "null_label": ("click", None, "label column 'click': 1 null value(s)"),
    "label_2": ("purchase", 2, "label column 'purchase': value 2 is above 1"),
    "nan_dense": ("d0", float("nan"), "dense column 'd0': nan at row 5 (NaN/inf not allowed)"),
    "negative_id": ("f1", -1, "column 'f1': value -1 is below 0"),
    "id_too_big": ("f2", 8, "column 'f2': value 8 is above 7"),
    "changed_file": ("f0", 3, "damaged or changed since it was written (crc32 "),
}

_SCRIPT = r"""
import contextlib, io, json, sys
from mptrec.launch.cli import main
out = {}
for name, data, run in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["train", "--config", sys.argv[2], "--no-progress", "--set", f"data.path={data!r}",
                   "--set", f"out_dir={run!r}"])
    out[name] = [rc, err.getvalue()]
print(json.dumps(out))
"""


def test_bad_shards_fail_before_the_run_folder_exists(tmp_path: Path) -> None:
    jobs = []
    broken: dict[str, Path] = {}
    for name, (column, value, _) in CASES.items():
        data = write_tiny_shards(tmp_path / name / "data")
        broken[name] = _break(data, column, value, refresh_crc=name != "changed_file")
        jobs.append([name, str(data), str(tmp_path / name / "run" / "nested")])
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(jobs), str(DEBUG_TOML)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.splitlines()[-1])
    for name, (_, _, expected) in CASES.items():
        rc, err = results[name]
        assert rc == 2, (name, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, (name, err)
        where = f"{broken[name]}: " if name == "changed_file" else f"{broken[name]} row group 3: "
        assert lines[0].startswith(f"mptrec train: error (rank 0): {where}"), lines[0]
        assert expected in lines[0], (name, lines[0])
        assert not (tmp_path / name / "run").exists(), name  # nothing written, not even the parent


def _dataset(data: Path) -> ShardDataset:
    feats = [FeatureSpec("d0", kind="dense"), FeatureSpec("d1", kind="dense")]
    feats += [FeatureSpec(k, num_embeddings=v, embedding_dim=4, multivalent=k == "m0")
              for k, v in VOCAB.items()]
    return ShardDataset(data, "train", features=feats, labels=[LabelSpec("ctr", "click")], batch_size=64)


def test_validation_reads_everything_when_small_and_statistics_always(tmp_path: Path) -> None:
    data = write_tiny_shards(tmp_path / "data")
    ds = _dataset(data)
    assert validate_split(ds) == {"row_groups": 10, "row_groups_read": 10}  # 640 rows: a full scan
    assert validate_split(ds, full_scan_rows=100) == {"row_groups": 10, "row_groups_read": 2}
    path = _break(data, "f0", -3)
    # the statistics of row group 3 show the negative id even when only first row groups are read
    with pytest.raises(DataError, match=rf"^{path} row group 3: column 'f0': value -3 is below 0"):
        validate_split(_dataset(data), full_scan_rows=100)
    path = _break(data, "f0", 1)
    path = _break(data, "d1", float("inf"))
    with pytest.raises(DataError, match=rf"^{path} row group 3: dense column 'd1': inf at row 5"):
        validate_split(_dataset(data))
    assert validate_split(_dataset(data), full_scan_rows=100)["row_groups_read"] == 2  # not seen: documented
    np.testing.assert_equal(pq.read_table(path).column("d1").to_numpy()[ROW], np.inf)


class _Crash(Exception):
    pass


def _crash_runs(rank: int, world: int, data: str, tmp: str) -> dict[str, object]:
    import torch

    from mptrec.pipeline.train.pretrain import pretrain
    from tests.pipeline.train.test_train_data import debug_config

    def crash_at(n: int):  # noqa: ANN202
        def on_step(step: int, parts: object) -> None:
            if step == n:
                raise _Crash
        return on_step

    out: dict[str, object] = {}
    losses: dict[int, float] = {}
    for name, step, every in (("early", 2, 0), ("late", 8, 3)):
        run = Path(tmp) / name / "run"
        cfg = debug_config(Path(data), run, f"train.checkpoint_every={every}", "train.keep_last=3")
        try:
            pretrain(cfg, device=torch.device("cpu"), progress=False, verbose=False, on_step=crash_at(step))
        except _Crash:
            pass
        out[name] = sorted(p.name for p in run.iterdir()) if run.exists() else None
        out[f"{name}_parent"] = (Path(tmp) / name).exists()
    # truncate the last checkpoint (step 6): --resume names it, falls back to step 3, and the steps
    # it re-trains give the crashed run's losses exactly
    run = Path(tmp) / "late" / "run"
    shard = run / "checkpoints" / "step-000006" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])

    first: dict[int, float] = {}

    def recorder(into: dict[int, float]):  # noqa: ANN202
        def on_step(step: int, parts: Any) -> None:
            into[step] = float(sum(v.detach().sum() for v in parts.values()))
            if step == 7:
                raise _Crash
        return on_step

    cfg = debug_config(Path(data), Path(tmp) / "ref", "train.checkpoint_every=3")
    try:
        pretrain(cfg, device=torch.device("cpu"), progress=False, verbose=False, on_step=recorder(first))
    except _Crash:
        pass
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            pretrain(debug_config(Path(data), run, "train.checkpoint_every=3", "train.keep_last=3"),
                     device=torch.device("cpu"), resume=True, progress=False, on_step=recorder(losses))
        except _Crash:
            pass
    out["resume_log"] = err.getvalue()
    out["resumed"] = losses
    out["reference"] = first
    return out


def test_a_crash_before_the_first_checkpoint_leaves_nothing_after_it_everything(tmp_path: Path) -> None:
    from tests.dist import run_multiprocess

    data = write_tiny_shards(tmp_path / "data")
    out = run_multiprocess(_crash_runs, 1, str(data), str(tmp_path))[0]
    assert out["early"] is None and out["early_parent"] is False
    assert out["late"] is not None and {"checkpoints", "config.json", "metrics.jsonl", "plan.txt"} <= set(
        out["late"])
    log = str(out["resume_log"])
    assert "--resume: skipped damaged checkpoint step-000006: " in log and "__0_0.distcp: " in log, log
    assert "resumed from " in log and "step-000003 (step 3," in log, log
    resumed, reference = out["resumed"], out["reference"]
    assert isinstance(resumed, dict) and isinstance(reference, dict)
    assert sorted(resumed) == [4, 5, 6, 7]
    assert all(resumed[s] == reference[s] for s in resumed), (resumed, reference)
