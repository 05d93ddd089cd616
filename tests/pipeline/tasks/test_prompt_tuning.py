"""Stage 2 end to end on tiny shards: freeze proofs, optimizer contents, uneven ranks, registry.

One 1-process spawn pre-trains the stage-1 model (and records the stage-1 predictions on a
fixed batch); one 2-process spawn prompt-tunes a new task on it (another world size than the
stage-1 run) and checks the guarantees on each rank; the served union is checked in
tests/pipeline/tasks/test_union.py from the same artefacts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch

from mptrec.pipeline.config import ModelConfig, NewTaskSpec, RunConfig, load_config
from tests.dist import run_multiprocess

REPO = Path(__file__).resolve().parents[3]
VOCAB = {"f0": 20, "f1": 16, "f2": 12, "f3": 8, "g": 4}
TASK_TOML = """
name = "scen"
label = "g"
positive_values = [1, 3]
description = "test: g != 2"
method = "mptrec"
exclude_features = ["g"]
lr = 0.02
epochs = 3
patience = 2
seed = 5
"""


def write_stage2_shards(out: Path, rows: dict[str, int] | None = None, seed: int = 0,
                        row_group_size: int = 64) -> Path:
    """Shards with click/purchase and a scenario field ``g`` in {1,2,3} (feature AND label source)."""
    from mptrec.data_loaders.layout import write_schema
    from mptrec.data_loaders.shard_writer import write_table_splits

    rows = rows or {"train": 1472, "valid": 512, "test": 256}
    rng = np.random.default_rng(seed)
    n = sum(rows.values())
    w = {k: rng.normal(0, 1, v) for k, v in VOCAB.items()}
    ids = {k: rng.integers(0, v, n) for k, v in VOCAB.items() if k != "g"}
    d0 = rng.random(n).astype(np.float32)
    shared = w["f0"][ids["f0"]] + w["f1"][ids["f1"]]
    click = rng.random(n) < 1 / (1 + np.exp(-(1.5 * shared + d0 - 0.5)))
    buy = rng.random(n) < 1 / (1 + np.exp(-(1.5 * w["f2"][ids["f2"]] + shared - 1.0)))
    # T3 (g != 2) shares f1 with the old tasks and has its own signal in f3
    p2 = 1 / (1 + np.exp(-(-2.0 * w["f1"][ids["f1"]] + 2.0 * w["f3"][ids["f3"]] - 0.3)))
    g = np.where(rng.random(n) < p2, 2, rng.choice([1, 3], n)).astype(np.int64)
    table = pa.table({"d0": pa.array(d0), **{k: pa.array(v, pa.int64()) for k, v in ids.items()},
                      "g": pa.array(g, pa.int64()), "click": pa.array(click.astype(np.int8)),
                      "purchase": pa.array(buy.astype(np.int8))})
    names = list(rows)
    codes = np.concatenate([np.full(rows[s], i, dtype=np.int8) for i, s in enumerate(names)])
    out.mkdir(parents=True, exist_ok=True)
    splits, stats = write_table_splits(out, table, codes, names, shards=2, row_group_size=row_group_size,
                                       label_columns=["click", "purchase"])
    features: list[dict[str, Any]] = [{"name": "d0", "kind": "dense"}]
    features += [{"name": k, "kind": "sparse", "num_embeddings": v} for k, v in VOCAB.items()]
    write_schema(out, {"dataset": "tiny-scenario", "version": 1, "features": features,
                       "labels": {"click": {"values": [0, 1]}, "purchase": {"values": [0, 1]},
                                  "g": {"values": [1, 2, 3]}},
                       "splits": splits, "stats": stats, "sources": [], "notes": "tests"})
    return out


def stage1_config(data: Path, run: Path, *overrides: str) -> RunConfig:
    return load_config(REPO / "configs" / "debug.toml", [
        f"data.path={str(data)!r}", f"out_dir={str(run)!r}", "features.exclude=['g']",
        "train.epochs=2", "train.checkpoint_every=0", "train.log_every=10", "data.batch_size=128",
        *overrides])


def fixed_batch(data: Path, features: Any, rows: int = 96) -> Any:
    from mptrec.data_loaders.dataset import ShardDataset
    from mptrec.pipeline.config import TaskSpec

    labels = [TaskSpec("ctr", "click").label_spec(), TaskSpec("scen", "g", (1, 3)).label_spec()]
    return next(iter(ShardDataset(data, "test", features=features, labels=labels, batch_size=rows)))


def _stage1(rank: int, world: int, data: str, run: str) -> dict[str, Any]:
    """Pre-train (1 process), register the task, and record the stage-1 logits on a fixed batch."""
    from mptrec.pipeline.tasks.store import register_task
    from mptrec.pipeline.tasks.union import load_run_for_eval
    from mptrec.pipeline.train.pretrain import pretrain

    cfg = stage1_config(Path(data), Path(run))
    pretrain(cfg, device=torch.device("cpu"), progress=False)
    model, run_cfg, tasks = load_run_for_eval(run, "best", torch.device("cpu"))
    from mptrec.data_loaders.layout import read_schema
    from mptrec.pipeline.build import resolve_run_features

    batch = fixed_batch(Path(data), resolve_run_features(run_cfg, read_schema(data)))
    with torch.no_grad():
        logits = model(batch.dense_features, batch.sparse_features)
    toml = Path(run) / "scen.toml"
    toml.write_text(TASK_TOML)
    register_task(run, toml)
    # numpy, not tensors: torch shares tensors between processes through file descriptors
    return {"logits": {k: v.numpy().copy() for k, v in logits.items()}, "tasks": [t.name for t in tasks]}


def _stage2(rank: int, world: int, data: str, run: str,
            stage1_logits: dict[str, np.ndarray]) -> dict[str, Any]:
    """Prompt-tune on 2 ranks and check the guarantees on each rank."""
    from mptrec.models import count_parameters
    from mptrec.pipeline.distributed import lockstep_min
    from mptrec.pipeline.rundir import hash_checkpoint
    from mptrec.pipeline.sharding import unwrap_dmp
    from mptrec.pipeline.tasks.prompt_tuning import run_stage2, setup_stage2
    from mptrec.pipeline.tasks.union import backbone_digest, table_weights

    device = torch.device("cpu")
    # uneven ranks: rank 0 has 3 items, rank 1 has 5 -> both take 3 steps
    assert len(list(lockstep_min(list(range(3 + 2 * rank)), device))) == 3

    s = setup_stage2(run, "scen", device)
    ckpt_sha = hash_checkpoint(s.sharded.checkpoint)
    loaded = backbone_digest(s.sharded.backbone)
    head_ids = {id(p) for p in s.head.parameters()}
    opt_ids = [id(p) for g in s.optimizer.param_groups for p in g["params"]]
    out: dict[str, Any] = {
        "opt_is_head": sorted(opt_ids) == sorted(head_ids) and len(opt_ids) == len(head_ids),
        # dense backbone parameters and the sharded tables' kernel weights (the leaves)
        "backbone_trainable": [n for n, p in s.sharded.backbone.named_parameters()
                               if p.is_leaf and p.requires_grad]
        + [str(tuple(w.shape)) for w in table_weights(s.sharded.backbone) if w.requires_grad],
        "num_table_weights": len(table_weights(s.sharded.backbone)),
        "head_count": count_parameters(s.head)[0],
    }
    batch = fixed_batch(Path(data), s.sharded.features)
    # one manual step: no gradient reaches the backbone
    s.sharded.dmp.train()
    logits = s.sharded.dmp(batch.dense_features, batch.sparse_features)
    torch.nn.functional.binary_cross_entropy_with_logits(logits["scen"], batch.labels["scen"]).backward()
    out["backbone_grads"] = [n for n, p in s.sharded.backbone.named_parameters() if p.grad is not None]
    out["backbone_grads"] += [str(tuple(w.shape)) for w in table_weights(s.sharded.backbone)
                              if w.grad is not None]
    out["head_grads"] = sorted(n for n, p in s.head.named_parameters() if p.grad is not None)
    s.optimizer.zero_grad(set_to_none=True)

    result = run_stage2(s, progress=False)
    out["digest_unchanged"] = backbone_digest(s.sharded.backbone) == loaded
    out["ckpt_unchanged"] = hash_checkpoint(s.sharded.checkpoint) == ckpt_sha
    s.sharded.dmp.eval()
    with torch.no_grad():
        after = unwrap_dmp(s.sharded.dmp)(batch.dense_features, batch.sparse_features)
    out["old_identical"] = all(np.array_equal(after[t].numpy(), stage1_logits[t]) for t in ("ctr", "cvr"))
    out["head_state"] = {k: v.numpy().copy() for k, v in s.head.state_dict().items()}
    # a fresh load of the stage-1 checkpoint (the served union) holds exactly the tuned model's backbone
    from mptrec.pipeline.tasks.union import load_run_for_eval

    served, _, _ = load_run_for_eval(run, "best", device)
    out["digest_equals_fresh_load"] = backbone_digest(unwrap_dmp(served).backbone) == loaded
    out["scen_logits"] = after["scen"].numpy().copy()
    out["result"] = result
    out["num_backbone_tensors"] = len(loaded)
    out.update(_mutate_one_row(s, run, loaded))
    return out


def _mutate_one_row(s: Any, run: str, loaded: dict[str, str]) -> dict[str, Any]:
    """The digest sees a change of ONE embedding row, and run_stage2 refuses such a backbone."""
    import dataclasses

    import mptrec.pipeline.tasks.prompt_tuning as pt
    from mptrec.pipeline.tasks.union import backbone_digest

    sd = s.sharded.backbone.state_dict()
    key = next(k for k in sorted(sd) if "embedding" in k and hasattr(sd[k], "local_shards")
               and sd[k].local_shards())
    row = sd[key].local_shards()[0].tensor[0]  # a view of this rank's shard of the table
    original_row = row.clone()
    out: dict[str, Any] = {"mutated_key": key}
    with torch.no_grad():
        row[0] += 1.0
    now = backbone_digest(s.sharded.backbone)
    out["digest_changed_keys"] = sorted(k for k in now if now[k] != loaded[k])
    with torch.no_grad():
        row.copy_(original_row)
    out["digest_restored"] = backbone_digest(s.sharded.backbone) == loaded
    registry = Path(run) / "tasks.json"
    before = registry.read_bytes()
    train_head = pt.train_head

    def train_and_mutate(st: Any, **kw: Any) -> Any:  # a bug that writes one row during training
        res = train_head(st, **kw)
        with torch.no_grad():
            row[0] += 1.0
        return res

    pt.train_head = train_and_mutate
    s.cfg = dataclasses.replace(s.cfg, epochs=1)
    try:
        pt.run_stage2(s, progress=False)
        out["refused"] = ""
    except RuntimeError as e:
        out["refused"] = str(e)
    finally:
        pt.train_head = train_head
        with torch.no_grad():
            row.copy_(original_row)
    out["registry_untouched"] = registry.read_bytes() == before
    return out


@pytest.fixture(scope="module")
def stage2_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("stage2")
    data = write_stage2_shards(tmp / "data")
    run = tmp / "run"
    s1 = run_multiprocess(_stage1, 1, str(data), str(run))[0]
    s2 = run_multiprocess(_stage2, 2, str(data), str(run), s1["logits"])
    return {"data": data, "run": run, "stage1": s1, "ranks": s2}


@pytest.mark.slow
def test_prompt_tuning_trains_only_the_head_and_keeps_the_backbone(stage2_run: dict[str, Any]) -> None:
    from mptrec.models.mptrec import MPTRecNewTaskHead

    r0, r1 = stage2_run["ranks"]
    for r in (r0, r1):
        assert r["opt_is_head"], "Adam must hold exactly the head's parameters"
        assert r["backbone_trainable"] == [] and r["backbone_grads"] == [] and r["num_table_weights"] >= 1
        # no optimizer of ours on the tables; TorchRec's FUSED kernel keeps its built-in update, which
        # runs only inside the kernel's backward: never reached (no grads above, digest below)
        assert r["head_grads"] == sorted(r["head_state"])
        assert r["digest_unchanged"] and r["ckpt_unchanged"] and r["digest_equals_fresh_load"]
        assert r["old_identical"], "old tasks' predictions changed"
        assert r["result"]["metrics"]["backbone_unchanged"] is True
        assert r["result"]["metrics"]["backbone_tensors_checked"] == r["num_backbone_tensors"] > 0
        # ONE changed embedding row changes the digest (of that table only), and prompt-tune refuses
        assert r["digest_changed_keys"] == [r["mutated_key"]] and r["digest_restored"]
        assert r["refused"].startswith("the frozen backbone changed during prompt tuning: ")
        assert r["mutated_key"] in r["refused"] and r["registry_untouched"]
    # the head is data-parallel: identical on both ranks after training on different rows
    assert r0["head_state"].keys() == r1["head_state"].keys()
    assert all(np.array_equal(r0["head_state"][k], r1["head_state"][k]) for k in r0["head_state"])
    # reported counts are the head's
    eff = r0["result"]["efficiency"]
    assert eff["trainable_params"] == r0["head_count"]
    head = MPTRecNewTaskHead("x", "mptrec", input_dim=1 + 4 * 4, hidden_dim=8, num_tasks=2, tower_hidden=(8,),
                             tau=150.0)
    assert eff["trainable_params"] == sum(p.numel() for p in head.parameters())
    assert 0 < eff["trainable_fraction"] < 1 and 0 < eff["flops_fraction"] < 1
    assert eff["world_size"] == 2 and eff["epochs_run"] >= 1 and eff["peak_rss_mib"] > 0


@pytest.mark.slow
def test_prompt_tuning_learns_and_registers_only_the_head(stage2_run: dict[str, Any]) -> None:
    run = stage2_run["run"]
    metrics = stage2_run["ranks"][0]["result"]["metrics"]
    assert metrics["valid_auc"] > 0.6, metrics
    assert all(r["cached_features"] for r in metrics["valid_history"])  # the feature-cache path
    reg = json.loads((run / "tasks.json").read_text())
    entry = reg["tasks"]["scen"]
    assert entry["status"] == "trained" and entry["metrics"]["valid_auc"] == metrics["valid_auc"]
    assert entry["efficiency"]["trainable_params"] == stage2_run["ranks"][0]["head_count"]
    state = torch.load(run / entry["artifact"], weights_only=True)
    assert set(state) == set(stage2_run["ranks"][0]["head_state"])  # only the new task's weights
    meta = json.loads((run / "tasks" / "scen" / "meta.json").read_text())
    assert meta["versions"]["torch"] == torch.__version__ and meta["config"]["name"] == "scen"
    assert json.loads((run / "tasks" / "scen" / "efficiency.json").read_text()) == entry["efficiency"]
    assert not list(run.rglob("*.tmp*"))


def test_paper_head_counts_from_the_efficiency_report() -> None:
    from mptrec.data_loaders.schema import FeatureSpec
    from mptrec.pipeline.config import DataConfig, TaskSpec
    from mptrec.pipeline.eval.efficiency import static_figures

    def figures(dense: int, sparse: int, dim: int, model: ModelConfig) -> dict[str, Any]:
        feats = [FeatureSpec(f"d{i}", kind="dense") for i in range(dense)]
        feats += [FeatureSpec(f"s{i}", num_embeddings=10, embedding_dim=dim) for i in range(sparse)]
        cfg = RunConfig(name="p", data=DataConfig(path="x"), model=model,
                        tasks=(TaskSpec("t1", "a"), TaskSpec("t2", "b")))
        return static_figures(cfg, feats, NewTaskSpec(name="t3", label="c"), model.tower_hidden)

    census = figures(11, 28, 4, ModelConfig(expert_hidden=(256, 128), tower_hidden=(64, 32)))
    assert census["trainable_params"] == 27_063
    ali = figures(0, 16, 5, ModelConfig(expert_hidden=(128, 64), tower_hidden=(32, 32)))
    assert ali["trainable_params"] == 8_129
    assert ali["flops_per_sample_trained"] < ali["flops_per_sample_full"]


def test_prompt_tune_refuses_a_changed_base_checkpoint(tmp_path: Path) -> None:
    from mptrec.pipeline.rundir import RunDirError
    from mptrec.pipeline.tasks.prompt_tuning import setup_stage2
    from mptrec.pipeline.tasks.store import register_task
    from tests.pipeline.tasks.test_store import make_run, task_toml

    run = make_run(tmp_path)
    register_task(run, task_toml(tmp_path))
    with pytest.raises(RunDirError, match="'nope' is not registered"):
        setup_stage2(run, "nope", torch.device("cpu"))
    with pytest.raises(RunDirError, match="pretrained task"):
        setup_stage2(run, "ctr", torch.device("cpu"))
    (run / "checkpoints" / "best" / "__0_0.distcp").write_bytes(b"retrained")
    with pytest.raises(RunDirError, match="changed since registration"):
        setup_stage2(run, "scenario", torch.device("cpu"))


def _stage2_emb(rank: int, world: int, run: str, stage1_logits: dict[str, np.ndarray]) -> dict[str, Any]:
    """Register (rank 0) and prompt-tune ``mptrec_emb`` on the same run; check what it promises."""
    from mptrec.pipeline.sharding import unwrap_dmp
    from mptrec.pipeline.tasks.prompt_tuning import run_stage2, setup_stage2
    from mptrec.pipeline.tasks.store import register_task
    from mptrec.pipeline.tasks.union import backbone_digest

    if rank == 0:
        toml = Path(run) / "scen_emb.toml"
        toml.write_text(TASK_TOML.replace('name = "scen"', 'name = "scen_emb"')
                        .replace('method = "mptrec"', 'method = "mptrec_emb"'))
        register_task(run, toml)
    torch.distributed.barrier()
    s = setup_stage2(run, "scen_emb", torch.device("cpu"))
    loaded = backbone_digest(s.sharded.backbone)
    result = run_stage2(s, progress=False)
    batch = fixed_batch(Path(stage1_logits["data"].item()), s.sharded.features)
    s.sharded.dmp.eval()
    with torch.no_grad():
        after = unwrap_dmp(s.sharded.dmp)(batch.dense_features, batch.sparse_features)
    return {
        "old_identical": all(np.array_equal(after[t].numpy(), stage1_logits[t]) for t in ("ctr", "cvr")),
        "digest_unchanged": backbone_digest(s.sharded.backbone) == loaded,
        "moved_rows": [int((t.detach().abs().sum(1) > 0).sum()) for t in s.head.deltas],
        "rows": [int(t.shape[0]) for t in s.head.deltas],
        "deltas": [t.detach().numpy().copy() for t in s.head.deltas],
        "metrics": result["metrics"],
    }


@pytest.mark.slow
def test_prompt_tuning_with_own_embedding_offsets(stage2_run: dict[str, Any]) -> None:
    """``mptrec_emb`` moves its own copy of the ids' embeddings; the backbone and old tasks stay put."""
    logits = {**stage2_run["stage1"]["logits"], "data": np.array(str(stage2_run["data"]))}
    r0, r1 = run_multiprocess(_stage2_emb, 2, str(stage2_run["run"]), logits)
    for r in (r0, r1):
        assert r["old_identical"] and r["digest_unchanged"]
        assert r["rows"] == [VOCAB[f] for f in ("f0", "f1", "f2", "f3")]
        assert all(0 < moved <= n for moved, n in zip(r["moved_rows"], r["rows"])), r["moved_rows"]
    assert all(np.array_equal(a, b) for a, b in zip(r0["deltas"], r1["deltas"]))  # replicated
    assert r0["metrics"]["valid_auc"] > 0.6, r0["metrics"]
    assert all(h["cached_features"] for h in r0["metrics"]["valid_history"])  # ids ride in the cache
