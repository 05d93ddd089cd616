"""Efficiency measurement helpers: FLOPs convention, parameter counts, memory, clock."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from mptrec.pipeline.efficiency import EpochClock, ratio


def test_ratio() -> None:
    assert ratio(1, 4) == 0.25 and ratio(1, 0) is None


_RSS_PROBE = """
import json, subprocess, sys
import numpy as np
from mptrec.pipeline.efficiency import peak_rss_mib
own0, kids0 = peak_rss_mib(), peak_rss_mib(children=True)
a = np.ones(200 * 2**20 // 8)  # 200 MiB, touched
own1 = peak_rss_mib()
child = "import numpy as np; b = np.ones(300 * 2**20 // 8); b += 1"
subprocess.run([sys.executable, "-c", child], check=True)
print(json.dumps([own0, own1, kids0, peak_rss_mib(children=True), peak_rss_mib()]))
"""


def test_peak_rss_grows_with_allocation_and_children() -> None:
    # In a fresh process, whose peak is not already above what the test allocates. Linux keeps
    # ru_maxrss across exec, and a child made by fork/vfork starts with its parent's resident
    # pages, so a probe started straight from a big pytest process inherits its peak (seen: 1.9
    # GiB). A small shell in between (which forks, not execs, the probe) resets it.
    hop = '"$0" -c "$1"; status=$?; exit $status'
    out = subprocess.run(["sh", "-c", hop, sys.executable, _RSS_PROBE], check=True, capture_output=True,
                         text=True)
    figures = json.loads(out.stdout.splitlines()[-1])
    own0, own1, kids0, kids1, own2 = figures
    assert 10 < own0 and 150 <= own1 - own0 <= 260, figures  # this process: +200 MiB (slack: paging)
    # RUSAGE_CHILDREN: the 300 MiB child (Linux counts what it shared with this process before exec)
    assert kids0 < 100 and 250 <= kids1 <= own1 + 400, figures
    assert own2 == own1, figures  # the child's memory is not this process's


def test_epoch_clock_summary() -> None:
    clock = EpochClock()
    for _ in range(2):
        with clock.epoch():
            time.sleep(0.01)
        with clock.evaluation():
            pass
    s = clock.summary()
    assert s["epochs_run"] == 2 and len(s["epoch_wall_s"]) == 2
    assert s["wall_s_per_epoch"] >= 0.01 and s["train_wall_s"] >= 0.02
    assert s["job_wall_s"] >= s["train_wall_s"]


def test_full_retrain_config_adds_the_new_task() -> None:
    from mptrec.pipeline.config import DataConfig, PromptTuneConfig, RunConfig, TaskSpec
    from mptrec.pipeline.efficiency import full_retrain_config

    tasks = (TaskSpec("ctr", "click"), TaskSpec("cvr", "purchase"))
    run = RunConfig(name="r", data=DataConfig(path="d"), tasks=tasks)
    new = PromptTuneConfig(name="scen", label="301", positive_values=(1, 3))
    cfg = full_retrain_config(run, new, "out/x")
    assert cfg.task_names == ["ctr", "cvr", "scen"] and cfg.tasks[2].positive_values == (1, 3)
    assert cfg.out_dir == "out/x" and cfg.train == run.train and cfg.data == run.data


def test_comparison_ratios_and_negative_transfer() -> None:
    from mptrec.pipeline.efficiency import comparison

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
