"""Accuracy benchmark: the models this pipeline trains, side by side with a library peer, over seeds.

``make accuracy`` (``python -m mptrec.bench.accuracy --out bench/accuracy.json``) runs, with the
``mptrec`` command line exactly as a user would:

- **census-t2** (paper Table 2): Single Task, Shared Bottom, MMoE, PLE and MPT-Rec on T1 income +
  T2 marital status, with ``education`` as an input (D_in 127), per seed;
- **census-t3** (paper Table 3): T3 education on backbones pre-trained *without* ``education``
  (D_in 123): MPT-Rec prompt tuning, MMoE\\* and PLE\\* on their own backbones, and a single-task
  model trained from scratch on the same inputs;
- **peers** (``--peers``): torch-rechub 0.9.0's SharedBottom / MMOE / PLE and single-task MLPs on
  the identical split and features (``bench/rechub_reference.py`` in its own venv, made by
  ``scripts/rechub_env.sh``; never a dependency of the package);
- **aliccp** (``--aliccp-rows``): generated Ali-CCP at several sizes; stage 1 with validation
  every few hundred steps, then T3 (field 301) by prompt tuning; test AUC against the planted
  Bayes AUC.

Each seed re-splits the Census file 80/10/10 with that seed. Every comparison is paired: the
same test rows, the same seed. Per pair it reports the mean difference over seeds with a 95%
interval from a paired bootstrap over test rows (replicates averaged across seeds) and from
DeLong's variance (:mod:`mptrec.bench.stats`). Finished runs are kept under ``--root`` and skipped
on a re-run, so an interrupted benchmark resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from mptrec.bench.accuracy_report import markdown
from mptrec.bench.harness import write_atomic
from mptrec.bench.stats import auc, combine_seeds, seed_summary
from mptrec.bench.stats import compare as compare_one

CENSUS_SEEDS = (1685480945, 1685463909, 1685477428)
CENSUS_FILE = "../shared/data/census/census-income.test.dev.data.gz"
PRETRAIN = "configs/census_pretrain.toml"
EDUCATION = "configs/tasks/census_education.toml"
ALICCP = "configs/aliccp_synth.toml"
SCENARIO = "configs/tasks/aliccp_scenario.toml"
T2_MODELS = ("single_task", "shared_bottom", "mmoe", "ple", "mptrec")
#: base model -> the new-task methods run on it (paper Table 3, and our mptrec_res / mptrec_emb /
#: mptrec_mlp)
T3_METHODS = {"mptrec": ("mptrec", "mptrec_res", "mptrec_emb", "mptrec_mlp"), "mmoe": ("mmoe*",),
              "ple": ("ple*",)}
#: spec section 7: the baselines use L2 3e-4 on Census
BASELINE_ARGS = ("--set", "model.r_dnn=3e-4")
RECHUB_VENV = os.environ.get("RECHUB_VENV", "runs/.rechub-venv")


@dataclass
class Harness:
    """Runs jobs (skipping finished ones) and collects per-seed test predictions."""

    root: Path
    mptrec: Sequence[str]
    extra: Sequence[str] = ()
    dry_run: bool = False
    log: list[dict[str, Any]] = field(default_factory=list)

    def run(self, argv: Sequence[str], done: Path, what: str) -> None:
        """Run ``argv`` unless ``done`` exists; the job's output goes to ``done``'s folder log."""
        if done.exists():
            return
        print(f"+ {' '.join(argv)}", file=sys.stderr, flush=True)
        if self.dry_run:
            return
        t0 = time.perf_counter()
        log_path = self.root / "logs" / f"{what}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("w") as fh:
            proc = subprocess.run(list(argv), stdout=fh, stderr=subprocess.STDOUT, check=False)
        if proc.returncode != 0:
            tail = log_path.read_text().splitlines()[-15:]
            raise RuntimeError(f"{what}: exit {proc.returncode}; last lines of {log_path}:\n"
                               + "\n".join(tail))
        self.log.append({"job": what, "seconds": round(time.perf_counter() - t0, 1)})

    def train(self, run_dir: Path, config: str, sets: Sequence[str], what: str) -> None:
        """Stage 1, then the test-split evaluation with predictions."""
        self.run([*self.mptrec, "train", "--config", config, "--set", f"out_dir={run_dir}", *sets,
                  *self.extra], run_dir / "checkpoints" / "best", what)

    def new_task(self, run_dir: Path, task_config: str, sets: Sequence[str], what: str,
                 task: str | None = None) -> None:
        """Register and prompt-tune a new task on a finished run (``task``: its name if overridden)."""
        name = task or _toml_name(task_config)
        self.run([*self.mptrec, "tasks", "register", "--run", str(run_dir), "--task-config", task_config,
                  *sets], run_dir / "tasks" / name / "task.json", f"{what}-register")
        self.run([*self.mptrec, "prompt-tune", "--run", str(run_dir), "--task", name],
                 run_dir / "tasks" / name / "head.pt", f"{what}-tune")

    def evaluate(self, run_dir: Path, what: str) -> Path:
        """Exact test AUC of every task of the run; returns the predictions file."""
        preds = run_dir / "test_predictions.parquet"
        self.run([*self.mptrec, "eval", "--run", str(run_dir), "--checkpoint", "best", "--split", "test",
                  "--out", str(run_dir / "test_eval.json"), "--dump-predictions", str(preds)],
                 preds, f"{what}-eval")
        return preds


def _toml_name(path: str) -> str:
    import tomllib

    with open(path, "rb") as fh:
        return str(tomllib.load(fh)["name"])


# --------------------------------------------------------------------------------------------
# Predictions and comparisons
# --------------------------------------------------------------------------------------------


def load_predictions(path: Path, labels_from: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
                     ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """task -> (labels, scores), rows in test-split file order.

    Our dumps (``mptrec eval --dump-predictions``) hold ``sample_id``, ``label_<task>`` and
    ``logit_<task>``. Peer dumps (``bench/rechub_reference.py``) hold ``row`` and one probability
    column per label column (``education_label`` is the task ``education``); their labels come
    from ``labels_from``, our predictions on the same rows.
    """
    table = pq.read_table(path).to_pydict()
    if "sample_id" in table:
        order = np.argsort(np.asarray(table["sample_id"]), kind="stable")
        return {c[len("logit_"):]: (np.asarray(table[f"label_{c[len('logit_'):]}"])[order],
                                    np.asarray(table[c])[order])
                for c in table if c.startswith("logit_")}
    order = np.argsort(np.asarray(table["row"]), kind="stable")
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for col in table:
        if col == "row":
            continue
        task = col.removesuffix("_label")
        if labels_from is None or task not in labels_from:
            raise ValueError(f"{path}: no labels for peer column {col!r}")
        y = labels_from[task][0]
        if len(y) != len(order):
            raise ValueError(f"{path}: {len(order)} rows, but the test split has {len(y)}")
        out[task] = (y, np.asarray(table[col])[order])
    return out


def compare(
    preds_a: Sequence[dict[str, tuple[np.ndarray, np.ndarray]]],
    preds_b: Sequence[dict[str, tuple[np.ndarray, np.ndarray]]],
    task_a: str,
    task_b: str | None = None,
    n_boot: int = 1000,
) -> dict[str, Any]:
    """Paired comparison A - B over seeds (same rows per seed): mean, per-seed diffs, intervals."""
    task_b = task_b or task_a
    per_seed = []
    for i, (pa_, pb_) in enumerate(zip(preds_a, preds_b)):
        ya, sa = pa_[task_a]
        yb, sb = pb_[task_b]
        if len(ya) != len(yb) or not np.array_equal(ya, yb):
            raise ValueError(f"seed #{i}: the two models were scored on different rows or labels "
                             f"({len(ya)} vs {len(yb)} rows)")
        per_seed.append(compare_one(ya, sa, sb, n_boot=n_boot, seed=i))
    return _jsonable(combine_seeds(per_seed))


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, np.ndarray):
            if v.size > 8:
                continue
            v = v.tolist()
        if isinstance(v, dict):
            v = _jsonable(v)
        elif isinstance(v, float | np.floating):
            v = round(float(v), 6)
        elif isinstance(v, tuple | list):
            v = [round(float(x), 6) if isinstance(x, float | np.floating) else x for x in v]
        out[k] = v
    return out


def auc_table(preds: Sequence[dict[str, tuple[np.ndarray, np.ndarray]]], task: str) -> dict[str, Any]:
    """Per-seed test AUCs of one task and their mean and std."""
    vals = [float(auc(*p[task])) for p in preds]
    mean, std, n = seed_summary(vals)
    return {"per_seed": [round(v, 5) for v in vals], "mean": round(mean, 5),
            "std": round(std, 5) if std is not None else 0.0, "n": n}


# --------------------------------------------------------------------------------------------
# Protocols
# --------------------------------------------------------------------------------------------


def census(h: Harness, seeds: Sequence[int], census_file: str, peers: bool,
           n_boot: int) -> dict[str, Any]:
    """Census Table 2 and Table 3 protocols (and the peers) over ``seeds``."""
    t2: dict[str, list[dict[str, Any]]] = {m: [] for m in T2_MODELS}
    t3: dict[str, list[dict[str, Any]]] = {}
    peer2: dict[str, list[dict[str, Any]]] = {}
    for seed in seeds:
        data = h.root / f"census-s{seed}" / "data"
        h.run([*h.mptrec, "data", "convert", "--format", "census", "--input", census_file,
               "--split", "train=0.8,valid=0.1,test=0.1", "--seed", str(seed), "--out", str(data)],
              data / "schema.json", f"census-s{seed}-data")
        common = [f"data.path={data}", f"train.seed={seed}"]
        for model in T2_MODELS:  # Table 2: education is an input (D_in 127)
            rd = h.root / f"census-s{seed}" / f"t2-{model}"
            sets = _sets(*common, f"model.name={model}", "features.exclude=[]")
            sets += list(BASELINE_ARGS) if model != "mptrec" else []
            h.train(rd, PRETRAIN, sets, f"census-s{seed}-t2-{model}")
            t2[model].append(_maybe(h, rd, f"census-s{seed}-t2-{model}"))
        for model, methods in T3_METHODS.items():  # Table 3: backbones without education (D_in 123)
            rd = h.root / f"census-s{seed}" / f"t3-{model}"
            sets = _sets(*common, f"model.name={model}")
            sets += list(BASELINE_ARGS) if model != "mptrec" else []
            h.train(rd, PRETRAIN, sets, f"census-s{seed}-t3-{model}")
            for i, method in enumerate(methods):  # the first keeps the config's task name
                name = ["name=education"] if i == 0 else [f"name=education_{method.rstrip('*')}"]
                h.new_task(rd, EDUCATION, _sets(f"seed={seed}", f'method="{method}"', *name),
                           f"census-s{seed}-t3-{model}-{method.rstrip('*')}", task=name[0][5:])
            preds = _maybe(h, rd, f"census-s{seed}-t3-{model}")
            for i, method in enumerate(methods):
                task = "education" if i == 0 else f"education_{method.rstrip('*')}"
                t3.setdefault(method, []).append({"education": preds[task]} if preds else {})
        rd = h.root / f"census-s{seed}" / "t3-scratch"  # single-task education from scratch, D_in 123
        h.train(rd, PRETRAIN, _sets(*common, "model.name=single_task", *BASELINE_ARGS[1::2],
                                    'tasks=[{name="education", label="education_label"}]'),
                f"census-s{seed}-t3-scratch")
        t3.setdefault("scratch", []).append(_maybe(h, rd, f"census-s{seed}-t3-scratch"))
        labels = {**t3["scratch"][-1], **t2["mptrec"][-1]} if not h.dry_run else {}
        if peers:
            for exclude, models in (("", "shared_bottom,mmoe,ple,single_income,single_marital"),
                                    ("education", "single_education")):
                out = h.root / f"census-s{seed}" / f"rechub{'-' + exclude if exclude else ''}"
                argv = [f"{RECHUB_VENV}/bin/python", "bench/rechub_reference.py", "--data", str(data),
                        "--seed", str(seed), "--models", models, "--out", str(out / "result.json"),
                        "--predictions", str(out)]
                if exclude:
                    argv += ["--exclude", exclude]
                h.run(argv, out / "result.json", f"census-s{seed}-rechub{'-' + exclude if exclude else ''}")
                if not h.dry_run:
                    for f in sorted(out.glob("*.parquet")):
                        peer2.setdefault(f.stem, []).append(load_predictions(f, labels))
    if h.dry_run:
        return {}
    return _census_report(t2, t3, peer2, n_boot)


def _sets(*items: str) -> list[str]:
    out: list[str] = []
    for it in items:
        out += ["--set", it]
    return out


def _maybe(h: Harness, run_dir: Path, what: str) -> dict[str, Any]:
    if h.dry_run:
        return {}
    return load_predictions(h.evaluate(run_dir, what))


def _census_report(t2: dict[str, list[Any]], t3: dict[str, list[Any]], peers: dict[str, list[Any]],
                   n_boot: int) -> dict[str, Any]:
    res: dict[str, Any] = {"t2": {}, "t3": {}, "peers": {}, "t2_vs_mptrec": {}, "t3_vs_mptrec": {}}
    for model, preds in t2.items():
        res["t2"][model] = {t: auc_table(preds, t) for t in ("income", "marital")}
    for method, preds in t3.items():
        res["t3"][method] = auc_table(preds, "education")
    for name, preds in peers.items():
        res["peers"][name] = {t: auc_table(preds, t) for t in preds[0]}
    for model in T2_MODELS[:-1]:
        res["t2_vs_mptrec"][model] = {t: compare(t2["mptrec"], t2[model], t, n_boot=n_boot)
                                      for t in ("income", "marital")}
    for name, preds in peers.items():
        if len(preds) != len(t2["mptrec"]):
            continue
        for t in preds[0]:
            if t in ("income", "marital"):
                res["t2_vs_mptrec"][f"rechub:{name}"] = {
                    **res["t2_vs_mptrec"].get(f"rechub:{name}", {}),
                    t: compare(t2["mptrec"], preds, t, n_boot=n_boot)}
            elif t == "education":
                res["t3_vs_mptrec"][f"rechub:{name}"] = compare(t3["mptrec"], preds, "education",
                                                                n_boot=n_boot)
    for method, preds in t3.items():
        if method != "mptrec":
            res["t3_vs_mptrec"][method] = compare(t3["mptrec"], preds, "education", n_boot=n_boot)
    return res


def aliccp(h: Harness, rows_list: Sequence[int], seed: int, validate_every: int) -> dict[str, Any]:
    """Generated Ali-CCP learning curve: test AUC vs the planted Bayes AUC at each size."""
    out: dict[str, Any] = {}
    for rows in rows_list:
        tag = f"aliccp-{rows // 1000}k"
        data = h.root / tag / "data"
        h.run([*h.mptrec, "data", "synth", "--dataset", "aliccp", "--rows", str(rows), "--click-rate", "0.2",
               "--purchase-rate", "0.1", "--shards", "4", "--row-group-size", "8192", "--seed", str(seed),
               "--out", str(data)], data / "schema.json", f"{tag}-data")
        ref = h.root / tag / "planted_reference.json"  # the same form as the generator, fitted
        h.run([sys.executable, "-m", "mptrec.bench.planted_reference", "--data", str(data),
               "--out", str(ref)], ref, f"{tag}-planted-reference")
        rd = h.root / tag / "run"
        every = max(1, validate_every * rows // 1_000_000)  # the same number of points per epoch
        h.train(rd, ALICCP, _sets(f"data.path={data}", f"train.validate_every={every}",
                                  "train.checkpoint_every=0"), f"{tag}-train")
        h.new_task(rd, SCENARIO, [], f"{tag}-scenario")
        if h.dry_run:
            continue
        h.evaluate(rd, tag)
        report = json.loads((rd / "test_eval.json").read_text())
        schema = json.loads((data / "schema.json").read_text())
        bayes = schema.get("bayes_auc", {})
        seen = schema.get("bayes_auc_inputs", {})
        label_of = {"ctr": "click", "cvr": "purchase", "scenario": "301"}
        valid = [json.loads(line) for line in (rd / "metrics.jsonl").read_text().splitlines()
                 if '"split": "valid"' in line]
        fitted = json.loads(ref.read_text())["test"]
        out[str(rows)] = {
            "train_rows": int(sum(schema["splits"]["train"]["rows"])),
            "planted_reference": {t: {"test_auc": fitted[t], "gap": round(bayes[label_of[t]] - fitted[t], 5)}
                                  for t in fitted if label_of.get(t) in bayes},
            "tasks": {t: {"test_auc": round(v["auc"], 5), "bayes_auc": bayes.get(label_of.get(t, t)),
                          "inputs_auc": seen.get(label_of.get(t, t)),
                          "gap": (round(bayes[label_of[t]] - v["auc"], 5) if label_of.get(t) in bayes
                                  else None)}
                      for t, v in report["tasks"].items()},
            "valid_curve": [{"step": r["step"], "auc": {k: round(x, 4) for k, x in r["auc"].items()}}
                            for r in valid],
        }
    return out


def _without_note(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--note":
            skip = True
        elif not a.startswith("--note="):
            out.append(a)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mptrec.bench.accuracy``."""
    p = argparse.ArgumentParser(prog="python -m mptrec.bench.accuracy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="results JSON (the Markdown goes next to it as .md)")
    p.add_argument("--root", default="runs/accuracy",
                   help="where data and runs go (kept; re-runs skip done jobs)")
    p.add_argument("--seeds", type=int, nargs="+", default=list(CENSUS_SEEDS), help="Census seeds")
    p.add_argument("--census-file", default=CENSUS_FILE, help="the UCI Census file split per seed")
    p.add_argument("--no-census", action="store_true", help="skip the Census protocols")
    p.add_argument("--peers", action="store_true",
                   help="also run torch-rechub (scripts/rechub_env.sh first)")
    p.add_argument("--aliccp-rows", type=int, nargs="*", default=[],
                   help="generated Ali-CCP sizes, e.g. 1000000 4000000 16000000")
    p.add_argument("--aliccp-seed", type=int, default=1)
    p.add_argument("--validate-every", type=int, default=400,
                   help="Ali-CCP validation interval (steps) at 1M rows; scaled with the row count, so "
                   "every size validates as often per epoch (2 at batch 1000)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates per seed and pair")
    p.add_argument("--set", dest="extra", action="append", default=[],
                   help="extra --set KEY=VALUE for every stage-1 run (e.g. train.threads=1)")
    p.add_argument("--note", default="", help="a paragraph for the report's header (how the jobs ran)")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = p.parse_args(argv)
    mptrec = [sys.executable, "-m", "mptrec.launch.cli"]
    h = Harness(Path(args.root), mptrec, extra=_sets(*args.extra), dry_run=args.dry_run)
    t0 = time.perf_counter()
    results: dict[str, Any] = {
        "command": "python -m mptrec.bench.accuracy " + " ".join(_without_note(
            list(argv if argv is not None else sys.argv[1:]))),
        "date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPU cores",
        "census_seeds": list(args.seeds), "note": args.note,
    }
    if not args.no_census:
        if not Path(args.census_file).is_file():
            print(f"accuracy: Census file {args.census_file} not found (pass --census-file or --no-census)",
                  file=sys.stderr)
            return 2
        results["census"] = census(h, args.seeds, args.census_file, args.peers, args.bootstrap)
    if args.aliccp_rows:
        results["aliccp"] = aliccp(h, args.aliccp_rows, args.aliccp_seed, args.validate_every)
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    results["jobs"] = h.log
    if args.dry_run:
        return 0
    out = Path(args.out)
    write_atomic(out, json.dumps(results, indent=1) + "\n")
    write_atomic(out.with_suffix(".md"), markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
