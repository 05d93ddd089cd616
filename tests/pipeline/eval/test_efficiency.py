"""Efficiency measurement helpers: FLOPs convention, parameter counts, memory, clock."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from mptrec.pipeline.eval.efficiency import EpochClock, ratio


def test_ratio() -> None:
    assert ratio(1, 4) == 0.25 and ratio(1, 0) is None


_RSS_PROBE = """
import json, subprocess, sys
import numpy as np
from mptrec.pipeline.eval.efficiency import peak_rss_mib
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
