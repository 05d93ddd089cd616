"""pipeline/checkpoint.py: DCP checkpoints, resharding 2 -> 1 -> 2 processes, load_backbone, pruning."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from mptrec.pipeline.checkpoint import TrainState, save_checkpoint
from mptrec.pipeline.checkpoint_files import (
    CheckpointError,
    check_compatible,
    find_checkpoints,
    resolve_checkpoint,
)
from tests.dist import run_multiprocess
from tests.pipeline.train.test_train_data import debug_config, write_tiny_shards


class _Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = torch.nn.Linear(3, 2)


class _Opt:
    def state_dict(self) -> dict[str, Any]:
        return {"state": {}}


def test_save_is_atomic_keeps_the_last_k_and_the_best(tmp_path: Path) -> None:
    module = _Toy()
    ident = {"model": "toy", "features": [], "tasks": ["a"], "shapes": {"weight": [2, 3], "bias": [2]}}
    for step, best in ((1, True), (2, False), (3, False), (4, False)):
        save_checkpoint(tmp_path, module=module, prefix="model.", optimizer=_Opt(),
                        state=TrainState(step=step), identity=ident, keep_last=2, is_best=best)
    names = [p.name for _, p in find_checkpoints(tmp_path)]
    assert names == ["step-000001", "step-000003", "step-000004"]  # best (1) survives pruning
    assert resolve_checkpoint(tmp_path, "best").resolve().name == "step-000001"
    assert resolve_checkpoint(tmp_path, "last").name == "step-000004"
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    meta = json.loads((tmp_path / "checkpoints" / "step-000004" / "meta.json").read_text())
    assert meta["step"] == 4 and set(meta["versions"]) == {"torch", "torchrec", "fbgemm", "mptrec"}
    with pytest.raises(CheckpointError, match="'nope'.*available: \\['step-000001'"):
        resolve_checkpoint(tmp_path, "nope")


def test_incompatible_checkpoint_names_both_models(tmp_path: Path) -> None:
    saved = {"model": "mptrec", "features": [{"name": "f"}], "tasks": ["ctr", "cvr"], "shapes": {"w": [4, 2]}}
    other = {"model": "mmoe", "features": [{"name": "f"}], "tasks": ["ctr", "cvr"], "shapes": {"w": [4, 3]}}
    with pytest.raises(CheckpointError, match="model 'mptrec'.*this run builds model 'mmoe'.*shape of 'w'"):
        check_compatible(tmp_path, saved, other)
    extra = {**saved, "shapes": {"w": [4, 2], "head.w": [1]}, "tasks": ["ctr", "cvr", "new"]}
    check_compatible(tmp_path, saved, extra, backbone_only=True)  # new heads are fine for a backbone


# ---- multi-process: resharding ----------------------------------------------------------------


def _build(data: str, out: str, *overrides: str) -> tuple[Any, Any, Any, Any]:
    from mptrec.data_loaders.layout import read_schema
    from mptrec.pipeline.build import build_from_config
    from mptrec.pipeline.sharding import shard_model
    from mptrec.pipeline.train.em import EMLabelStore
    from mptrec.pipeline.train.wrapper import TrainWrapper

    cfg = debug_config(Path(data), Path(out), *overrides)
    model, features = build_from_config(cfg, read_schema(cfg.data.path))
    store = EMLabelStore(640, cfg.task_names, seed=0)
    sharded = shard_model(TrainWrapper(model, store), features, cfg.sharding, cfg.train, torch.device("cpu"))
    return cfg, model, features, sharded


def _fixed_batch(data: str, features: Any, split: str = "valid") -> Any:
    from mptrec.data_loaders.dataset import ShardDataset
    from mptrec.data_loaders.schema import LabelSpec

    ds = ShardDataset(data, split, features=features, batch_size=40,
                      labels=[LabelSpec("ctr", "click"), LabelSpec("cvr", "purchase")])
    return next(iter(ds))


def _predict(model: Any, batch: Any) -> list[list[float]]:
    model.eval()
    with torch.no_grad():
        out = model(batch.dense_features, batch.sparse_features)
    model.train()
    return [out[t].tolist() for t in sorted(out)]


def _train_steps(sharded: Any, data: str, features: Any, rank: int, world: int, steps: int) -> None:
    from mptrec.data_loaders.dataset import ShardDataset
    from mptrec.data_loaders.schema import LabelSpec
    from mptrec.pipeline.train.loop import PlainStepper

    ds = ShardDataset(data, "train", features=features, batch_size=32, rank=rank, world_size=world,
                      labels=[LabelSpec("ctr", "click"), LabelSpec("cvr", "purchase")])
    it = iter(ds)
    stepper = PlainStepper(sharded.dmp, sharded.optimizer, torch.device("cpu"))
    for _ in range(steps):
        stepper.progress(it)


def _optimizer_state(sharded: Any) -> dict[str, list[Any]]:
    """Every optimizer state tensor as (global row offset, values) pieces of this rank."""
    out: dict[str, list[Any]] = {}
    for key, states in sharded.optimizer.state_dict()["state"].items():
        for name, value in states.items():
            if hasattr(value, "local_shards"):
                out[f"{key}/{name}"] = [(list(s.metadata.shard_offsets), s.tensor.tolist())
                                        for s in value.local_shards()]
            elif isinstance(value, torch.Tensor):
                out[f"{key}/{name}"] = [([0] * value.dim(), value.tolist())]
    return out


def _save_then_predict(rank: int, world: int, data: str, run: str, load_from: str | None,
                       overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    from mptrec.pipeline.checkpoint import backbone_state_dict, load_checkpoint
    from mptrec.pipeline.checkpoint_files import checkpoint_meta

    cfg, model, features, sharded = _build(data, run, *overrides)
    ident = checkpoint_meta(cfg.model.name, features, cfg.task_names,
                            backbone_state_dict(sharded.dmp, "model."))
    batch = _fixed_batch(data, features)
    result: dict[str, Any] = {"plan": sharded.plan_text, "column_offsets": sorted({
        s.metadata.shard_offsets[1] for v in backbone_state_dict(sharded.dmp, "model.").values()
        if hasattr(v, "local_shards") for s in v.local_shards()})}
    if load_from is not None:
        loaded = load_checkpoint(load_from, module=sharded.dmp, prefix="model.", optimizer=sharded.optimizer,
                                 identity=ident)
        result["loaded_preds"] = _predict(model, batch)
        result["loaded_state"] = _optimizer_state(sharded)
        result["loaded_step"] = loaded.state.step
        result["rng_restored"] = loaded.rng_restored
    _train_steps(sharded, data, features, rank, world, steps=3)
    path = save_checkpoint(run, module=sharded.dmp, prefix="model.", optimizer=sharded.optimizer,
                           state=TrainState(step=3 + (result.get("loaded_step") or 0)), identity=ident,
                           em_labels={"labels": torch.zeros(640, dtype=torch.int8),
                                      "task_names": cfg.task_names},
                           config={"name": cfg.name}, plan_text=sharded.plan_text)
    result["saved"] = str(path)
    result["saved_preds"] = _predict(model, batch)
    result["saved_state"] = _optimizer_state(sharded)
    return result


def _backbone_into_other_models(rank: int, world: int, data: str, run: str) -> dict[str, Any]:
    """load_backbone into (a) an unsharded model, (b) a sharded module with an extra head."""
    from mptrec.data_loaders.layout import read_schema
    from mptrec.pipeline.build import build_from_config
    from mptrec.pipeline.checkpoint import load_backbone
    from mptrec.pipeline.sharding import shard_model

    cfg = debug_config(Path(data), Path(run))
    plain, features = build_from_config(cfg, read_schema(cfg.data.path), ebc_device="cpu")
    meta = load_backbone(run, "last", plain, model_name="mptrec", features=features)
    batch = _fixed_batch(data, features)
    out: dict[str, Any] = {"plain": _predict(plain, batch), "step": meta["step"]}

    class WithHead(torch.nn.Module):
        def __init__(self, backbone: Any) -> None:
            super().__init__()
            self.backbone = backbone
            self.head = torch.nn.Linear(4, 1)

    backbone, _ = build_from_config(cfg, read_schema(cfg.data.path))
    holder = shard_model(WithHead(backbone), features, cfg.sharding, None, torch.device("cpu")).dmp
    head_before = holder.module.head.weight.detach().clone()
    load_backbone(run, "last", holder, prefix="backbone.")
    out["with_head"] = _predict(backbone, batch)
    out["head_untouched"] = bool(torch.equal(head_before, holder.module.head.weight))
    try:
        load_backbone(run, "last", plain, model_name="mmoe")
    except CheckpointError as e:
        out["mismatch"] = str(e)
    return out


def _pieces_equal(full: dict[str, list[Any]], parts: list[dict[str, list[Any]]]) -> None:
    """Each rank's piece of every state tensor equals the same slice of the 1-process tensor."""
    for key, [(_, whole)] in full.items():
        t = torch.tensor(whole)
        seen = 0
        for rank_parts in parts:
            for offsets, values in rank_parts.get(key, []):
                v = torch.tensor(values)
                sl = tuple(slice(o, o + n) for o, n in zip(offsets, v.shape))
                assert torch.allclose(t[sl], v, atol=1e-6), key
                seen += 1
        assert seen, key


