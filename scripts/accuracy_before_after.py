"""Paired before/after test AUCs of two sets of accuracy-harness roots (Ali-CCP), over seeds.

Usage: ``python scripts/accuracy_before_after.py [--root DIR] [--after-task T=NAME] [--before-task T=NAME]
SEED...``; reads
``DIR/{before,after}-SEED/aliccp-1000k/run/test_predictions.parquet`` (see bench/accuracy.md).
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from mptrec.bench.stats import combine_seeds, compare, seed_summary

TASKS = ("ctr", "cvr", "scenario")


def load(path: str) -> dict[str, Any]:
    """The columns of a predictions file, rows sorted by ``sample_id``."""
    table = pq.read_table(path)
    order = np.argsort(table["sample_id"].to_numpy())
    return {c: table[c].to_numpy()[order] for c in table.schema.names}


def main() -> None:
    """Print, per task, the seeds' mean AUCs and the paired difference with its interval."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("seeds", nargs="+")
    parser.add_argument("--root", default="/work/accs")
    parser.add_argument("--after-task", action="append", default=[], metavar="TASK=NAME",
                        help="compare TASK of the before runs with task NAME of the after runs "
                             "(e.g. scenario=s_res3: the after runs' default head is registered as s_res3)")
    parser.add_argument("--before-task", action="append", default=[], metavar="TASK=NAME",
                        help="compare task NAME of the before runs as TASK (e.g. scenario=s_res3: the "
                             "before runs' head of the current config was registered as s_res3)")
    args = parser.parse_args()
    after_name = dict(item.split("=", 1) for item in args.after_task)
    before_name = dict(item.split("=", 1) for item in args.before_task)
    runs = {
        (side, s): load(f"{args.root}/{side}-{s}/aliccp-1000k/run/test_predictions.parquet")
        for side in ("before", "after")
        for s in args.seeds
    }
    for task in TASKS:
        per_seed = []
        for s in args.seeds:
            before, after = runs["before", s], runs["after", s]
            if not np.array_equal(before["sample_id"], after["sample_id"]):
                raise SystemExit(f"seed {s}: before and after were scored on different rows")
            y = after["label_" + task]
            a_task = after_name.get(task, task)
            b_task = before_name.get(task, task)
            per_seed.append(compare(y, after["logit_" + a_task], before["logit_" + b_task], n_boot=1000,
                                    seed=0))
        both = combine_seeds(per_seed)
        b_mean, b_std, _ = seed_summary([c["delong"]["auc_b"] for c in per_seed])
        a_mean, a_std, _ = seed_summary([c["delong"]["auc_a"] for c in per_seed])
        boot = both["bootstrap"]
        print(
            f"{task}: before {b_mean:.4f} ± {b_std or 0:.4f}  after {a_mean:.4f} ± {a_std or 0:.4f}  "
            f"after-before {both['mean_diff']:+.4f} [{boot['ci_low']:+.4f}, {boot['ci_high']:+.4f}] "
            f"(paired bootstrap, {len(args.seeds)} seeds)  per seed {[round(d, 4) for d in both['diffs']]}"
        )


if __name__ == "__main__":
    main()
