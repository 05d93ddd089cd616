"""Embedding regularisation: fused lazy weight decay, whole-table L2 on data_parallel tables, init std."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from mptrec.pipeline.config import TrainConfig
from mptrec.pipeline.sharding import ShardingError, embedding_optimizer
from tests.dist import run_multiprocess
from tests.pipeline.train.test_train_data import debug_config, write_tiny_shards

DP = 'sharding.sharding_types=["data_parallel"]'


def test_dense_tables_take_adam_on_cpu_with_r_emb_as_weight_decay() -> None:
    cfg = TrainConfig(embedding_optimizer="adam", embedding_lr=1e-3)
    cls, kwargs = embedding_optimizer(cfg, "cpu", dense_tables=True, r_emb=0.006)
    assert cls is torch.optim.Adam and kwargs == {"lr": 1e-3, "weight_decay": 0.006, "fused": True}
    with pytest.raises(ShardingError, match="'adam' needs CUDA"):
        embedding_optimizer(cfg, "cpu")  # fused tables: FBGEMM's CPU kernel has no Adam


def test_fbgemm_cpu_kernel_ignores_weight_decay() -> None:
    """Why there is no fused ``weight_decay`` option: FBGEMM's CPU kernel (fbgemm-gpu-cpu 1.8.0)
    accepts ``weight_decay`` with modes L2 and DECOUPLE but leaves the update unchanged. If this
    test starts failing, the kernel honours it and the option can be offered."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        EmbeddingLocation,
        SplitTableBatchedEmbeddingBagsCodegen,
    )
    from fbgemm_gpu.tbe.config.optimizer_config import WeightDecayMode

    w0 = torch.linspace(-1, 1, 40).view(10, 4)
    for mode in (WeightDecayMode.L2, WeightDecayMode.DECOUPLE):
        rows = []
        for wd in (0.0, 10.0):
            tbe = SplitTableBatchedEmbeddingBagsCodegen(
                [(10, 4, EmbeddingLocation.HOST, ComputeDevice.CPU)],
                optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD, learning_rate=0.5, weight_decay=wd,
                weight_decay_mode=mode)
            with torch.no_grad():
                tbe.split_embedding_weights()[0].copy_(w0)
            out = tbe(torch.tensor([1, 3]), torch.tensor([0, 1, 2]))
            (out * torch.arange(1.0, 5.0)).sum().backward()
            rows.append(tbe.split_embedding_weights()[0].detach().clone())
        assert not torch.equal(rows[0][1], w0[1])  # the update ran
        assert torch.equal(rows[0], rows[1]), mode  # ... and weight decay 10 changed nothing


def _one_step(rank: int, world_size: int, data: str, out: str, overrides: list[str]) -> dict[str, Any]:
    from mptrec.data_loaders.dataset import ShardDataset
    from mptrec.data_loaders.layout import read_schema
    from mptrec.pipeline.build import build_from_config
    from mptrec.pipeline.sharding import shard_model
    from mptrec.pipeline.train.em import EMLabelStore
    from mptrec.pipeline.train.wrapper import TrainWrapper

    cfg = debug_config(Path(data), Path(out), *overrides)
    schema = read_schema(cfg.data.path)
    model, features = build_from_config(cfg, schema)
    store = EMLabelStore(int(sum(schema["splits"]["train"]["rows"])), model.task_names, seed=0)
    try:
        sharded = shard_model(TrainWrapper(model, store), features, cfg.sharding, cfg.train,
                              torch.device("cpu"), r_emb=cfg.model.r_emb)
    except ShardingError as e:
        return {"error": str(e)}

    def tables() -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for key, value in sharded.dmp.state_dict().items():
            if "embedding_bags" in key:
                t = value.local_shards()[0].tensor if hasattr(value, "local_shards") else value
                out[key.split(".")[-2]] = t.detach().clone()
        return out

    ds = ShardDataset(cfg.data.path, "train", features=features, labels=[t.label_spec() for t in cfg.tasks],
                      batch_size=16, shuffle=False)
    batch = next(iter(ds))
    before = tables()
    sharded.dmp.train()
    loss, _ = sharded.dmp(batch)
    loss.backward()
    assert sharded.optimizer is not None
    sharded.optimizer.step()
    seen = {f"t_{k}": torch.unique(v.values()) for k, v in batch.sparse_features.to_dict().items()}
    # numpy crosses the process boundary by value (torch tensors would be shared memory)
    return {"before": {k: v.numpy() for k, v in before.items()},
            "after": {k: v.numpy() for k, v in tables().items()},
            "seen": {k: v.numpy() for k, v in seen.items()}}


def _run(tmp_path: Path, name: str, *overrides: str) -> dict[str, Any]:
    data = tmp_path / "data"
    if not data.exists():
        write_tiny_shards(data)
    result: dict[str, Any] = run_multiprocess(_one_step, 1, str(data), str(tmp_path / name),
                                              list(overrides))[0]
    if "error" in result:
        return result
    return {part: {k: torch.from_numpy(v) for k, v in result[part].items()}
            for part in ("before", "after", "seen")}


def test_whole_table_l2_on_data_parallel_tables_reaches_unseen_rows(tmp_path: Path) -> None:
    adam = [DP, "train.embedding_optimizer=adam", "train.embedding_lr=0.01"]
    without = _run(tmp_path, "no_l2", *adam)
    with_l2 = _run(tmp_path, "l2", *adam, "model.r_emb=0.05")
    moved = 0
    for table, w0 in without["before"].items():
        unseen = torch.ones(w0.shape[0], dtype=torch.bool)
        unseen[without["seen"][table]] = False
        if not unseen.any():
            continue
        assert torch.equal(without["after"][table][unseen], w0[unseen])  # no L2: no gradient there
        # whole-table L2: every unseen row shrinks towards 0 (Adam's first step: lr * sign(w))
        shrunk = with_l2["after"][table][unseen].abs() < w0[unseen].abs()
        assert bool(shrunk[w0[unseen].abs() > 0.01].all())
        moved += int(unseen.sum())
    assert moved > 0


def test_r_emb_with_fused_tables_is_refused(tmp_path: Path) -> None:
    result = _run(tmp_path, "refused", "model.r_emb=0.01")
    assert "whole-table L2 term needs every table data_parallel" in result["error"]


def test_init_std_scales_the_tables(tmp_path: Path) -> None:
    small = _run(tmp_path, "small", "train.embedding_init_std=0.01")
    unit = _run(tmp_path, "unit")
    for table, w in unit["before"].items():
        torch.testing.assert_close(small["before"][table], 0.01 * w)

