from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mptrec.data_loaders.batch import Batch
from mptrec.pipeline.distributed import first_row, lockstep
from mptrec.pipeline.eval.auc import binary_metrics
from mptrec.pipeline.eval.evaluate import evaluate, write_report_json
from tests.dist import run_multiprocess

NUM_ITEMS = 50
TASKS = ["ctr", "cvr"]


def make_batch(start: int, size: int, seed: int) -> Batch:
    """Rows ``start .. start+size-1``: dense (B, 3), KJT {user: 1 id, item: 0..2 ids}, ctr/cvr labels."""
    g = torch.Generator().manual_seed(seed)
    users = torch.randint(0, 6, (size,), generator=g)
    item_len = torch.randint(0, 3, (size,), generator=g)
    items = torch.randint(0, NUM_ITEMS, (int(item_len.sum()),), generator=g)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["user", "item"], values=torch.cat([users, items]),
        lengths=torch.cat([torch.ones(size, dtype=torch.long), item_len]))
    dense = torch.randn(size, 3, generator=g)
    click = (torch.rand(size, generator=g) < 0.4).float()
    buy = click * (torch.rand(size, generator=g) < 0.5).float()
    return Batch(dense_features=dense, sparse_features=kjt, labels={"ctr": click, "cvr": buy},
                 sample_ids=torch.arange(start, start + size))


def make_batches(sizes: list[int], start: int = 0, seed: int = 0) -> list[Batch]:
    out = []
    for i, size in enumerate(sizes):
        out.append(make_batch(start, size, seed * 1000 + i))
        start += size
    return out


