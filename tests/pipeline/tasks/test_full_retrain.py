"""tasks/full_retrain.py and `mptrec prompt-tune --compare-full`: full retraining with the new task added."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dist import run_multiprocess
from tests.pipeline.tasks.test_prompt_tuning import _stage1, write_stage2_shards

REPO = Path(__file__).resolve().parents[3]


def test_full_retrain_config_adds_the_new_task() -> None:
    from mptrec.pipeline.config import DataConfig, NewTaskSpec, RunConfig, TaskSpec
    from mptrec.pipeline.tasks.full_retrain import full_retrain_config

    tasks = (TaskSpec("ctr", "click"), TaskSpec("cvr", "purchase"))
    run = RunConfig(name="r", data=DataConfig(path="d"), tasks=tasks)
    new = NewTaskSpec(name="scen", label="301", positive_values=(1, 3))
    cfg = full_retrain_config(run, new, "out/x")
    assert cfg.task_names == ["ctr", "cvr", "scen"] and cfg.tasks[2].positive_values == (1, 3)
    assert cfg.out_dir == "out/x" and cfg.train == run.train and cfg.data == run.data


def test_comparison_ratios_and_negative_transfer() -> None:
    from mptrec.pipeline.tasks.full_retrain import comparison

    eff = {"train_wall_s": 3.0, "eval_wall_s": 0.5, "feature_cache_wall_s": 0.5, "epochs_run": 4,
           "peak_rss_mib": 500.0, "trainable_params": 100, "full_model_params": 10_000}
    full = {"loop_wall_s": 20.0, "loop_wall_s_per_epoch": 5.0, "peak_rss_mib": 400.0, "epochs_run": 4,
            "world_size": 2, "best": {"auc": {"ctr": 0.70, "cvr": 0.75, "scen": 0.8}}}
    out = comparison(eff, full, {"ctr": 0.72, "cvr": None}, "scen", 0.78)
    assert out["stage2_loop_wall_s"] == 4.0 and out["wall_ratio"] == 0.2
    assert out["wall_per_epoch_ratio"] == 0.2
    change = out["old_task_auc_change"]
    assert abs(change["ctr"] - (-0.02)) < 1e-12 and change["cvr"] is None
    assert out["new_task_auc_full"] == 0.8 and out["new_task_auc_prompt_tuned"] == 0.78


@pytest.mark.slow
def test_compare_full_trains_the_joint_model_in_a_child_job_and_records_it(tmp_path: Path) -> None:
    data = write_stage2_shards(tmp_path / "data")
    run = tmp_path / "run"
    run_multiprocess(_stage1, 1, str(data), str(run))  # stage 1 and `scen` registered
    cmd = [sys.executable, "-m", "mptrec.launch.cli", "prompt-tune", "--run", str(run), "--task", "scen",
           "--set", "epochs=1", "--compare-full", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout[proc.stdout.index("{"):])
    entry = json.loads((run / "tasks.json").read_text())["tasks"]["scen"]
    recorded = entry["efficiency"]["full_retraining"]
    assert recorded == printed and entry["status"] == "trained"
    assert set(recorded["old_task_auc_change"]) == {"ctr", "cvr"}
    assert recorded["new_task_auc_full"] is not None
    assert recorded["full_world_size"] == 1 and recorded["wall_ratio"] > 0
    assert recorded["stage2_process_wall_s"] > 0 and recorded["process_wall_ratio"] > 0
    efficiency = json.loads((run / "tasks" / "scen" / "efficiency.json").read_text())
    assert efficiency == entry["efficiency"]
    full = run / "tasks" / "scen" / "full_retrain"
    assert (full / "config.json").is_file() and not (full / "checkpoints").exists()
    saved = json.loads((run / "tasks" / "scen" / "full_retrain_config.json").read_text())
    assert [t["name"] for t in saved["tasks"]] == ["ctr", "cvr", "scen"]


def test_compare_full_refuses_an_untrained_task(tmp_path: Path) -> None:
    from mptrec.launch.cmd_prompt_tune import compare_full
    from mptrec.pipeline.rundir import RunDirError
    from mptrec.pipeline.tasks.store import register_task
    from tests.pipeline.tasks.test_store import make_run, task_toml

    run = make_run(tmp_path)
    register_task(run, task_toml(tmp_path))
    with pytest.raises(RunDirError, match="is not trained yet"):
        compare_full(str(run), "scenario", 1)
    assert not (run / "tasks" / "scenario" / "full_retrain_config.json").exists()
