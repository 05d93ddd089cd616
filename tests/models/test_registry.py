"""MODELS registry, build_model and constructor validation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mptrec.models import MODELS, MPTRec, build_model, register_model
from mptrec.models.baselines import MMoE, SharedBottom, SingleTask
from mptrec.models.ple import PLE
from tests.models.tiny import DENSE_DIM, SPARSE, TASKS, tiny_config, tiny_ebc

torch.set_num_threads(1)


def test_registry_holds_the_five_models() -> None:
    assert {"mptrec": MPTRec, "single_task": SingleTask, "shared_bottom": SharedBottom, "mmoe": MMoE,
            "ple": PLE}.items() <= MODELS.items()


def test_register_model_rejects_duplicates_and_empty_names() -> None:
    with pytest.raises(ValueError, match="'mmoe' is already registered"):
        register_model("mmoe", MMoE)
    with pytest.raises(ValueError, match="non-empty"):
        register_model("", MMoE)
    register_model("mmoe_again_for_test", MMoE)
    try:
        cfg = tiny_config("mmoe_again_for_test")
        model = build_model(cfg, tiny_ebc(), sparse_features=SPARSE, dense_dim=DENSE_DIM, task_names=TASKS)
        assert isinstance(model, MMoE)
    finally:
        del MODELS["mmoe_again_for_test"]


@pytest.mark.parametrize("name", ["mptrec", "single_task", "shared_bottom", "mmoe", "ple"])
def test_build_model_on_a_meta_ebc_keeps_the_ebc(name: str) -> None:
    ebc = tiny_ebc(device="meta")
    model = build_model(tiny_config(name), ebc, sparse_features=SPARSE, dense_dim=DENSE_DIM, task_names=TASKS,
                        task_weights={"cvr": 2.0})
    assert model.ebc is ebc and model.task_names == TASKS and model.task_weights == {"ctr": 1.0, "cvr": 2.0}


def test_build_model_errors() -> None:
    def build(cfg_name: str = "mptrec", **kw: object) -> object:
        args: dict[str, object] = {"sparse_features": SPARSE, "dense_dim": DENSE_DIM, "task_names": TASKS}
        args.update(kw)
        return build_model(tiny_config(cfg_name), tiny_ebc(), **args)  # type: ignore[arg-type]

    with pytest.raises(ValueError, match=r"model.name = 'dlrm' is not registered; known: \["):
        build_model(dataclasses.replace(tiny_config("mptrec"), name="dlrm"), tiny_ebc(),
                    sparse_features=SPARSE, dense_dim=DENSE_DIM, task_names=TASKS)
    with pytest.raises(ValueError, match=r"in the EBC but not listed: \['c'\]"):
        build(sparse_features=["a", "b"])
    with pytest.raises(ValueError, match=r"not in the EBC: \['zz'\]"):
        build(sparse_features=[*SPARSE, "zz"])
    with pytest.raises(ValueError, match="unique"):
        build(task_names=["ctr", "ctr"])
    with pytest.raises(ValueError, match="reserved"):
        build(task_names=["ctr", "aux"])
    with pytest.raises(ValueError, match="unknown task 'x'"):
        build(task_weights={"x": 1.0})
    with pytest.raises(ValueError, match="applies to the mptrec model only"):
        build_model(tiny_config("mmoe", variant="no_gan"), tiny_ebc(), sparse_features=SPARSE,
                    dense_dim=DENSE_DIM, task_names=TASKS)


def test_new_task_methods_come_from_the_model_classes() -> None:
    from mptrec.models.registry import all_new_task_methods, new_task_methods

    assert new_task_methods("mptrec") == MPTRec.new_task_methods == (
        "mptrec", "mptrec_res", "mptrec_emb", "mptrec_mlp", "fw", "tes")
    assert {m: new_task_methods(m) for m in ("single_task", "shared_bottom", "mmoe", "ple")} == {
        "single_task": ("single_task",), "shared_bottom": ("shared_bottom*",), "mmoe": ("mmoe*",),
        "ple": ("ple*",)}
    assert new_task_methods("dlrm") == ()
    assert set(all_new_task_methods()) == {m for cls in MODELS.values() for m in cls.new_task_methods}
