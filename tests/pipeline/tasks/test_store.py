"""Task registry: format, lazy creation, validation failures leave tasks.json byte-identical."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mptrec.launch.cli import main
from mptrec.pipeline.config import (
    DataConfig,
    FeaturesConfig,
    ModelConfig,
    RunConfig,
    TaskSpec,
    write_resolved,
)
from mptrec.pipeline.rundir import RunDirError, hash_checkpoint
from mptrec.pipeline.tasks.checks import check_base_unchanged
from mptrec.pipeline.tasks.store import (
    format_table,
    load_task_store,
    prompt_config,
    record_result,
    register_task,
)

REPO = Path(__file__).resolve().parents[3]

SCHEMA = {
    "dataset": "aliccp", "version": 1,
    "features": [
        {"name": "101", "column": "101", "kind": "sparse", "num_embeddings": 50, "multivalent": False},
        {"name": "205", "column": "205", "kind": "sparse", "num_embeddings": 20, "multivalent": False},
        {"name": "206", "column": "206", "kind": "sparse", "num_embeddings": 10, "multivalent": False},
        {"name": "301", "column": "301", "kind": "sparse", "num_embeddings": 4, "multivalent": False},
    ],
    "labels": {"click": {"values": [0, 1]}, "purchase": {"values": [0, 1]}, "301": {"values": [1, 2, 3]}},
    "splits": {"train": {"files": ["train/part-00000.parquet"], "rows": [10]}},
}


def make_run(tmp_path: Path, *, model: str = "mptrec", exclude: tuple[str, ...] = ("101", "301")) -> Path:
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    (data / "schema.json").write_text(json.dumps(SCHEMA))
    (data / "train" / "part-00000.parquet").write_bytes(b"")
    run = tmp_path / "run"
    cfg = RunConfig(
        name="toy", data=DataConfig(path=str(data)), out_dir=str(run),
        tasks=(TaskSpec("ctr", "click"), TaskSpec("cvr", "purchase")),
        features=FeaturesConfig(embedding_dim=4, exclude=exclude),
        model=ModelConfig(name=model, expert_hidden=(8, 4), tower_hidden=(4,)),
    )
    write_resolved(cfg, run / "config.json")
    best = run / "checkpoints" / "best"
    best.mkdir(parents=True)
    (best / "__0_0.distcp").write_bytes(b"weights-0")
    (best / ".metadata").write_bytes(b"dcp-metadata")
    (best / "meta.json").write_text("{}")
    return run


def task_toml(tmp_path: Path, **kw: object) -> Path:
    fields = {"name": "scenario", "label": "301", "positive_values": [1, 3], "method": "mptrec",
              "exclude_features": ["101", "301"], "epochs": 2}
    fields.update(kw)
    lines = [f"{k} = {json.dumps(v)}" for k, v in fields.items()]
    p = tmp_path / f"task-{len(list(tmp_path.glob('task-*')))}.toml"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_register_creates_registry_with_pretrained_tasks(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    entry = register_task(run, task_toml(tmp_path))
    reg = json.loads((run / "tasks.json").read_text())
    assert reg["version"] == 1
    assert reg["base"]["run"] == "toy" and reg["base"]["model"] == "mptrec"
    assert reg["base"]["checkpoint"] == "checkpoints/best"
    assert reg["base"]["checkpoint_sha256"] == hash_checkpoint(run / "checkpoints" / "best")
    assert list(reg["tasks"]) == ["ctr", "cvr", "scenario"]
    assert reg["tasks"]["ctr"]["role"] == "pretrained" and reg["tasks"]["ctr"]["status"] == "trained"
    assert reg["tasks"]["ctr"]["label"] == {"column": "click", "positive_values": []}
    assert entry == reg["tasks"]["scenario"]
    assert entry["role"] == "prompt_tuned" and entry["status"] == "registered"
    assert entry["label"] == {"column": "301", "positive_values": [1, 3]}
    assert entry["base_checkpoint_sha256"] == reg["base"]["checkpoint_sha256"]
    assert entry["artifact"] == "tasks/scenario/head.pt"
    assert (run / "tasks" / "scenario" / "task.toml").is_file()
    cfg, _ = prompt_config(run, "scenario", ["epochs=7"])
    assert cfg.epochs == 7 and cfg.positive_values == (1, 3)
    assert not list(run.rglob("*.tmp*"))


def test_shipped_task_configs_load() -> None:
    from mptrec.pipeline.config import load_task_config

    files = sorted((REPO / "configs" / "tasks").glob("*.toml"))
    names = {load_task_config(f).name: load_task_config(f) for f in files}
    assert names["scenario"].label == "301" and names["scenario"].positive_values == (1, 3)
    assert names["scenario"].exclude_features == ("101", "301")
    assert names["education"].label == "education_label"
    assert names["education"].exclude_features == ("education",)


def test_shipped_scenario_config_registers_on_aliccp_like_run(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    entry = register_task(run, REPO / "configs" / "tasks" / "aliccp_scenario.toml")
    assert entry["name"] == "scenario" and entry["method"] == "mptrec_mlp"
    assert prompt_config(run, "scenario")[0].offset_max_rows == 10_000
    entry = register_task(run, REPO / "configs" / "tasks" / "aliccp_scenario_fw.toml")
    assert entry["method"] == "fw"


@pytest.mark.parametrize(
    ("kw", "model", "exclude", "message"),
    [
        ({"label": "no_such_column"}, "mptrec", ("101", "301"), "label column 'no_such_column'"),
        ({"name": "ctr"}, "mptrec", ("101", "301"), "name 'ctr' is taken by a pretrained task"),
        ({"method": "mmoe*"}, "mptrec", ("101", "301"), "method 'mmoe*' does not fit base model 'mptrec'"),
        ({}, "mmoe", ("101", "301"), "method 'mptrec' does not fit base model 'mmoe'"),
        ({}, "mptrec", ("101",), "exclude_features ['301'] are inputs of the base model"),
        ({"exclude_features": ["101"]}, "mptrec", ("101",), "label column '301' is an input feature"),
        ({"exclude_features": ["999"]}, "mptrec", ("101", "301"), "['999'] are not features"),
        ({"positive_values": [7]}, "mptrec", ("101", "301"), "positive_values [7] never occur"),
        ({"positive_values": []}, "mptrec", ("101", "301"), "set positive_values"),
        ({"lr": -1.0}, "mptrec", ("101", "301"), "lr must be > 0"),
        ({"unknown_key": 1}, "mptrec", ("101", "301"), "unknown key 'unknown_key'"),
    ],
)
def test_bad_registration_fails_clearly_and_leaves_registry_identical(
        tmp_path: Path, kw: dict[str, object], model: str, exclude: tuple[str, ...], message: str) -> None:
    run = make_run(tmp_path, model=model, exclude=exclude)
    first = {"name": "first", "label": "purchase", "positive_values": [], "exclude_features": []}
    register_task(run, task_toml(tmp_path, **first, method="mptrec" if model == "mptrec" else "mmoe*"))
    before = (run / "tasks.json").read_bytes()
    files_before = sorted(p.relative_to(run).as_posix() for p in run.rglob("*"))
    with pytest.raises(RunDirError) as exc:
        register_task(run, task_toml(tmp_path, **kw))
    assert message in str(exc.value)
    assert (run / "tasks.json").read_bytes() == before
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*")) == files_before


def test_failure_without_registry_writes_nothing(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    with pytest.raises(RunDirError, match="label column 'nope'"):
        register_task(run, task_toml(tmp_path, label="nope"))
    assert not (run / "tasks.json").exists()
    assert not (run / "tasks").exists()


def test_name_clash_with_new_task(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    register_task(run, task_toml(tmp_path))
    with pytest.raises(RunDirError, match="name 'scenario' is taken by a prompt_tuned task"):
        register_task(run, task_toml(tmp_path))


def test_changed_base_checkpoint_is_refused(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    register_task(run, task_toml(tmp_path))
    reg = load_task_store(run)
    assert check_base_unchanged(run, reg, "scenario") == run / "checkpoints" / "best"
    before = (run / "tasks.json").read_bytes()
    (run / "checkpoints" / "best" / "__0_0.distcp").write_bytes(b"weights-1")
    with pytest.raises(RunDirError, match="changed since registration"):
        register_task(run, task_toml(tmp_path, name="other"))
    with pytest.raises(RunDirError, match="changed since registration"):
        check_base_unchanged(run, reg, "scenario")
    assert (run / "tasks.json").read_bytes() == before


def test_missing_checkpoint_and_missing_run(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    with pytest.raises(RunDirError, match=r"checkpoint 'step-9' .*not found.*available: \['best'\]"):
        register_task(run, task_toml(tmp_path), checkpoint="step-9")
    with pytest.raises(RunDirError, match="config.json: not found"):
        register_task(tmp_path / "nowhere", task_toml(tmp_path))


def test_hash_covers_names_and_contents(tmp_path: Path) -> None:
    d = tmp_path / "c"
    d.mkdir()
    (d / "a").write_bytes(b"xy")
    h0 = hash_checkpoint(d)
    (d / "a").rename(d / "b")
    h1 = hash_checkpoint(d)
    (d / "b").write_bytes(b"xz")
    h2 = hash_checkpoint(d)
    assert len({h0, h1, h2}) == 3
    (d / "b").write_bytes(b"xy")
    assert hash_checkpoint(d) == h1


def test_record_result_and_table(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    register_task(run, task_toml(tmp_path))
    record_result(run, "scenario", metrics={"valid_auc": 0.8123},
                  efficiency={"trainable_params": 8129, "trainable_fraction": 0.00153})
    reg = load_task_store(run)
    assert reg["tasks"]["scenario"]["status"] == "trained"
    table = format_table(reg)
    lines = table.splitlines()
    assert lines[1].split()[:4] == ["name", "role", "method", "status"]
    row = next(line for line in lines if line.startswith("scenario"))
    assert "0.8123" in row and "8,129" in row and "tasks/scenario/head.pt" in row
    with pytest.raises(RunDirError, match="'nope' is not registered"):
        record_result(run, "nope")


def test_cli_list_and_register(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run(tmp_path)
    assert main(["tasks", "list", "--run", str(run)]) == 0
    out = capsys.readouterr().out
    assert "ctr" in out and "pretrained" in out and not (run / "tasks.json").exists()
    cfg = task_toml(tmp_path)
    assert main(["tasks", "register", "--run", str(run), "--task-config", str(cfg), "--set", "epochs=3"]) == 0
    assert "registered task 'scenario'" in capsys.readouterr().out
    assert json.loads((run / "tasks" / "scenario" / "task.json").read_text())["epochs"] == 3
    before = (run / "tasks.json").read_bytes()
    assert main(["tasks", "register", "--run", str(run), "--task-config", str(cfg)]) == 1
    assert "is taken" in capsys.readouterr().err
    assert (run / "tasks.json").read_bytes() == before


def test_artifact_hash_ties_the_entry_to_the_head_bytes(tmp_path: Path) -> None:
    from mptrec.pipeline.rundir import file_sha256
    from mptrec.pipeline.tasks.store import check_artifact

    run = make_run(tmp_path)
    register_task(run, task_toml(tmp_path))
    head = run / "tasks" / "scenario" / "head.pt"
    with pytest.raises(RunDirError, match=r"artifact .*head.pt is missing"):
        check_artifact(run, load_task_store(run)["tasks"]["scenario"])
    head.write_bytes(b"head-v1")
    record_result(run, "scenario", metrics={"valid_auc": 0.7}, artifact_sha256=file_sha256(head))
    assert check_artifact(run, load_task_store(run)["tasks"]["scenario"]) == head
    head.write_bytes(b"head-v2")  # a re-run died after replacing the head, before the registry update
    with pytest.raises(RunDirError, match=r"is not the one registered \(sha256"):
        check_artifact(run, load_task_store(run)["tasks"]["scenario"])


def test_id_reading_method_needs_a_single_valued_input(tmp_path: Path) -> None:
    run = make_run(tmp_path / "single")
    assert register_task(run, task_toml(tmp_path, method="mptrec_emb"))["method"] == "mptrec_emb"
    listed = make_run(tmp_path / "listed")
    schema = json.loads((tmp_path / "listed" / "data" / "schema.json").read_text())
    schema["features"].append({"name": "210", "column": "210", "kind": "sparse", "num_embeddings": 8,
                               "multivalent": True, "pooling": "mean"})
    (tmp_path / "listed" / "data" / "schema.json").write_text(json.dumps(schema))
    register_task(listed, task_toml(tmp_path, method="mptrec_res"))
    # a list input among single-valued ones: the offsets cover the single-valued ones
    assert register_task(listed, task_toml(tmp_path, name="scenario2", method="mptrec_emb"))["method"] \
        == "mptrec_emb"
    only_lists = make_run(tmp_path / "lists")
    schema = json.loads((tmp_path / "lists" / "data" / "schema.json").read_text())
    for f in schema["features"]:
        if f["kind"] == "sparse":
            f.update(multivalent=True, pooling="mean")
    (tmp_path / "lists" / "data" / "schema.json").write_text(json.dumps(schema))
    with pytest.raises(RunDirError, match=r"method 'mptrec_emb' .* all list features"):
        register_task(only_lists, task_toml(tmp_path, name="scenario3", method="mptrec_emb"))


def test_offset_max_rows_is_checked_at_registration_and_kept(tmp_path: Path) -> None:
    run = make_run(tmp_path / "r")  # single-valued inputs 205 (20 rows) and 206 (10 rows)
    with pytest.raises(RunDirError, match=r"offset_max_rows = 15 applies to the methods with per-id "
                                          r"offsets \['mptrec_emb', 'mptrec_mlp'\], not 'mptrec_res'"):
        register_task(run, task_toml(tmp_path, method="mptrec_res", offset_max_rows=15))
    with pytest.raises(RunDirError, match=r"offset_max_rows = 5 leaves no table to offset \(rows of the "
                                          r"single-valued inputs: \{'205': 20, '206': 10\}\)"):
        register_task(run, task_toml(tmp_path, method="mptrec_emb", offset_max_rows=5))
    with pytest.raises(ValueError, match="offset_max_rows must be >= 0, got -1"):
        register_task(run, task_toml(tmp_path, method="mptrec_emb", offset_max_rows=-1))
    register_task(run, task_toml(tmp_path, method="mptrec_emb", offset_max_rows=15))
    cfg, _ = prompt_config(run, "scenario")
    assert (cfg.method, cfg.offset_max_rows) == ("mptrec_emb", 15)
    assert load_task_store(run)["tasks"]["scenario"]["status"] == "registered"
