"""The accuracy benchmark's Markdown report (``bench/accuracy.md``), from its results JSON.

Split from :mod:`mptrec.bench.accuracy` (which runs the jobs and computes the intervals).
"""

from __future__ import annotations

from typing import Any

__all__ = ["markdown"]


def _ci(c: dict[str, Any]) -> str:
    b = c["bootstrap"]
    return f"{c['mean_diff']:+.4f} [{b['ci_low']:+.4f}, {b['ci_high']:+.4f}]"


def markdown(results: dict[str, Any]) -> str:
    """The results as Markdown tables (embedded in the README)."""
    ran = len(results.get("jobs", []))
    lines = [f"# Accuracy benchmark\n\nMeasured with `{results['command']}` on {results['date']} "
             f"({results['machine']}); {ran} jobs run by this invocation in {results['wall_s'] / 60:.0f} min "
             "(finished jobs under --root are reused).\n"]
    if results.get("note"):
        lines.append(results["note"] + "\n")
    c = results.get("census")
    if c:
        lines += _census(c, results["census_seeds"])
    a = results.get("aliccp")
    if a:
        lines += _aliccp(a)
    return "\n".join(lines) + "\n"


def _census(c: dict[str, Any], seeds: list[Any]) -> list[str]:
    """The Census sections: Table 2 protocol (income, marital) and Table 3 (education)."""
    lines = [f"## Census, Table 2 protocol (T1 income, T2 marital; D_in 127), {len(seeds)} seeds\n",
             "Test AUC, mean ± std over seeds; Δ vs MPT-Rec = MPT-Rec − model, mean over seeds with a "
             "95% paired-bootstrap interval (test rows resampled, replicates averaged over seeds).\n",
             "| model | income AUC | Δ income (MPT-Rec − model) | marital AUC | Δ marital |",
             "| --- | --- | --- | --- | --- |"]
    for model, r in c["t2"].items():
        vs = c["t2_vs_mptrec"].get(model)
        lines.append(f"| {model} | {r['income']['mean']:.4f} ± {r['income']['std']:.4f} | "
                     f"{_ci(vs['income']) if vs else '-'} | {r['marital']['mean']:.4f} ± "
                     f"{r['marital']['std']:.4f} | {_ci(vs['marital']) if vs else '-'} |")
    for name, r in c["peers"].items():
        if "income" in r or "marital" in r:
            vs = c["t2_vs_mptrec"].get(f"rechub:{name}", {})
            cells = []
            for t in ("income", "marital"):
                cells += ([f"{r[t]['mean']:.4f} ± {r[t]['std']:.4f}", _ci(vs[t]) if t in vs else "-"]
                          if t in r else ["-", "-"])
            lines.append(f"| torch-rechub {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Census, Table 3 protocol (T3 education on backbones without it, D_in 123)\n",
              "| method | education AUC | Δ (MPT-Rec − method) |", "| --- | --- | --- |"]
    for method, r in c["t3"].items():
        vs = c["t3_vs_mptrec"].get(method)
        lines.append(f"| {method} | {r['mean']:.4f} ± {r['std']:.4f} | {_ci(vs) if vs else '-'} |")
    for name, r in c["peers"].items():
        if "education" in r:
            vs = c["t3_vs_mptrec"].get(f"rechub:{name}")
            lines.append(f"| torch-rechub {name} (from scratch) | {r['education']['mean']:.4f} ± "
                         f"{r['education']['std']:.4f} | {_ci(vs) if vs else '-'} |")
    lines.append("")
    return lines


def _aliccp(a: dict[str, Any]) -> list[str]:
    """The generated Ali-CCP section: test AUCs and their gaps to the planted Bayes AUC."""
    lines = ["## Generated Ali-CCP: test AUC and gap to the planted Bayes AUC\n",
             "Gap = Bayes AUC (every planted effect) − test AUC. The planted click model also "
             "uses the user id 101 and field 301, which are not inputs; the AUC of the planted "
             "probabilities with those two integrated out is in brackets (a lower bound of the "
             "best AUC reachable from the inputs). The row under each size is the planted model's "
             "own form fitted on the same train rows with the generator's priors "
             "(`python -m mptrec.bench.planted_reference`): the AUC a perfectly specified model "
             "reaches from that many rows.\n",
             "| rows | train rows | ctr AUC (gap) | cvr AUC (gap) | scenario, prompt-tuned (gap) |",
             "| --- | --- | --- | --- | --- |"]
    for rows, r in a.items():
        cells = [f"{r['tasks'][t]['test_auc']:.4f} ({r['tasks'][t]['gap']:+.4f})"
                 if t in r["tasks"] else "-" for t in ("ctr", "cvr", "scenario")]
        lines.append(f"| {int(rows):,} | {r['train_rows']:,} | " + " | ".join(cells) + " |")
        ref = r.get("planted_reference")
        if ref:
            cells = [f"{ref[t]['test_auc']:.4f} ({ref[t]['gap']:+.4f})" if t in ref else "-"
                     for t in ("ctr", "cvr", "scenario")]
            lines.append("| ↳ planted form, fitted (what the rows allow) | | " + " | ".join(cells) + " |")
    first = next(iter(a.values()))["tasks"]
    bounds = ", ".join(f"{t} {v['bayes_auc']:.4f} [{v['inputs_auc']:.4f}]" for t, v in first.items()
                       if v.get("bayes_auc") is not None and v.get("inputs_auc") is not None)
    lines += ["", f"Bayes AUC [input-reachable lower bound]: {bounds}.", ""]
    return lines
