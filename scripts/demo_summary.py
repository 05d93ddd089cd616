"""Print the demo's closing summary: per-task AUC, the new task's parameter share, stage times."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(out: str) -> int:
    """Print the summary of the demo run in ``out``."""
    root = Path(out)
    report = json.loads((root / "eval.json").read_text())
    registry = json.loads((root / "tasks.json").read_text())
    schema = json.loads((root / "data" / "schema.json").read_text())
    bayes = schema.get("bayes_auc", {})
    print(f"Offline evaluation ({report.get('split', 'test')} split, {report.get('world_size')} processes, "
          f"exact AUC):")
    print(f"{'task':<10} {'role':<13} {'AUC':>7} {'Bayes AUC':>10} {'logloss':>8} {'rows':>8} "
          f"{'positives':>9}")
    for name, m in report["tasks"].items():
        entry = registry["tasks"].get(name, {})
        label = entry.get("label", {}).get("column", "")
        auc = "undef" if m["auc"] is None else f"{m['auc']:.4f}"
        b = bayes.get(label)
        print(f"{name:<10} {entry.get('role', '?'):<13} {auc:>7} {'' if b is None else f'{b:.4f}':>10} "
              f"{m['logloss']:>8.4f} {m['n']:>8} {m['positives']:>9}")
    for name, entry in registry["tasks"].items():
        eff = entry.get("efficiency") or {}
        if entry.get("role") == "prompt_tuned" and eff.get("trainable_params"):
            print(f"new task '{name}': {eff['trainable_params']:,} trainable of "
                  f"{eff['full_model_params']:,} parameters of the full three-task model "
                  f"({100 * eff['trainable_fraction']:.3f}%), {100 * eff['flops_fraction']:.1f}% of its "
                  f"forward FLOPs, {eff['wall_s_per_epoch']:.2f} s per epoch")
    times = (root / "stage_times.tsv").read_text().strip().splitlines()
    print("stage times:")
    for line in times:
        name, secs = line.split("\t")
        print(f"  {name:<48} {int(secs):>5} s")
    print(f"report: {root / 'report' / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "runs/demo"))