@pytest.mark.slow
def test_checkpoints_reshard_from_two_processes_to_one_and_back(tmp_path: Path) -> None:
    data = str(write_tiny_shards(tmp_path / "data"))
    two = run_multiprocess(_save_then_predict, 2, data, str(tmp_path / "run2"), None)
    ckpt2 = two[0]["saved"]
    one = run_multiprocess(_save_then_predict, 1, data, str(tmp_path / "run1"), ckpt2)[0]
    # 2 -> 1: identical predictions on the same batch, optimizer states (fused + dense) resharded
    assert one["loaded_preds"] == two[0]["saved_preds"] == two[1]["saved_preds"]
    assert one["loaded_step"] == 3 and one["rng_restored"] is False
    _pieces_equal(one["loaded_state"], [two[0]["saved_state"], two[1]["saved_state"]])
    # 1 -> 2
    back = run_multiprocess(_save_then_predict, 2, data, str(tmp_path / "run3"), one["saved"])
    assert back[0]["loaded_preds"] == back[1]["loaded_preds"] == one["saved_preds"]
    _pieces_equal(one["saved_state"], [back[0]["loaded_state"], back[1]["loaded_state"]])
    # the backbone alone, into an unsharded model and into a sharded module with an extra head
    other = run_multiprocess(_backbone_into_other_models, 1, data, str(tmp_path / "run1"))[0]
    assert other["step"] == 6
    torch.testing.assert_close(torch.tensor(other["plain"]), torch.tensor(one["saved_preds"]))
    assert other["with_head"] == one["saved_preds"] and other["head_untouched"]
    assert "model 'mptrec'" in other["mismatch"] and "'mmoe'" in other["mismatch"]