class FakeModel(nn.Module):
    """model(dense, kjt) -> {ctr, cvr} logits; optionally a collective per call, like a DMP forward."""

    def __init__(self, collective: bool = False, forbid_user: bool = False) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.emb = nn.EmbeddingBag(NUM_ITEMS, 3, mode="sum", include_last_offset=True)
        self.lin = nn.Linear(3, 2)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
        self.collective = collective
        self.forbid_user = forbid_user
        self.calls = 0

    def forward(self, dense: torch.Tensor, kjt: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        self.calls += 1
        if self.forbid_user and "user" in kjt.keys():
            raise AssertionError("the user field reached the model")
        item = kjt["item"]
        out = self.lin(dense + self.emb(item.values(), item.offsets()))
        if self.collective:
            import torch.distributed as dist

            dist.all_reduce(torch.zeros(1))
        return {"ctr": out[:, 0], "cvr": out[:, 1], "unused": out[:, 0]}


def reference(batches: list[Batch]) -> dict[str, np.ndarray]:
    model = FakeModel().eval()
    with torch.no_grad():
        outs = [model(b.dense_features, b.sparse_features) for b in batches]
    ref = {f"logit_{t}": torch.cat([o[t] for o in outs]).numpy() for t in TASKS}
    ref |= {f"label_{t}": torch.cat([b.labels[t] for b in batches]).numpy() for t in TASKS}
    ref["user"] = torch.cat([b.sparse_features["user"].values() for b in batches]).numpy()
    return ref


def test_evaluate_single_process_report(tmp_path: Path) -> None:
    batches = make_batches([64, 64, 30])
    ref = reference(batches)
    dump = tmp_path / "sub" / "pred.parquet"
    model = FakeModel(forbid_user=True)
    model.train()
    report = evaluate(model, batches, TASKS, dump_predictions=dump, user_field="user",
                      user_field_is_input=False, checkpoint="best", data="DATA", split="test",
                      progress=False)
    assert model.training  # restored
    assert set(report) >= {"tasks", "world_size", "checkpoint", "data", "created", "split", "rows",
                           "timing", "predictions", "cvr_on_clicks", "user_field", "gauc", "gauc_groups"}
    assert report["rows"] == 158 and report["world_size"] == 1 and report["checkpoint"] == "best"
    assert list(report["tasks"]) == TASKS
    for t in TASKS:
        m = report["tasks"][t]
        assert m == binary_metrics(ref[f"logit_{t}"], ref[f"label_{t}"])
        assert m["auc"] == pytest.approx(roc_auc_score(ref[f"label_{t}"], ref[f"logit_{t}"]), abs=1e-6)
    clicked = ref["label_ctr"] == 1
    assert report["cvr_on_clicks"]["n"] == int(clicked.sum())
    assert report["cvr_on_clicks"]["auc"] == pytest.approx(
        roc_auc_score(ref["label_cvr"][clicked], ref["logit_cvr"][clicked]), abs=1e-6)
    assert report["gauc_groups"]["ctr"] >= 1 and 0 <= report["gauc"]["ctr"] <= 1
    table = pq.read_table(dump).to_pydict()
    assert table["sample_id"] == list(range(158))
    assert set(table) == {"sample_id", "label_ctr", "logit_ctr", "label_cvr", "logit_cvr", "group"}
    np.testing.assert_allclose(table["logit_cvr"], ref["logit_cvr"], rtol=1e-6)
    assert table["group"] == ref["user"].tolist()
    out = tmp_path / "eval.json"
    write_report_json(report, out)
    assert json.loads(out.read_text())["tasks"]["ctr"]["n"] == 158
    assert not list(tmp_path.glob(".*tmp*"))


def test_single_class_task_is_null_in_json(tmp_path: Path) -> None:
    batches = make_batches([20])
    batches[0].labels["cvr"].zero_()
    report = evaluate(FakeModel(), batches, ["cvr"], progress=False)
    write_report_json(report, tmp_path / "r.json")
    loaded = json.loads((tmp_path / "r.json").read_text())
    assert loaded["tasks"]["cvr"]["auc"] is None and loaded["tasks"]["cvr"]["calibration"] is None
    assert "cvr_on_clicks" not in loaded and "gauc" not in loaded


def test_evaluate_errors_name_the_problem() -> None:
    batches = make_batches([8])
    batches[0].labels["other"] = batches[0].labels["ctr"]
    with pytest.raises(KeyError, match=r"no logits for task\(s\) \['other'\]"):
        evaluate(FakeModel(), batches, ["ctr", "other"], progress=False)
    del batches[0].labels["cvr"]
    with pytest.raises(KeyError, match=r"no labels for task\(s\) \['cvr'\]"):
        evaluate(FakeModel(), batches, TASKS, progress=False)
    with pytest.raises(KeyError, match="user field 'uid'"):
        evaluate(FakeModel(), make_batches([8]), TASKS, user_field="uid", progress=False)
    dup = make_batches([8]) + make_batches([8])  # the same sample_ids twice
    with pytest.raises(RuntimeError, match="scored more than once"):
        evaluate(FakeModel(), dup, TASKS, progress=False)


def test_evaluate_accepts_a_plain_callable() -> None:
    batches = make_batches([10, 5])
    model = FakeModel()

    def score(dense: torch.Tensor, kjt: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        return model(dense, kjt)

    assert evaluate(score, batches, ["ctr"], progress=False)["rows"] == 15


def test_first_row_keeps_keys_and_widths() -> None:
    b = make_batch(10, 5, 3)
    one = first_row(b)
    assert one.batch_size == 1 and one.sparse_features.keys() == ["user", "item"]
    assert one.sparse_features.stride() == 1
    assert one.sample_ids.tolist() == [10]
    assert torch.equal(one.sparse_features["item"].values(),
                       b.sparse_features["item"].values()[: int(b.sparse_features["item"].lengths()[0])])


def test_lockstep_without_process_group_yields_every_batch() -> None:
    batches = make_batches([3, 4])
    assert [(b.batch_size, real) for b, real in lockstep(batches)] == [(3, True), (4, True)]


# ---- two ranks, uneven batches ---------------------------------------------------------------

RANK_SIZES = {
    "uneven": [[40, 40, 40, 17], [40, 9]],
    "empty_rank": [[40, 40, 33], []],
}


def _rank_batches(case: str, rank: int) -> list[Batch]:
    sizes = RANK_SIZES[case]
    start = sum(sum(s) for s in sizes[:rank])
    return make_batches(sizes[rank], start=start, seed=rank + 1)


def _eval_worker(rank: int, world_size: int, dump_dir: str, data_dir: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for case in sorted(RANK_SIZES):
        model = FakeModel(collective=True)
        report = evaluate(model, _rank_batches(case, rank), TASKS, user_field="user", progress=False,
                          dump_predictions=f"{dump_dir}/{case}.parquet")
        out[case] = {"report": report, "calls": model.calls}
    # evaluate_run over real shards read by the real ShardDataset (row groups split over ranks)
    import mptrec.pipeline
    import mptrec.pipeline.tasks.union
    from mptrec.pipeline.eval.evaluate_run import evaluate_run

    union = _shard_union(Path(data_dir))
    mptrec.pipeline.tasks.union.load_run_for_eval = union.load_run_for_eval  # type: ignore[attr-defined]
    out["shards"] = evaluate_run(dump_dir, device=torch.device("cpu"), user_field="101", progress=False,
                                 dump_predictions=f"{dump_dir}/shards.parquet")
    return out


@pytest.mark.slow
def test_two_ranks_score_every_row_exactly_once(tmp_path: Path) -> None:
    data_dir = _synth(tmp_path / "data")
    # all cases in one pair of processes (process start-up dominates the time)
    per_rank = run_multiprocess(_eval_worker, 2, str(tmp_path), str(data_dir))
    ref = _shard_reference(data_dir)
    for r in per_rank:
        _check_shard_report(r["shards"], ref)
        assert r["shards"]["world_size"] == 2
    assert per_rank[0]["shards"]["gauc"] == per_rank[1]["shards"]["gauc"]
    table = pq.read_table(tmp_path / "shards.parquet").to_pydict()
    assert table["sample_id"] == list(range(1500))
    np.testing.assert_array_equal(table["logit_cvr"], ref["cvr"])
    for case, sizes in RANK_SIZES.items():
        results = [r[case] for r in per_rank]
        ref = reference(_rank_batches(case, 0) + _rank_batches(case, 1))
        total = sum(sum(s) for s in sizes)
        calls = {r["calls"] for r in results}
        assert calls == {max(len(s) for s in sizes)}  # same number of forwards on each rank
        assert results[0]["report"]["tasks"] == results[1]["report"]["tasks"]
        report = results[0]["report"]
        assert report["world_size"] == 2 and report["rows"] == total
        for t in TASKS:
            assert report["tasks"][t]["n"] == total
            assert report["tasks"][t]["auc"] == pytest.approx(
                roc_auc_score(ref[f"label_{t}"], ref[f"logit_{t}"]), abs=1e-6)
        table = pq.read_table(tmp_path / f"{case}.parquet").to_pydict()
        assert table["sample_id"] == list(range(total))
        np.testing.assert_allclose(table["logit_ctr"], ref["logit_ctr"], rtol=1e-6)


# ---- a real DistributedModelParallel model (collectives inside forward) ----------------------

def _dmp_worker(rank: int, world_size: int, case: str) -> dict[str, Any]:
    import torch.distributed as dist
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.types import ParameterConstraints
    from torchrec.distributed.types import ShardingEnv

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            tables = [EmbeddingBagConfig(name=f"t_{k}", embedding_dim=4, num_embeddings=NUM_ITEMS,
                                         feature_names=[k]) for k in ("user", "item")]
            self.ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
            self.lin = nn.Linear(3 + 8, 2)

        def forward(self, dense: torch.Tensor, kjt: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
            d = self.ebc(kjt).to_dict()
            out = self.lin(torch.cat([dense, d["user"], d["item"]], dim=1))
            return {"ctr": out[:, 0], "cvr": out[:, 1]}

    torch.manual_seed(0)
    module = Tiny()
    constraints = {f"t_{k}": ParameterConstraints(sharding_types=["table_wise"]) for k in ("user", "item")}
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=world_size, compute_device="cpu"),
                                       constraints=constraints)
    sharders = [EmbeddingBagCollectionSharder()]
    plan = planner.collective_plan(module, sharders, dist.GroupMember.WORLD)
    model = DistributedModelParallel(module, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
                                     device=torch.device("cpu"), plan=plan, sharders=sharders)
    report = evaluate(model, _rank_batches(case, rank), TASKS, user_field="user", progress=False)
    return report


@pytest.mark.slow
def test_evaluate_under_dmp_with_an_empty_rank() -> None:
    # rank 1 owns no batch: it feeds a one-row filler (40-row batches on rank 0) three times
    case = "empty_rank"
    reports = run_multiprocess(_dmp_worker, 2, case, timeout=120)
    total = sum(sum(s) for s in RANK_SIZES[case])
    assert reports[0]["rows"] == reports[1]["rows"] == total
    assert reports[0]["tasks"] == reports[1]["tasks"]
    assert reports[0]["tasks"]["ctr"]["auc"] is not None


# ---- mptrec eval (launch/cmd_eval.py -> evaluate_run), with the run loader and dataset faked --

def _fake_data_dir(root: Path, rows: int) -> Path:
    from mptrec.data_loaders.layout import write_schema

    (root / "test").mkdir(parents=True)
    (root / "test" / "part-00000.parquet").write_bytes(b"")
    write_schema(root, {
        "dataset": "census", "version": 1,
        "features": [{"name": f"d{i}", "kind": "dense"} for i in range(3)] + [
            {"name": "user", "kind": "sparse", "num_embeddings": 6},
            {"name": "item", "kind": "sparse", "num_embeddings": NUM_ITEMS, "multivalent": True}],
        "labels": {"click": {"values": [0, 1]}, "purchase": {"values": [0, 1]}},
        "splits": {"test": {"files": ["test/part-00000.parquet"], "rows": [rows]}},
    })
    return root


def _install_fakes(monkeypatch: pytest.MonkeyPatch, data_dir: Path, forbid_user: bool) -> dict[str, Any]:
    import types

    import mptrec.pipeline
    from mptrec.pipeline.config import DataConfig, RunConfig, TaskSpec

    seen: dict[str, Any] = {}
    tasks = [TaskSpec(name="ctr", label="click"), TaskSpec(name="cvr", label="purchase")]

    def load_run_for_eval(run_dir: str, checkpoint: str, device: torch.device) -> tuple[Any, Any, Any]:
        seen["load"] = (run_dir, checkpoint, str(device))
        cfg = RunConfig(name="fake", data=DataConfig(path=str(data_dir)), tasks=tuple(tasks))
        return FakeModel(forbid_user=forbid_user), cfg, tasks

    class ShardDataset:
        def __init__(self, data_dir: str, split: str, **kwargs: Any) -> None:
            seen["dataset"] = {"data_dir": data_dir, "split": split, **kwargs}
            self.batch_size = kwargs["batch_size"]

        def __iter__(self) -> Any:
            sizes = [self.batch_size] * 3 + [7]
            return iter(make_batches(sizes))

    dataset = types.ModuleType("mptrec.data_loaders.dataset")
    dataset.ShardDataset = ShardDataset  # type: ignore[attr-defined]
    dataset.make_dataloader = lambda ds, num_workers: ds  # type: ignore[attr-defined]
    import mptrec.pipeline.tasks.union

    monkeypatch.setattr(mptrec.pipeline.tasks.union, "load_run_for_eval", load_run_for_eval)
    monkeypatch.setitem(sys.modules, "mptrec.data_loaders.dataset", dataset)
    return seen


@pytest.mark.parametrize("user_is_input", [True, False])
def test_mptrec_eval_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, user_is_input: bool) -> None:
    from mptrec.launch.cli import main

    data_dir = _fake_data_dir(tmp_path / "data", 103)
    seen = _install_fakes(monkeypatch, data_dir, forbid_user=not user_is_input)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    argv = ["eval", "--run", str(run_dir), "--checkpoint", "last", "--device", "cpu", "--no-progress",
            "--user-field", "user", "--dump-predictions", str(run_dir / "pred.parquet"),
            "--set", "data.batch_size=32"]
    if not user_is_input:
        argv += ["--set", 'features.exclude=["user"]']
    assert main(argv) == 0
    report = json.loads((run_dir / "eval.json").read_text())
    assert seen["load"] == (str(run_dir), "last", "cpu")
    ds = seen["dataset"]
    assert ds["split"] == "test" and ds["batch_size"] == 32 and ds["shuffle"] is False
    assert (ds["rank"], ds["world_size"]) == (0, 1)
    assert [f.name for f in ds["features"]][-2:] == (["user", "item"] if user_is_input else ["item", "user"])
    assert [spec.column for spec in ds["labels"]] == ["click", "purchase"]
    assert report["rows"] == 103 and report["checkpoint"] == "last"
    assert report["predictions"] == "pred.parquet"
    assert report["gauc"]["ctr"] is not None and report["cvr_on_clicks"]["n"] > 0
    assert pq.read_table(run_dir / "pred.parquet").num_rows == 103


# ---- evaluate_run over real shards (the real ShardDataset; only the run loader is faked) ------

def _synth(path: Path) -> Path:
    from mptrec.data_loaders.synth import generate_aliccp

    generate_aliccp(path, rows=3000, shards=2, seed=0, split={"train": 0.5, "test": 0.5}, row_group_size=125,
                    click_rate=0.2, purchase_rate=0.2)
    return path


def _shard_logits(ids205: np.ndarray, ids206: np.ndarray) -> dict[str, np.ndarray]:
    return {"ctr": (ids205 % 13).astype(np.float32), "cvr": (ids206 % 7).astype(np.float32)}  # many ties


class ShardModel(nn.Module):
    def forward(self, dense: torch.Tensor, kjt: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        if "101" in kjt.keys() or "301" in kjt.keys():
            raise AssertionError(f"excluded field reached the model: {kjt.keys()}")
        out = _shard_logits(kjt["205"].values().numpy(), kjt["206"].values().numpy())
        return {k: torch.from_numpy(v) for k, v in out.items()}


def _shard_union(data_dir: Path) -> Any:
    """A stand-in for mptrec.pipeline.tasks.union whose load_run_for_eval returns ShardModel."""
    import types

    from mptrec.pipeline.config import DataConfig, FeaturesConfig, RunConfig, TaskSpec

    tasks = (TaskSpec(name="ctr", label="click"), TaskSpec(name="cvr", label="purchase"))
    cfg = RunConfig(name="synth", data=DataConfig(path=str(data_dir), batch_size=100), tasks=tasks,
                    features=FeaturesConfig(exclude=("101", "301")))
    union = types.ModuleType("mptrec.pipeline.tasks.union")
    union.load_run_for_eval = lambda run_dir, checkpoint, device: (ShardModel(), cfg, list(tasks))  # type: ignore
    return union


def _shard_reference(data_dir: Path) -> dict[str, np.ndarray]:
    table = pq.ParquetDataset([data_dir / "test" / f"part-0000{i}.parquet" for i in range(2)]).read()
    cols = {c: table.column(c).to_numpy() for c in ("205", "206", "click", "purchase", "101")}
    return {**_shard_logits(cols["205"], cols["206"]), "click": cols["click"], "purchase": cols["purchase"],
            "101": cols["101"]}


def _check_shard_report(report: dict[str, Any], ref: dict[str, np.ndarray]) -> None:
    assert report["rows"] == 1500
    for task, label in (("ctr", "click"), ("cvr", "purchase")):
        assert report["tasks"][task]["auc"] == pytest.approx(roc_auc_score(ref[label], ref[task]), abs=1e-9)
        assert report["tasks"][task]["positives"] == int(ref[label].sum())


def test_eval_command_on_real_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mptrec.pipeline.tasks.union
    from mptrec.launch.cli import main

    data_dir = _synth(tmp_path / "data")
    union = _shard_union(data_dir)
    monkeypatch.setattr(mptrec.pipeline.tasks.union, "load_run_for_eval", union.load_run_for_eval)
    pred = tmp_path / "pred.parquet"
    assert main(["eval", "--run", str(tmp_path), "--device", "cpu", "--no-progress", "--user-field", "101",
                 "--dump-predictions", str(pred), "--out", str(tmp_path / "e.json")]) == 0
    report = json.loads((tmp_path / "e.json").read_text())
    ref = _shard_reference(data_dir)
    _check_shard_report(report, ref)
    table = pq.read_table(pred).to_pydict()
    assert table["sample_id"] == list(range(1500))
    np.testing.assert_array_equal(table["logit_ctr"], ref["ctr"])  # sample_id is the row of the split
    np.testing.assert_array_equal(table["group"], ref["101"])
