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
    serving_summary(root)
    return 0


def serving_summary(root: Path) -> None:
    """The exported artifact and how its predictions compare with ``mptrec eval``'s dump."""
    import numpy as np
    import pyarrow.parquet as pq

    manifest_path = root / "export" / "model" / "manifest.json"
    preds = root / "export" / "predictions.parquet"
    if not manifest_path.is_file() or not preds.is_file():
        return
    m = json.loads(manifest_path.read_text())
    tasks = [t["name"] for t in m["tasks"]]
    mib = m["program"]["bytes"] / 2**20
    print(f"serving artifact {manifest_path.parent}: tasks {tasks}, program {mib:.1f} MiB (tables "
          f"{m['tables']['dtype']}, {m['tables']['rows']:,} rows), checkpoint sha256 "
          f"{m['run']['checkpoint_sha256'][:12]}")
    got = pq.read_table(preds).to_pydict()
    ref_path = root / "predictions.parquet"
    where = f"predict: {len(got['sample_id'])} rows in {preds}"
    if not ref_path.is_file():
        print(where)
        return
    ref = pq.read_table(ref_path).to_pydict()
    if got["sample_id"] != ref["sample_id"]:
        print(f"{where}; NOT the rows of {ref_path}")
        return
    diffs = {}
    for t in tasks:
        x, y = np.asarray(got[f"{t}_logit"], np.float32), np.asarray(ref[f"logit_{t}"], np.float32)
        diffs[t] = float(np.abs(x - y).max())
    verdict = "equal bit for bit" if not any(diffs.values()) else f"max |dlogit| {diffs}"
    print(f"{where}; logits vs `mptrec eval --dump-predictions`: {verdict}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "runs/demo"))