COLUMN_WISE = ('sharding.sharding_types=["column_wise"]', "features.embedding_dim=256")


@pytest.mark.slow
def test_column_wise_checkpoints_reshard_from_two_processes_to_one_and_back(tmp_path: Path) -> None:
    """Column-wise tables (width 256: TorchRec cuts column shards of 128): shard column offsets exercised."""
    data = str(write_tiny_shards(tmp_path / "data"))
    two = run_multiprocess(_save_then_predict, 2, data, str(tmp_path / "run2"), None, COLUMN_WISE)
    assert "column_wise" in two[0]["plan"] and "table_wise" not in two[0]["plan"]
    assert 0 in two[0]["column_offsets"] + two[1]["column_offsets"]
    assert max(two[0]["column_offsets"] + two[1]["column_offsets"]) > 0  # a shard starting mid-row
    one = run_multiprocess(_save_then_predict, 1, data, str(tmp_path / "run1"), two[0]["saved"],
                           COLUMN_WISE)[0]
    assert one["loaded_preds"] == two[0]["saved_preds"] == two[1]["saved_preds"]
    _same_pieces(one["loaded_state"], [two[0]["saved_state"], two[1]["saved_state"]])
    back = run_multiprocess(_save_then_predict, 2, data, str(tmp_path / "run3"), one["saved"], COLUMN_WISE)
    assert back[0]["loaded_preds"] == back[1]["loaded_preds"] == one["saved_preds"]
    _same_pieces(one["saved_state"], [back[0]["loaded_state"], back[1]["loaded_state"]])


def _same_pieces(full: dict[str, list[Any]], parts: list[dict[str, list[Any]]]) -> None:
    """Column shards keep their own row-wise optimizer state: the same pieces, wherever they live."""
    for key, pieces in full.items():
        if not key.startswith("embeddings."):  # dense optimizer state: replicated on every rank
            assert all(part[key] == pieces for part in parts), key
            continue
        spread = sorted(str(p) for part in parts for p in part.get(key, []))
        assert sorted(str(p) for p in pieces) == spread, key


