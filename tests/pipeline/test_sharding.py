"""pipeline/sharding.py: sharding types per device, width and optimizer checks, plan-independent init."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from mptrec.data_loaders.schema import FeatureSpec
from mptrec.pipeline.config import ShardingConfig, TableConstraint, TrainConfig
from mptrec.pipeline.sharding import (
    ShardingError,
    allowed_sharding_types,
    check_embedding_widths,
    embedding_optimizer,
)
from mptrec.pipeline.table_init import table_init_values
from tests.dist import run_multiprocess
from tests.pipeline.train.test_train_data import debug_config, write_tiny_shards


def _feat(name: str, dim: int = 4, rows: int = 10) -> FeatureSpec:
    return FeatureSpec(name=name, num_embeddings=rows, embedding_dim=dim)


def test_cpu_defaults_to_table_and_column_wise_and_cuda_is_free() -> None:
    cfg = ShardingConfig()
    assert allowed_sharding_types("a", cfg, "cpu") == ["table_wise", "column_wise"]
    assert allowed_sharding_types("a", cfg, "cuda") is None


def test_per_table_constraint_overrides_the_default() -> None:
    cfg = ShardingConfig(sharding_types=("table_wise",),
                         constraints=(TableConstraint("b", ("data_parallel",)),))
    assert allowed_sharding_types("a", cfg, "cpu") == ["table_wise"]
    assert allowed_sharding_types("b", cfg, "cpu") == ["data_parallel"]


def test_row_wise_on_cpu_is_an_error_naming_the_feature() -> None:
    cfg = ShardingConfig(constraints=(TableConstraint("big", ("row_wise",)),))
    with pytest.raises(ShardingError, match="'big'.*row_wise.*need CUDA"):
        allowed_sharding_types("big", cfg, "cpu")
    assert allowed_sharding_types("big", cfg, "cuda") == ["row_wise"]


def test_width_not_multiple_of_4_is_refused_for_fused_tables_only() -> None:
    feats = [_feat("ok", 8), _feat("205", 5)]
    with pytest.raises(ShardingError, match="feature '205' has embedding_dim 5.*multiple of 4"):
        check_embedding_widths(feats, ShardingConfig(), "cpu")
    dp = ShardingConfig(constraints=(TableConstraint("205", ("data_parallel",)),))
    check_embedding_widths(feats, dp, "cpu")  # the dense kernel takes any width


def test_embedding_optimizers() -> None:
    sgd = TrainConfig(embedding_optimizer="sgd", embedding_lr=0.3)
    assert embedding_optimizer(sgd, "cpu")[1] == {"lr": 0.3}
    with pytest.raises(ShardingError, match="'adam' needs CUDA"):
        embedding_optimizer(TrainConfig(embedding_optimizer="adam"), "cpu")
    assert embedding_optimizer(TrainConfig(embedding_optimizer="adam"), "cuda")[0] is not None


def test_table_init_is_the_same_for_any_shard_of_the_table() -> None:
    full = table_init_values(7, "t_x", (0, 9000), (0, 8), 8)
    assert full.shape == (9000, 8)
    assert abs(float(full.mean())) < 0.05 and abs(float(full.std()) - 1) < 0.05  # N(0, 1)
    assert torch.equal(table_init_values(7, "t_x", (4000, 8500), (4, 8), 8), full[4000:8500, 4:8])
    assert not torch.equal(table_init_values(8, "t_x", (0, 10), (0, 8), 8), full[:10])
    assert not torch.equal(table_init_values(7, "t_y", (0, 10), (0, 8), 8), full[:10])


# ---- multi-process ------------------------------------------------------------------------------


def _shard_debug_model(rank: int, world_size: int, data: str, out: str,
                       overrides: list[str]) -> dict[str, Any]:
    from mptrec.data_loaders.layout import read_schema
    from mptrec.pipeline.build import build_from_config, table_name
    from mptrec.pipeline.sharding import shard_model

    cfg = debug_config(Path(data), Path(out), *overrides)
    model, features = build_from_config(cfg, read_schema(cfg.data.path))
    sharded = shard_model(_wrap(model), features, cfg.sharding, cfg.train, torch.device("cpu"))
    local: dict[str, Any] = {}
    for key, value in sharded.dmp.state_dict().items():
        if "embedding_bags" not in key:
            continue
        table = key.split(".")[-2]
        dim = next(f.embedding_dim for f in features if table_name(f.name) == table)
        sharded_tensor = hasattr(value, "local_shards")
        for shard in value.local_shards() if sharded_tensor else []:
            (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
            expect = table_init_values(cfg.train.seed, table, (r0, r0 + nr), (c0, c0 + nc), dim)
            local[f"{table}@{r0},{c0}"] = bool(torch.equal(shard.tensor, expect))
        if not sharded_tensor:  # data_parallel: a plain replicated tensor
            expect = table_init_values(cfg.train.seed, table, (0, value.shape[0]), (0, value.shape[1]), dim)
            local[table] = bool(torch.equal(value, expect))
    return {"plan": sharded.plan_text, "init_ok": local, "too_big": _plan_too_big(cfg),
            "dense_wrapper": type(sharded.dmp._dmp_wrapped_module).__name__,
            "keys": sorted(sharded.dmp.state_dict())}


def _wrap(model: Any) -> Any:
    from mptrec.pipeline.train.wrapper import TrainWrapper

    store = None
    if model.uses_em:
        from mptrec.pipeline.train.em import EMLabelStore

        store = EMLabelStore(10, model.task_names, seed=0)
    return TrainWrapper(model, store)


@pytest.mark.slow
def test_two_processes_shard_init_independent_of_plan_refuse_impossible_plans(tmp_path: Path) -> None:
    data = write_tiny_shards(tmp_path / "data")
    overrides = ['sharding.constraints=[{feature = "f2", sharding_types = ["data_parallel"]}]']
    results = run_multiprocess(_shard_debug_model, 2, str(data), str(tmp_path / "run"), overrides)
    plan = results[0]["plan"]
    assert "data_parallel" in plan and "dense" in plan and "fused" in plan
    for r in results:
        assert r["init_ok"] and all(r["init_ok"].values()), r["init_ok"]
    owned = set(results[0]["init_ok"]) | set(results[1]["init_ok"])
    assert {"t_f0@0,0", "t_f1@0,0", "t_m0@0,0", "t_f2"} <= owned
    # a plan the world size cannot serve (a 2^40-row table): a clear error on every rank, no hang
    assert all("cannot serve world size 2 on cpu" in r["too_big"] for r in results), results
    # the dense part is DDP-wrapped with 2 ranks, not with 1 (SingleRankDataParallelWrapper), and
    # the state-dict keys (so checkpoints) are the same either way
    assert {r["dense_wrapper"] for r in results} == {"DistributedDataParallel"}
    single = run_multiprocess(_shard_debug_model, 1, str(data), str(tmp_path / "run1"), overrides)[0]
    assert single["dense_wrapper"] == "TrainWrapper"
    assert single["keys"] == results[0]["keys"]


def _plan_too_big(cfg: Any) -> str:
    from mptrec.pipeline.config import FeatureOverride, FeaturesConfig

    huge = FeaturesConfig(embedding_dim=4, overrides=(FeatureOverride("f1", num_embeddings=2 ** 40),))
    try:
        _shard_with(cfg.__class__(**{**cfg.__dict__, "features": huge}))
    except ShardingError as e:
        return str(e)
    return "no error"


def _shard_with(cfg: Any) -> None:
    from mptrec.data_loaders.layout import read_schema
    from mptrec.pipeline.build import build_from_config
    from mptrec.pipeline.sharding import shard_model

    model, features = build_from_config(cfg, read_schema(cfg.data.path))
    shard_model(_wrap(model), features, cfg.sharding, cfg.train, torch.device("cpu"))


