from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from mptrec.launch.cli import main
from mptrec.pipeline.eval.evaluate import evaluate, write_report_json
from mptrec.pipeline.eval.report import PLOTS_MISSING, build_report, load_run, table2, table3
from tests.pipeline.eval.test_evaluate import FakeModel, make_batches


def _write(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _eval(aucs: dict[str, float | None]) -> dict[str, Any]:
    tasks = {t: {"auc": a, "logloss": 0.3, "calibration": 1.0, "n": 100, "positives": 10,
                 "positive_rate": 0.1} for t, a in aucs.items()}
    return {"tasks": tasks, "world_size": 1, "checkpoint": "best", "data": "D", "split": "test",
            "created": "2026-01-01T00:00:00+00:00", "rows": 100, "predictions": None}


def make_run(root: Path, name: str, model: str, seed: int, aucs: dict[str, float | None],
             new_task: dict[str, Any] | None = None, metrics: list[dict[str, Any]] | None = None) -> Path:
    run = root / name
    _write(run / "config.json", {"name": name, "model": {"name": model, "variant": "full"},
                                 "train": {"seed": seed},
                                 "tasks": [{"name": "income"}, {"name": "marital"}]})
    _write(run / "eval.json", _eval(aucs))
    if new_task is not None:
        _write(run / "tasks.json", {"base": {"run": name}, "tasks": {
            "income": {"role": "pretrained", "method": model, "metrics": {}, "efficiency": {}},
            "marital": {"role": "pretrained", "method": model, "metrics": {}, "efficiency": {}},
            **new_task}})
    if metrics is not None:
        (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return run


EDU = {"education": {"role": "prompt_tuned", "method": "mptrec", "metrics": {"test_auc": 0.5},
                     "efficiency": {"trainable_params": 27000, "trainable_fraction": 0.093,
                                    "flops_per_sample_trained": 7.0e6,
                                    "flops_per_sample_full": 8.0e7}}}
METRICS = [
    {"step": 10, "epoch": 0, "loss": 0.9, "losses": {"income": 0.5}, "lr": 1e-3, "samples_per_s": 1e4},
    {"step": 20, "epoch": 0, "loss": 0.7, "losses": {"income": 0.4}, "lr": 1e-3, "samples_per_s": 1e4},
    {"epoch": 0, "step": 20, "split": "valid", "auc": {"income": 0.90, "marital": None}},
    {"epoch": 1, "step": 40, "split": "valid", "auc": {"income": 0.92, "marital": 0.95}},
    {"epoch": 0, "step": 20, "cluster_sizes": [60, 40]},
    {"epoch": 1, "step": 40, "cluster_sizes": [55, 45]},
]


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    root = tmp_path / "runs"
    return [
        make_run(root, "st-s1", "single_task", 1, {"income": 0.940, "marital": 0.980}),
        make_run(root, "st-s2", "single_task", 2, {"income": 0.942, "marital": 0.982}),
        make_run(root, "mpt-s1", "mptrec", 1, {"income": 0.950, "marital": 0.990, "education": 0.860},
                 new_task=EDU, metrics=METRICS),
        make_run(root, "mpt-s2", "mptrec", 2, {"income": 0.952, "marital": 0.994, "education": 0.864},
                 new_task=EDU),
        make_run(root, "sb-s1", "shared_bottom", 1, {"income": 0.948, "marital": None}),
    ]


def test_table2_means_and_gains(runs: list[Path]) -> None:
    text = table2([load_run(r) for r in runs])
    lines = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()}
    assert "income AUC | income gain | marital AUC | marital gain" in lines["approach"]
    assert "| mptrec | 2 | 0.9510 ± 0.0014 | +0.0100 | 0.9920 ± 0.0028 | +0.0110 |" in text
    assert "| single_task | 2 | 0.9410 ± 0.0014 | - |" in lines["single_task"]
    # an undefined AUC (null) is left out, not counted as 0.5
    assert "| shared_bottom | 1 | 0.9480 | +0.0070 | - | - |" in text


def test_table3_new_task_rows(runs: list[Path]) -> None:
    text = table3([load_run(r) for r in runs])
    assert "| education | mptrec | mptrec | 2 | 0.8620 ± 0.0028 | 27.0k | 9.30% | 7.0M | 8.75% |" in text
    assert "†" not in text.split("\n\n")[0]  # the AUC came from eval.json, not the registry


def test_table3_falls_back_to_registry_auc_with_a_mark(tmp_path: Path) -> None:
    run = make_run(tmp_path, "m", "mptrec", 1, {"income": 0.9, "marital": 0.9}, new_task=EDU)
    text = table3([load_run(run)])
    assert "| 0.5000 † |" in text and "registry" in text


def test_report_with_plots(runs: list[Path], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    # a run with a real predictions file, produced by evaluate()
    run = runs[2]
    batches = make_batches([50, 50])
    for b in batches:
        b.labels = {"income": b.labels["ctr"], "marital": b.labels["cvr"]}

    def model(dense: Any, kjt: Any) -> dict[str, Any]:
        out = FakeModel()(dense, kjt)
        return {"income": out["ctr"], "marital": out["cvr"]}

    report = evaluate(model, batches, ["income", "marital"], dump_predictions=run / "pred.parquet",
                      progress=False)
    report["predictions"] = "pred.parquet"
    report["tasks"]["education"] = {"auc": 0.86, "logloss": 0.3, "calibration": 1.0, "n": 100,
                                    "positives": 10, "positive_rate": 0.1}
    write_report_json(report, run / "eval.json")
    out = tmp_path / "report"
    path = build_report(runs, out)
    md = path.read_text()
    for png in ("roc_income.png", "roc_marital.png", "training_loss.png", "valid_auc.png",
                "cluster_sizes_mpt-s1.png"):
        assert (out / png).stat().st_size > 1000, png
        assert f"]({png})" in md
    assert "## Table 2" in md and "## Table 3" in md and PLOTS_MISSING not in md
    assert not list(out.glob(".*tmp*"))


def test_report_without_matplotlib(runs: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    out = tmp_path / "report"
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert PLOTS_MISSING in md
    assert "| mptrec | 2 |" in md
    assert not list(out.glob("*.png"))


def test_report_errors_name_the_file(runs: list[Path], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    (runs[0] / "eval.json").unlink()
    assert main(["report", str(runs[0]), "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert "eval.json: not found" in err and "mptrec eval --run" in err
    (runs[1] / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        load_run(runs[1])


def test_duplicate_run_names_get_unique_ids(tmp_path: Path) -> None:
    a = make_run(tmp_path / "a", "run", "mmoe", 1, {"income": 0.9, "marital": 0.9})
    b = make_run(tmp_path / "b", "run", "mmoe", 2, {"income": 0.9, "marital": 0.9})
    md = build_report([a, b], tmp_path / "out").read_text()
    assert "| run |" in md and "| run-2 |" in md
