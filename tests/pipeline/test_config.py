from __future__ import annotations

import json
from pathlib import Path

import pytest

from mptrec.pipeline.config import NewTaskSpec, RunConfig, load_config, load_task_config, write_resolved
from mptrec.pipeline.strict import ConfigError

GOOD = """
name = "t"
[data]
path = "d"
batch_size = 128
[features]
embedding_dim = 8
exclude = ["101"]
[[features.overrides]]
name = "205"
embedding_dim = 16
[[tasks]]
name = "ctr"
label = "click"
[[tasks]]
name = "cvr"
label = "purchase"
[model]
name = "mptrec"
expert_hidden = [32, 16]
tower_hidden = [8]
[train]
epochs = 2
lr = 0.01
[sharding]
sharding_types = ["table_wise"]
"""


def _write(tmp_path: Path, text: str, name: str = "c.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_good_config_loads_typed(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, GOOD))
    assert isinstance(cfg, RunConfig)
    assert cfg.model.expert_hidden == (32, 16) and cfg.model.hidden_dim == 16
    assert cfg.train.lr == 0.01 and isinstance(cfg.train.lr, float)
    assert cfg.features.overrides[0].embedding_dim == 16
    assert cfg.task_names == ["ctr", "cvr"]
    assert cfg.out_dir == "runs/t"
    with pytest.raises(AttributeError):
        cfg.train.lr = 1.0  # type: ignore[misc]  # frozen


def test_overrides_apply_with_toml_values(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, GOOD), overrides=[
        "train.epochs=5", "model.expert_hidden=[64, 32]", "model.grl_schedule=official",
        "data.shuffle=false"])
    assert cfg.train.epochs == 5
    assert cfg.model.expert_hidden == (64, 32)
    assert cfg.model.grl_schedule == "official"
    assert cfg.data.shuffle is False


@pytest.mark.parametrize(
    "edit, needle",
    [
        (("[train]\n", "[train]\nlearning_rate = 0.1\n"), "train.learning_rate"),
        (("[model]\n", "[model]\nexpert_hiden = [1]\n"), "model.expert_hiden"),
        (("name = \"205\"\n", "name = \"205\"\nbogus = 1\n"), "features.overrides[0].bogus"),
        (("epochs = 2", "epochs = \"two\""), "train.epochs"),
        (("lr = 0.01", "lr = true"), "train.lr"),
        (("epochs = 2", "epochs = 0"), "epochs must be > 0"),
        (("sharding_types = [\"table_wise\"]", "sharding_types = [\"diagonal\"]"),
         "sharding.sharding_types[0]"),
        (("expert_hidden = [32, 16]", "expert_hidden = 32"), "model.expert_hidden"),
        (("name = \"cvr\"", "name = \"ctr\""), "task names must be unique"),
        (("name = \"cvr\"", "name = \"CVR\""), "lower_snake"),
    ],
)
def test_bad_configs_name_file_key_and_value(tmp_path: Path, edit: tuple[str, str], needle: str) -> None:
    old, new = edit
    assert old in GOOD
    p = _write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    msg = str(exc.value)
    assert str(p) in msg
    assert needle in msg


def test_unknown_top_level_key_and_missing_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key 'nmae'"):
        load_config(_write(tmp_path, "nmae = 1\n" + GOOD))
    with pytest.raises(ConfigError, match="missing required key 'data'"):
        load_config(_write(tmp_path, 'name = "x"\n[[tasks]]\nname="a"\nlabel="b"\n'))


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "name = = 1"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")


def test_bad_override(tmp_path: Path) -> None:
    p = _write(tmp_path, GOOD)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(p, overrides=["train.epochs"])
    with pytest.raises(ConfigError, match="train.epoch"):
        load_config(p, overrides=["train.epoch=3"])


def test_resolved_config_round_trips_as_json(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, GOOD))
    out = tmp_path / "run" / "config.json"
    write_resolved(cfg, out)
    data = json.loads(out.read_text())
    assert data["model"]["expert_hidden"] == [32, 16]
    assert not list(out.parent.glob(".*tmp*"))
    from mptrec.pipeline.strict import from_dict

    assert from_dict(RunConfig, data) == cfg


def test_task_config(tmp_path: Path) -> None:
    p = _write(tmp_path, 'name = "scenario"\nlabel = "301"\npositive_values = [1, 3]\n'
               'method = "mptrec"\nexclude_features = ["301", "101"]\n', "task.toml")
    t = load_task_config(p)
    assert isinstance(t, NewTaskSpec)
    assert t.task_spec().positive_values == (1, 3)
    bad = _write(tmp_path, 'name = "scenario"\nlabel = "301"\nmethod = "lora"\n', "bad.toml")
    with pytest.raises(ConfigError, match="method"):
        load_task_config(bad)


def test_new_task_inherit_is_none_and_resolved_once(tmp_path: Path) -> None:
    from mptrec.pipeline.strict import from_dict, to_dict

    run = load_config("configs/debug.toml")
    legacy = _write(tmp_path, 'name = "t3"\nlabel = "c"\ntower_hidden = []\nbatch_size = 0\nr_dnn = -1.0\n',
                    "legacy.toml")
    omitted = _write(tmp_path, 'name = "t3"\nlabel = "c"\n', "omitted.toml")
    old, new = load_task_config(legacy), load_task_config(omitted)
    assert old == new and (new.tower_hidden, new.batch_size, new.r_dnn) == (None, None, None)
    got = new.resolve(run)
    assert (got.tower_hidden, got.batch_size, got.r_dnn) == (
        run.model.tower_hidden, run.data.batch_size, run.model.r_dnn)
    assert from_dict(NewTaskSpec, json.loads(json.dumps(to_dict(new)))) == new  # null round-trips
    own = load_task_config(omitted, ["tower_hidden=[8]", "batch_size=64", "r_dnn=0.0"]).resolve(run)
    assert (own.tower_hidden, own.batch_size, own.r_dnn) == ((8,), 64, 0.0)
    with pytest.raises(ConfigError, match="batch_size must be > 0"):
        load_task_config(omitted, ["batch_size=-2"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('name = "x"\n[train]\nlr = 0.1\nepochs = 2\nlr = 0.2\n', "line 5: key 'train.lr' is defined twice"),
        ('name = "x"\nname = "y"', "line 2: key 'name' is defined twice"),
        ('name = "x"\n[train]\nlr = 0.1\n[train]\nepochs = 1\n', "line 4: table [train] is declared twice"),
    ],
    ids=["key-in-table", "top-level-at-end", "table"],
)
def test_duplicate_toml_key_is_named(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "dup.toml"
    path.write_text(text)
    for load in (load_config, load_task_config):
        with pytest.raises(ConfigError) as e:
            load(path)
        assert str(e.value).startswith(f"{path}: not valid TOML: {expected}"), str(e.value)
        assert "\n" not in str(e.value)