# ---- damaged checkpoints -------------------------------------------------------------------------


def _three_checkpoints(tmp_path: Path) -> list[Path]:
    module = _Toy()
    ident = {"model": "toy", "features": [], "tasks": ["a"], "shapes": {"weight": [2, 3], "bias": [2]}}
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, module=module, prefix="model.", optimizer=_Opt(),
                        state=TrainState(step=step), identity=ident, keep_last=3)
    return [p for _, p in find_checkpoints(tmp_path)]


def test_damaged_checkpoint_is_named_and_resume_falls_back(tmp_path: Path) -> None:
    from mptrec.pipeline.checkpoint_files import latest_complete_checkpoint, verify_checkpoint

    paths = _three_checkpoints(tmp_path)
    for p in paths:
        meta = verify_checkpoint(p)
        assert "__0_0.distcp" in meta["files"] and ".metadata" in meta["files"]
    assert latest_complete_checkpoint(tmp_path) == (paths[2], [])
    shard = paths[2] / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-7])  # truncated
    with pytest.raises(CheckpointError, match=rf"^{shard}: \d+ bytes, .*meta.json records \d+ \(truncated"):
        verify_checkpoint(paths[2])
    (paths[1] / "__0_0.distcp").unlink()  # missing shard
    with pytest.raises(CheckpointError, match=rf"^{paths[1] / '__0_0.distcp'}: missing"):
        verify_checkpoint(paths[1])
    path, notes = latest_complete_checkpoint(tmp_path)
    assert path == paths[0]
    assert [n.split(":")[0] for n in notes] == ["skipped damaged checkpoint step-000003",
                                                 "skipped damaged checkpoint step-000002"]
    # a checkpoint written before meta.json listed its files: DCP's byte ranges still catch it
    meta_path = paths[0] / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["files"]
    meta_path.write_text(json.dumps(meta))
    verify_checkpoint(paths[0])
    shard = paths[0] / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:10])
    with pytest.raises(CheckpointError, match=rf"^{shard}: 10 bytes, but .*\.metadata reads up to byte"):
        verify_checkpoint(paths[0])
    (paths[0] / ".metadata").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match=r"\.metadata: unreadable"):
        verify_checkpoint(paths[0])
    assert latest_complete_checkpoint(tmp_path)[0] is None


def _layout_cfg(optimizer: str, sharding: dict[str, Any]) -> dict[str, Any]:
    return {"train": {"embedding_optimizer": optimizer, "lr": 1e-3}, "sharding": sharding}


def test_resume_refuses_a_checkpoint_with_another_optimizer_layout(tmp_path: Path) -> None:
    from mptrec.pipeline.checkpoint_files import CheckpointError, check_resume_config

    ckpt = tmp_path / "step-000010"
    ckpt.mkdir()
    fused = _layout_cfg("rowwise_adagrad", {"sharding_types": [], "constraints": []})
    (ckpt / "config.json").write_text(json.dumps(fused))
    check_resume_config(ckpt, fused)  # same settings: fine
    resharded = _layout_cfg("rowwise_adagrad", {"sharding_types": ["row_wise"], "constraints": []})
    check_resume_config(ckpt, resharded)  # resharding is not a layout change
    lr_changed = {**fused, "train": {"embedding_optimizer": "rowwise_adagrad", "lr": 5e-3}}
    check_resume_config(ckpt, lr_changed)
    dp_adam = _layout_cfg("adam", {"sharding_types": ["data_parallel"], "constraints": []})
    with pytest.raises(CheckpointError) as err:
        check_resume_config(ckpt, dp_adam)
    msg = str(err.value)
    assert str(ckpt) in msg
    assert "train.embedding_optimizer: 'rowwise_adagrad' in the checkpoint, 'adam' now" in msg
    assert "data_parallel tables: [] in the checkpoint, 'every table' now" in msg
    one_dp = _layout_cfg("rowwise_adagrad", {"sharding_types": [], "constraints": [
        {"feature": "121", "sharding_types": ["data_parallel"]}]})
    with pytest.raises(CheckpointError, match=r"data_parallel tables: \[\] in the checkpoint, \['121'\] now"):
        check_resume_config(ckpt, one_dp)
    (ckpt / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="unreadable"):
        check_resume_config(ckpt, fused)
