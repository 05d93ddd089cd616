"""Serving the union: the stage-1 backbone plus every trained prompt-tuned head, and the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mptrec.launch.cli import main
from tests.dist import run_multiprocess
from tests.pipeline.tasks.test_prompt_tuning import TASK_TOML, fixed_batch, stage1_config, write_stage2_shards

REPO = Path(__file__).resolve().parents[3]


def _serve(rank: int, world: int, data: str, run: str) -> dict[str, Any]:
    from mptrec.data_loaders.layout import read_schema
    from mptrec.pipeline.build import resolve_run_features
    from mptrec.pipeline.rundir import RunDirError
    from mptrec.pipeline.sharding import unwrap_dmp
    from mptrec.pipeline.tasks.prompt_tuning import run_stage2, setup_stage2
    from mptrec.pipeline.tasks.store import register_task
    from mptrec.pipeline.tasks.union import load_run_for_eval
    from mptrec.pipeline.train.pretrain import pretrain

    cpu = torch.device("cpu")
    cfg = stage1_config(Path(data), Path(run))
    pretrain(cfg, device=cpu, progress=False)
    batch = fixed_batch(Path(data), resolve_run_features(cfg, read_schema(data)))
    x = (batch.dense_features, batch.sparse_features)
    before_model, _, before_tasks = load_run_for_eval(run, "best", cpu)
    with torch.no_grad():
        before = before_model(*x)
    (Path(run) / "scen.toml").write_text(TASK_TOML)
    register_task(run, Path(run) / "scen.toml")
    s = setup_stage2(run, "scen", cpu, ["epochs=1", "feature_cache_mib=0"])  # the streaming path
    streamed = run_stage2(s, progress=False)["metrics"]["valid_history"]
    with torch.no_grad():
        tuned = unwrap_dmp(s.sharded.dmp)(*x)
    model, run_cfg, tasks = load_run_for_eval(run, "best", cpu)
    with torch.no_grad():
        served = model(*x)
    out: dict[str, Any] = {
        "before_tasks": [t.name for t in before_tasks],
        "tasks": [(t.name, t.label, t.positive_values) for t in tasks],
        "keys": sorted(served),
        "old_identical": all(torch.equal(served[t], before[t]) for t in ("ctr", "cvr")),
        "new_identical": torch.equal(served["scen"], tuned["scen"]),
        "frozen": not any(p.requires_grad for p in model.parameters() if p.is_leaf),
        "training": model.training,
        "run_name": run_cfg.name,
        "streamed": [not r["cached_features"] for r in streamed],
    }
    copy = Path(run) / "checkpoints" / "copy-of-best"
    shutil.copytree(Path(run) / "checkpoints" / "best", copy)
    (copy / "plan.txt").write_text("edited\n")
    try:
        load_run_for_eval(run, str(copy), cpu)
        out["mismatch"] = None
    except RunDirError as e:
        out["mismatch"] = str(e)
    shutil.rmtree(copy)
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("serving")
    data = write_stage2_shards(tmp / "data")
    result = run_multiprocess(_serve, 1, str(data), str(tmp / "run"))[0]
    return {"data": data, "run": tmp / "run", **result}


@pytest.mark.slow
def test_served_model_predicts_every_registered_task(served: dict[str, Any]) -> None:
    assert served["before_tasks"] == ["ctr", "cvr"]
    assert served["tasks"] == [("ctr", "click", ()), ("cvr", "purchase", ()), ("scen", "g", (1, 3))]
    assert served["keys"] == ["ctr", "cvr", "scen"]
    assert served["old_identical"], "old tasks' predictions changed by attaching the head"
    assert served["new_identical"], "served head differs from the trained one"
    assert served["frozen"] and not served["training"]
    assert served["streamed"] == [True]  # this job ran without the feature cache
    assert "was prompt-tuned on checkpoint" in served["mismatch"]


@pytest.mark.slow
def test_cli_registers_and_prompt_tunes_another_method(served: dict[str, Any],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    run = served["run"]
    cfg = run / "scen_fw.toml"
    cfg.write_text(TASK_TOML.replace('name = "scen"', 'name = "scen_fw"').replace('"mptrec"', '"fw"'))
    assert main(["tasks", "register", "--run", str(run), "--task-config", str(cfg)]) == 0
    assert main(["prompt-tune", "--run", str(run), "--task", "nope"]) == 1
    assert "'nope' is not registered" in capsys.readouterr().err
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mptrec.launch.cli", "prompt-tune", "--run", str(run), "--task", "scen_fw",
           "--set", "epochs=1", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reg = json.loads((run / "tasks.json").read_text())
    assert reg["tasks"]["scen_fw"]["status"] == "trained"
    assert reg["tasks"]["scen_fw"]["efficiency"]["method"] == "fw"
    assert main(["tasks", "list", "--run", str(run)]) == 0
    table = capsys.readouterr().out
    assert "scen_fw" in table and "prompt_tuned" in table and "trained" in table
    np.testing.assert_array_less(0, reg["tasks"]["scen_fw"]["efficiency"]["trainable_params"])
