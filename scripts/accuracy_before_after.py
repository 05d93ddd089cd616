# Paired before/after test AUCs of two accuracy-harness roots (Ali-CCP), over training seeds.
# Usage: python scripts/accuracy_before_after.py SEED... (reads /work/accs/{before,after}-SEED/; see bench/accuracy.md)
import json, sys, numpy as np, pyarrow.parquet as pq
from mptrec.bench.stats import compare, combine_seeds, seed_summary
seeds = [s for s in sys.argv[1:]]
def load(p):
    t = pq.read_table(p); o = np.argsort(t["sample_id"].to_numpy())
    return {c: t[c].to_numpy()[o] for c in t.schema.names}
rows = {}
for t in ["ctr", "cvr", "scenario"]:
    per, aucs = [], {"before": [], "after": []}
    for s in seeds:
        b = load(f"/work/accs/before-{s}/aliccp-1000k/run/test_predictions.parquet")
        a = load(f"/work/accs/after-{s}/aliccp-1000k/run/test_predictions.parquet")
        assert (a["sample_id"] == b["sample_id"]).all()
        c = compare(a["label_" + t], a["logit_" + t], b["logit_" + t], n_boot=1000, seed=0)
        per.append(c); aucs["after"].append(c["delong"]["auc_a"]); aucs["before"].append(c["delong"]["auc_b"])
    comb = combine_seeds(per)
    bm, bs, _ = seed_summary(aucs["before"]); am, as_, _ = seed_summary(aucs["after"])
    boot = comb["bootstrap"]
    print(f"{t}: before {bm:.4f} ± {bs or 0:.4f}  after {am:.4f} ± {as_ or 0:.4f}  "
          f"after-before {comb['mean_diff']:+.4f} [{boot['ci_low']:+.4f}, {boot['ci_high']:+.4f}] (paired bootstrap, {len(seeds)} seeds)  "
          f"per seed {[round(x,4) for x in comb['diffs']]}")
