"""Serving: ``mptrec export`` (torch.export artifact) and ``mptrec predict`` (batch scoring).

Fast tests check the pieces on a fresh model (pooling numerics, quantisation, dynamic shapes,
export == eager). The slow ones share one fixture: a 2-process stage-1 run on tiny shards with a
list feature (some rows empty), an export of it, a prompt-tuned task added on 2 processes, a
re-export, and ``mptrec eval --dump-predictions`` after each stage as the reference.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.modules.embedding_configs import PoolingType

from mptrec.data_loaders.schema import FeatureSpec
from mptrec.launch.cli import main
from mptrec.models import ModelConfig, NewTaskModel, build_model
from mptrec.pipeline.serve.artifact import ArtifactError, read_manifest
from mptrec.pipeline.serve.export import ExportError, example_inputs, export_program, export_run
from mptrec.pipeline.serve.predict import predict
from mptrec.pipeline.serve.serving_module import (
    PooledTables,
    ServingModule,
    SparseBatch,
    quantize_rowwise_int8,
)
from tests.dist import run_multiprocess
from tests.pipeline.tasks.test_prompt_tuning import TASK_TOML, VOCAB, stage1_config

REPO = Path(__file__).resolve().parents[3]
LIST_VOCAB = 10


# --------------------------------------------------------------------------------------------
# Fast: the pieces, on a fresh model
# --------------------------------------------------------------------------------------------


def _fresh_model(seed: int = 0, name: str = "mptrec",
                 method: str = "mptrec") -> tuple[NewTaskModel, list[FeatureSpec]]:
    """A backbone (unsharded EBC: one sum feature, one mean list feature) and a new-task head."""
    torch.manual_seed(seed)
    features = [FeatureSpec("d0", kind="dense"), FeatureSpec("a", num_embeddings=7, embedding_dim=4),
                FeatureSpec("l", num_embeddings=9, embedding_dim=4, multivalent=True, pooling="mean")]
    ebc = EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name="t_a", embedding_dim=4, num_embeddings=7, feature_names=["a"]),
        EmbeddingBagConfig(name="t_l", embedding_dim=4, num_embeddings=9, feature_names=["l"],
                           pooling=PoolingType.MEAN)])
    base = build_model(ModelConfig(name=name, expert_hidden=(16, 8), tower_hidden=(4,)), ebc,
                       sparse_features=["a", "l"], dense_dim=1, task_names=["ctr", "cvr"])
    model = NewTaskModel(base, {"t3": base.new_task_head("t3", method)})
    return model.eval(), features


def _serving(model: NewTaskModel, features: list[FeatureSpec],
             quantize: str | None = None) -> ServingModule:
    import copy

    m = copy.deepcopy(model)
    sparse = [f for f in features if f.kind == "sparse"]
    weights = {f.name: m.backbone.ebc.embedding_bags[f"t_{f.name}"].weight for f in sparse}
    return ServingModule(m.backbone, dict(m.heads.items()), PooledTables(sparse, weights, quantize))


def _kjt(values: list[torch.Tensor], lengths: list[torch.Tensor]) -> KeyedJaggedTensor:
    return KeyedJaggedTensor.from_lengths_sync(["a", "l"], torch.cat(values), torch.cat(lengths))


def test_mean_pooling_is_sum_times_reciprocal_and_empty_bags_are_zero() -> None:
    f = FeatureSpec("l", num_embeddings=5, embedding_dim=3, multivalent=True, pooling="mean")
    w = torch.randn(5, 3)
    t = PooledTables([f], {"l": w})
    values, lengths = torch.tensor([0, 1, 2, 4, 4, 3]), torch.tensor([3, 0, 2, 1])
    got = t(SparseBatch([values], [lengths])).to_dict()["l"]
    want = torch.stack([(w[0] + w[1] + w[2]) * (1.0 / 3), torch.zeros(3), (w[4] + w[4]) * 0.5, w[3]])
    assert torch.equal(got, want)


def test_rowwise_int8_reconstructs_within_half_a_step() -> None:
    w = torch.randn(50, 8) * 3
    q, scale, bias = quantize_rowwise_int8(w)
    assert q.dtype == torch.uint8 and scale.dtype == torch.float16 and bias.dtype == torch.float16
    back = q.float() * scale.float().unsqueeze(1) + bias.float().unsqueeze(1)
    step = scale.float().unsqueeze(1)
    # half a step of rounding, plus the fp16 rounding of the bias (the row minimum)
    assert bool(((back - w).abs() <= step / 2 + bias.float().abs().unsqueeze(1) * 2**-10 + 1e-6).all())
    const = torch.full((1, 4), 0.25)
    q1, s1, b1 = quantize_rowwise_int8(const)
    assert torch.equal(q1.float() * s1.float() + b1.float(), const)


@pytest.mark.parametrize("dim", [4, 5, 8])
def test_packed_quantised_rows_decode_to_the_quantised_values(dim: int) -> None:
    features = [FeatureSpec("s", num_embeddings=30, embedding_dim=dim),
                FeatureSpec("m", num_embeddings=30, embedding_dim=dim, multivalent=True, pooling="mean")]
    w = {"s": torch.randn(30, dim), "m": torch.randn(30, dim)}
    ids, lengths = torch.tensor([3, 29, 0, 7]), torch.tensor([2, 0, 1, 1])
    batch = SparseBatch([ids, ids], [torch.ones(4, dtype=torch.long), lengths])
    ref = PooledTables(features, w)(batch).to_dict()
    q, scale, bias = quantize_rowwise_int8(w["s"])
    want = q[ids].float() * scale[ids].float().unsqueeze(1) + bias[ids].float().unsqueeze(1)
    int8 = PooledTables(features, w, "int8")
    torch.testing.assert_close(int8(batch).to_dict()["s"], want, rtol=0, atol=1e-6)
    torch.testing.assert_close(int8(batch).to_dict()["m"], ref["m"], rtol=0, atol=0.05)
    fp16 = PooledTables(features, w, "fp16")(batch).to_dict()
    assert torch.equal(fp16["s"], w["s"][ids].half().float())
    assert int8.table_bytes() == 30 * 2 * (dim + (-dim) % 4 + 4)


def test_serving_module_equals_the_eager_model_and_exports_with_dynamic_shapes() -> None:
    model, features = _fresh_model()
    serving = _serving(model, features)
    dense, values, lengths = torch.randn(6, 1), [torch.tensor([0, 3, 6, 1, 2, 5]),
                                                 torch.tensor([1, 8, 8, 2, 0, 4, 7])], \
        [torch.ones(6, dtype=torch.long), torch.tensor([2, 0, 1, 3, 1, 0])]
    with torch.no_grad():
        want = model(dense, _kjt(values, lengths))
        got = serving(dense, values, lengths)
    assert list(got) == ["ctr", "cvr", "t3"]
    # torchrec's unsharded EBC mean-pools as sum / L, ours as sum * (1 / L) (FBGEMM's): last-bit apart
    for t in got:
        torch.testing.assert_close(got[t], want[t], rtol=0, atol=1e-6)
    program = export_program(serving, features).module()
    for batch in (1, 3, 6):
        args = (dense[:batch], [values[0][:batch], values[1][: int(lengths[1][:batch].sum())]],
                [lengths[0][:batch], lengths[1][:batch]])
        with torch.inference_mode():
            out, ref = program(*args), serving(*args)
        assert all(torch.equal(out[t], ref[t]) for t in ref), batch
    # batch 2 with no id at all in the list feature (N_f = 0)
    empty = torch.zeros(0, dtype=torch.long)
    args = (dense[:2], [values[0][:2], empty], [lengths[0][:2], torch.zeros(2, dtype=torch.long)])
    with torch.inference_mode():
        out, ref = program(*args), serving(*args)
    assert all(torch.equal(out[t], ref[t]) for t in ref)
    ops = {str(n.target) for n in export_program(serving, features).graph.nodes if n.op == "call_function"}
    assert not [o for o in ops if o.startswith(("torchrec", "fbgemm"))], ops


@pytest.mark.parametrize(("name", "method"), [("mptrec", "mptrec_res"), ("mptrec", "tes"), ("ple", "ple*"),
                                            ("mmoe", "mmoe*"), ("shared_bottom", "shared_bottom*"),
                                            ("single_task", "single_task")])
def test_every_model_and_head_exports(name: str, method: str) -> None:
    model, features = _fresh_model(2, name, method)
    serving = _serving(model, features)
    args = example_inputs(features, 1, batch=6)
    values, lengths = args[1], args[2]
    with torch.no_grad():
        want = model(args[0], _kjt(values, lengths))
    program = export_program(serving, features).module()
    with torch.inference_mode():
        got, eager = program(*args), serving(*args)
    assert list(got) == ["ctr", "cvr", "t3"]
    for t in want:
        assert torch.equal(got[t], eager[t]), t
        torch.testing.assert_close(got[t], want[t], rtol=0, atol=1e-6)


def test_quantised_tables_stay_close_and_are_smaller() -> None:
    model, features = _fresh_model(1)
    fp32, int8, fp16 = (_serving(model, features, q) for q in (None, "int8", "fp16"))
    args = example_inputs(features, 1, batch=16)
    with torch.inference_mode():
        ref, q8, q16 = fp32(*args), int8(*args), fp16(*args)
    for t in ref:
        assert not torch.equal(ref[t], q8[t])
        torch.testing.assert_close(q8[t], ref[t], rtol=0, atol=0.05)
        torch.testing.assert_close(q16[t], ref[t], rtol=0, atol=0.01)
    size = {k: m.backbone.ebc.table_bytes() for k, m in (("fp32", fp32), ("int8", int8), ("fp16", fp16))}
    assert size["fp16"] * 2 == size["fp32"] and size["int8"] * 2 == size["fp32"]  # width 4: 4 + 2 + 2 bytes


def test_docstring_examples_run() -> None:
    import doctest

    import mptrec.pipeline.serve.serving_module as serving_module

    result = doctest.testmod(serving_module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0, result


def test_predict_component_runs_mptrec_predict() -> None:
    from mptrec.launch.components import predict as component

    app = component("--threads", "1", model="m", data="d", out="o.parquet", j="1x2")
    cmd = app.roles[0].args[-1]
    assert app.roles[0].name == "predict" and "--nproc_per_node 2" in cmd
    assert "mptrec.launch.cli predict --model m --data d --out o.parquet --split test" in cmd
    assert cmd.rstrip().endswith("--threads 1")


# --------------------------------------------------------------------------------------------
# Slow: a real run, exported, extended with a prompt-tuned task, re-exported
# --------------------------------------------------------------------------------------------


def _write_shards(out: Path, seed: int = 0) -> Path:
    """The stage-2 test shards plus a list feature ``lst`` (0..3 ids per row, some rows empty)."""
    from mptrec.data_loaders.layout import write_schema
    from mptrec.data_loaders.shard_writer import write_table_splits

    rows = {"train": 1472, "valid": 512, "test": 256}
    rng = np.random.default_rng(seed)
    n = sum(rows.values())
    w = {k: rng.normal(0, 1, v) for k, v in {**VOCAB, "lst": LIST_VOCAB}.items()}
    ids = {k: rng.integers(0, v, n) for k, v in VOCAB.items() if k != "g"}
    lens = rng.integers(0, 4, n)
    lst = [rng.integers(0, LIST_VOCAB, k).tolist() for k in lens]
    lst_mean = np.array([w["lst"][x].mean() if x else 0.0 for x in lst])
    d0 = rng.random(n).astype(np.float32)
    shared = w["f0"][ids["f0"]] + w["f1"][ids["f1"]]
    click = rng.random(n) < 1 / (1 + np.exp(-(1.5 * shared + d0 + lst_mean - 0.5)))
    buy = rng.random(n) < 1 / (1 + np.exp(-(1.5 * w["f2"][ids["f2"]] + shared - 1.0)))
    p2 = 1 / (1 + np.exp(-(-2.0 * w["f1"][ids["f1"]] + 2.0 * w["f3"][ids["f3"]] - 0.3)))
    g = np.where(rng.random(n) < p2, 2, rng.choice([1, 3], n)).astype(np.int64)
    table = pa.table({"d0": pa.array(d0), **{k: pa.array(v, pa.int64()) for k, v in ids.items()},
                      "lst": pa.array(lst, pa.list_(pa.int64())), "g": pa.array(g, pa.int64()),
                      "click": pa.array(click.astype(np.int8)), "purchase": pa.array(buy.astype(np.int8))})
    names = list(rows)
    codes = np.concatenate([np.full(rows[s], i, dtype=np.int8) for i, s in enumerate(names)])
    out.mkdir(parents=True, exist_ok=True)
    splits, stats = write_table_splits(out, table, codes, names, shards=2, row_group_size=64,
                                       label_columns=["click", "purchase"])
    features: list[dict[str, Any]] = [{"name": "d0", "kind": "dense"}]
    features += [{"name": k, "kind": "sparse", "num_embeddings": v} for k, v in VOCAB.items()]
    features.append({"name": "lst", "kind": "sparse", "num_embeddings": LIST_VOCAB, "multivalent": True})
    write_schema(out, {"dataset": "tiny-serving", "version": 1, "features": features,
                       "labels": {"click": {"values": [0, 1]}, "purchase": {"values": [0, 1]},
                                  "g": {"values": [1, 2, 3]}},
                       "splits": splits, "stats": stats, "sources": [], "notes": "tests"})
    return out


def _stage1_and_eval(rank: int, world: int, data: str, run: str) -> None:
    from mptrec.pipeline.eval.evaluate_run import evaluate_run
    from mptrec.pipeline.train.pretrain import pretrain

    cpu = torch.device("cpu")
    pretrain(stage1_config(Path(data), Path(run)), device=cpu, progress=False)
    evaluate_run(run, device=cpu, dump_predictions=Path(run) / "eval_a.parquet", progress=False)


def _stage2_and_eval(rank: int, world: int, run: str) -> None:
    from mptrec.pipeline.eval.evaluate_run import evaluate_run
    from mptrec.pipeline.tasks.prompt_tuning import run_stage2, setup_stage2

    cpu = torch.device("cpu")
    run_stage2(setup_stage2(run, "scen", cpu, ["epochs=1"]), progress=False)
    evaluate_run(run, device=cpu, dump_predictions=Path(run) / "eval_b.parquet", progress=False)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from mptrec.pipeline.tasks.store import register_task

    tmp = tmp_path_factory.mktemp("export")
    data, run = _write_shards(tmp / "data"), tmp / "run"
    run_multiprocess(_stage1_and_eval, 2, str(data), str(run))  # tables sharded over 2 processes
    export_run(run, tmp / "a")
    export_run(run, tmp / "a8", quantize="int8")
    (tmp / "scen.toml").write_text(TASK_TOML)
    register_task(run, tmp / "scen.toml")
    run_multiprocess(_stage2_and_eval, 2, str(run))
    export_run(run, tmp / "b")
    return {"tmp": tmp, "data": data, "run": run, "a": tmp / "a", "a8": tmp / "a8", "b": tmp / "b"}


def _read(path: Path) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in pq.read_table(path).to_pydict().items()}


def _predict(served: dict[str, Path], model: str, name: str, **kw: Any) -> dict[str, np.ndarray]:
    out = served["tmp"] / f"{name}.parquet"
    predict(served[model], served["data"], out, progress=False, **kw)
    return _read(out)


@pytest.mark.slow
def test_fp32_predictions_equal_eval_dump_bit_for_bit(served: dict[str, Path]) -> None:
    for model, dump, tasks in (("a", "eval_a", ["ctr", "cvr"]), ("b", "eval_b", ["ctr", "cvr", "scen"])):
        got = _predict(served, model, f"pred_{model}")
        ref = _read(served["run"] / f"{dump}.parquet")
        assert list(got) == ["sample_id"] + [f"{t}_{c}" for t in tasks for c in ("prob", "logit")]
        assert np.array_equal(got["sample_id"], ref["sample_id"]) and got["sample_id"].shape == (256,)
        for t in tasks:
            x, y = got[f"{t}_logit"].astype(np.float32), ref[f"logit_{t}"].astype(np.float32)
            assert np.array_equal(x, y), (model, t, float(np.abs(x - y).max()))
            prob = torch.sigmoid(torch.from_numpy(x)).numpy()
            assert np.array_equal(got[f"{t}_prob"].astype(np.float32), prob)


@pytest.mark.slow
def test_reexport_with_a_new_task_keeps_old_outputs_bit_identical(served: dict[str, Path]) -> None:
    a, b = read_manifest(served["a"]).raw, read_manifest(served["b"]).raw
    assert [t["name"] for t in a["tasks"]] == ["ctr", "cvr"]
    assert [(t["name"], t["role"], t["method"]) for t in b["tasks"]] == [
        ("ctr", "pretrained", "mptrec"), ("cvr", "pretrained", "mptrec"), ("scen", "prompt_tuned", "mptrec")]
    sha = a["run"]["checkpoint_sha256"]
    assert b["tasks"][2]["base_checkpoint_sha256"] == sha == b["run"]["checkpoint_sha256"]
    assert a["schema_sha256"] == b["schema_sha256"] and a["features"] == b["features"]
    assert set(a["versions"]) >= {"torch", "torchrec", "mptrec"} and a["format_version"] == 1
    for batch in (8192, 7):
        old = _predict(served, "a", "old", batch_size=batch)
        new = _predict(served, "b", "new", batch_size=batch)
        for t in ("ctr", "cvr"):
            assert np.array_equal(old[f"{t}_logit"], new[f"{t}_logit"]), (batch, t)
        assert "scen_logit" in new and "scen_logit" not in old


@pytest.mark.slow
def test_batch_size_moves_logits_by_at_most_1e_6(served: dict[str, Path]) -> None:
    """The CPU GEMM picks its kernel by the number of rows: the same row scored in a batch of 7
    can differ in the last bits from the same row in a batch of 64 (plain ``nn.Linear`` does
    this too, with or without the artifact). Exact equality needs the same batch boundaries."""
    big, small = _predict(served, "b", "big"), _predict(served, "b", "small", batch_size=7)
    for t in ("ctr", "cvr", "scen"):
        np.testing.assert_allclose(small[f"{t}_logit"], big[f"{t}_logit"], rtol=0, atol=1e-6)
    lin = torch.nn.Linear(17, 16)
    x = torch.randn(14, 17)
    with torch.no_grad():
        whole, halves = lin(x), torch.cat([lin(x[:7]), lin(x[7:])])
    torch.testing.assert_close(halves, whole, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_quantised_export_reports_and_keeps_auc(served: dict[str, Path]) -> None:
    from mptrec.pipeline.eval.auc import binary_metrics

    q = read_manifest(served["a8"]).raw["quantization"]
    assert q["dtype"] == "int8" and q["eval"]["split"] == "valid" and q["eval"]["rows"] == 512
    assert q["size_reduction"] == pytest.approx(0.5)  # width 4: 4 code + 4 scale/bias bytes vs 16
    for task, r in q["eval"]["tasks"].items():
        assert abs(r["auc_delta"]) <= 0.005, (task, r)  # the stated tolerance (README)
    fp32, int8 = _predict(served, "a", "fp32"), _predict(served, "a8", "int8")
    labels = _read(served["run"] / "eval_a.parquet")
    for t in ("ctr", "cvr"):
        assert not np.array_equal(fp32[f"{t}_logit"], int8[f"{t}_logit"])
        auc32 = binary_metrics(fp32[f"{t}_logit"], labels[f"label_{t}"])["auc"]
        auc8 = binary_metrics(int8[f"{t}_logit"], labels[f"label_{t}"])["auc"]
        assert abs(auc8 - auc32) <= 0.005, (t, auc32, auc8)


@pytest.mark.slow
def test_predict_on_two_processes_scores_every_row_once(served: dict[str, Path]) -> None:
    one = _predict(served, "b", "one")
    two = _predict(served, "b", "two", nproc=2, threads=1)
    assert two.keys() == one.keys() and np.array_equal(two["sample_id"], np.arange(256))
    assert all(np.array_equal(one[k], two[k]) for k in one)
    assert not list(served["tmp"].glob(".two.parquet*"))  # parts and temporary files are gone


@pytest.mark.slow
def test_artifact_runs_without_training_code_or_process_group(served: dict[str, Path]) -> None:
    code = (
        "import sys\n"
        "from mptrec.pipeline.serve.predict import predict\n"
        f"predict({str(served['b'])!r}, {str(served['data'])!r}, {str(served['tmp'] / 'iso.parquet')!r}, "
        "progress=False)\n"
        "import torch.distributed as dist\n"
        "bad = [m for m in sys.modules if m.startswith(('torchrec', 'fbgemm', 'mptrec.models', "
        "'mptrec.data_loaders')) or (m.startswith('mptrec.pipeline.') and m not in "
        "('mptrec.pipeline.serve', 'mptrec.pipeline.serve.artifact', 'mptrec.pipeline.serve.shard_inputs', "
        "'mptrec.pipeline.serve.predict'))]\n"
        "print('BAD', bad, dist.is_initialized())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "BAD [] False" in proc.stdout


@pytest.mark.slow
def test_predict_under_torchrun_via_the_torchx_component(served: dict[str, Path]) -> None:
    out = served["tmp"] / "torchx.parquet"
    venv = Path(sys.executable).parent
    cmd = [str(venv / "torchx"), "run", "-s", "local_cwd", "launch/components.py:predict", "--model",
           str(served["b"]), "--data", str(served["data"]), "--out", str(out), "-j", "1x2", "--",
           "--threads", "1", "--no-progress"]
    env = {**os.environ, "PATH": f"{venv}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "TORCHXCONFIG": str(REPO / ".torchxconfig")}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    got = pq.read_table(out).to_pydict()
    ref = _predict(served, "b", "ref_torchx")
    assert all(np.array_equal(np.asarray(got[k]), ref[k]) for k in ref)


# ---- bad input: one clear line, exit code 1, nothing written -----------------------------------


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str], *needles: str) -> None:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)


def test_export_of_a_missing_run_fails_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(["export", "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "x")], capsys,
           "mptrec export:", "nope/config.json", "not found")
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_export_bad_requests_write_nothing(served: dict[str, Path], capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    run, tmp = served["run"], served["tmp"]
    _fails(["export", "--run", str(run), "--out", str(tmp / "x"), "--tasks", "ctr,nope"], capsys,
           "task 'nope'", "not a task of the run", "'scen'")
    _fails(["export", "--run", str(run), "--out", str(tmp / "x"), "--checkpoint", "step-9999"], capsys,
           "'step-9999'", "not found")
    _fails(["export", "--run", str(run), "--out", str(served["a"])], capsys, "exists", "--overwrite")
    assert not (tmp / "x").exists()
    # a failure in the middle of the export: no DIR, no temporary folder, the old DIR untouched
    before = (served["a"] / "manifest.json").read_bytes()

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise ExportError("injected failure")

    monkeypatch.setattr("mptrec.pipeline.serve.export.export_program", boom)
    with pytest.raises(ExportError):
        export_run(run, tmp / "y")
    with pytest.raises(ExportError):
        export_run(run, served["a"], overwrite=True)
    assert not (tmp / "y").exists() and not list(tmp.glob(".y.tmp-*")) and not list(tmp.glob(".a.*"))
    assert (served["a"] / "manifest.json").read_bytes() == before


@pytest.mark.slow
def test_export_of_a_registered_but_untrained_task_fails(served: dict[str, Path],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    import copy

    run = served["tmp"] / "run_copy"
    shutil.copytree(served["run"], run, symlinks=True)
    registry = json.loads((run / "tasks.json").read_text())
    entry = copy.deepcopy(registry["tasks"]["scen"])
    entry.update(name="later", status="registered")
    registry["tasks"]["later"] = entry
    (run / "tasks.json").write_text(json.dumps(registry))
    _fails(["export", "--run", str(run), "--out", str(served["tmp"] / "z"), "--tasks", "later"], capsys,
           "task 'later'", "registered but not trained")
    assert not (served["tmp"] / "z").exists()


@pytest.mark.slow
def test_predict_bad_inputs_write_nothing(served: dict[str, Path],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    tmp, data = served["tmp"], served["data"]
    out = tmp / "bad.parquet"
    base = ["predict", "--data", str(data), "--out", str(out), "--no-progress"]
    _fails(["predict", "--model", str(tmp / "nope"), *base[1:]], capsys, "no such artifact folder")
    # an artifact from another format version
    other = tmp / "other_version"
    shutil.copytree(served["b"], other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["format_version"] = 99
    (other / "manifest.json").write_text(json.dumps(manifest))
    _fails(["predict", "--model", str(other), *base[1:]], capsys, "manifest.json", "'format_version'", "99")
    # a program file that is not the one the manifest names (a partial copy)
    manifest["format_version"] = 1
    (other / "manifest.json").write_text(json.dumps(manifest))
    with (other / "model.pt2").open("ab") as fh:
        fh.write(b"\0")
    _fails(["predict", "--model", str(other), *base[1:]], capsys, "model.pt2", "'program.sha256'")
    # shards whose schema does not match the manifest (another vocabulary size of f0)
    shards = tmp / "other_vocab"
    shutil.copytree(data, shards)
    schema = json.loads((shards / "schema.json").read_text())
    schema["features"][1]["num_embeddings"] = 99
    (shards / "schema.json").write_text(json.dumps(schema))
    _fails(["predict", "--model", str(served["b"]), "--data", str(shards), "--out", str(out)], capsys,
           "schema.json", "feature 'f0'", "'num_embeddings'", "99", "20")
    # a shard whose column has another type
    (shards / "schema.json").write_text(json.dumps({**schema, "features": json.loads(
        (data / "schema.json").read_text())["features"]}))
    first = shards / schema["splits"]["test"]["files"][0]
    t = pq.read_table(first)
    f1 = t.schema.get_field_index("f1")
    pq.write_table(t.set_column(f1, "f1", t.column("f1").cast(pa.float64())), first)
    _fails(["predict", "--model", str(served["b"]), "--data", str(shards), "--out", str(out)], capsys,
           str(first), "column 'f1'", "double")
    _fails(["predict", "--model", str(served["b"]), *base[1:], "--split", "nope"], capsys, "no split 'nope'")
    assert not out.exists() and not list(tmp.glob(".bad.parquet*"))
    with pytest.raises(ArtifactError, match="no such shard folder"):
        predict(served["b"], tmp / "nope_data", out)


@pytest.mark.slow
def test_serving_benchmark_reports_rates_and_sizes(served: dict[str, Path]) -> None:
    from mptrec.bench.serving import markdown, serving_bench

    r = serving_bench(served["run"], repeats=1, workdir=served["tmp"])
    assert r["fp32"]["rows"] == 256 and r["fp32"]["score"].median > 0 and r["fp32"]["size_reduction"] is None
    for q in ("int8", "fp16"):
        assert r[q]["size_reduction"] == pytest.approx(0.5)
        assert r[q]["table_bytes"] * 2 == r["fp32"]["table_bytes"]  # the tiny program is mostly graph
        assert set(r[q]["auc_delta"]) == {"ctr", "cvr", "scen"}
    table = markdown(r)
    assert "| fp32 |" in table and "| int8 |" in table and "-50%" in table


def _dense_kernel_run(rank: int, world: int, data: str, run: str) -> None:
    from mptrec.pipeline.eval.evaluate_run import evaluate_run
    from mptrec.pipeline.train.pretrain import pretrain

    cpu = torch.device("cpu")
    cfg = stage1_config(Path(data), Path(run), 'sharding.sharding_types=["data_parallel"]', "train.epochs=1")
    pretrain(cfg, device=cpu, progress=False)
    evaluate_run(run, device=cpu, dump_predictions=Path(run) / "eval.parquet", progress=False)


@pytest.mark.slow
def test_data_parallel_tables_export_exactly_too(served: dict[str, Path]) -> None:
    """data_parallel tables run TorchRec's dense kernel, not the fused one: the same pooling bits."""
    run = served["tmp"] / "run_dp"
    run_multiprocess(_dense_kernel_run, 1, str(served["data"]), str(run))
    assert "data_parallel | dense" in (run / "plan.txt").read_text()
    export_run(run, served["tmp"] / "dp")
    out = served["tmp"] / "dp_pred.parquet"
    predict(served["tmp"] / "dp", served["data"], out, progress=False)
    got, ref = _read(out), _read(run / "eval.parquet")
    assert np.array_equal(got["sample_id"], ref["sample_id"])
    for t in ("ctr", "cvr"):
        assert np.array_equal(got[f"{t}_logit"], ref[f"logit_{t}"].astype(np.float32)), t


@pytest.mark.slow
def test_export_of_a_task_subset(served: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = served["tmp"] / "subset"
    assert main(["export", "--run", str(served["run"]), "--out", str(out), "--tasks", "scen,ctr"]) == 0
    assert "exported ctr (pretrained, mptrec), scen (prompt_tuned, mptrec)" in capsys.readouterr().out
    assert read_manifest(out).tasks == ["ctr", "scen"]
    predict(out, served["data"], served["tmp"] / "subset.parquet", progress=False)
    got, full = _read(served["tmp"] / "subset.parquet"), _predict(served, "b", "full")
    assert list(got) == ["sample_id", "ctr_prob", "ctr_logit", "scen_prob", "scen_logit"]
    assert all(np.array_equal(got[k], full[k]) for k in got)


def _program_matches(serving: ServingModule, features: list[FeatureSpec],
                     inputs: tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]],
                     want: dict[str, torch.Tensor]) -> None:
    """The exported program equals the eager serving module bit for bit, and ``want`` to 1e-6."""
    program = export_program(serving, features).module()
    with torch.inference_mode():
        got, eager = program(*inputs), serving(*inputs)
    for t in want:
        assert torch.equal(got[t], eager[t]), t
        torch.testing.assert_close(got[t], want[t], rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["mptrec_emb", "mptrec_mlp"])
def test_head_reading_ids_exports_and_refuses_list_features(method: str) -> None:
    """A head reading each row's ids: the program matches NewTaskModel; list features are refused."""
    torch.manual_seed(0)
    features = [FeatureSpec("d0", kind="dense"), FeatureSpec("a", num_embeddings=7, embedding_dim=4),
                FeatureSpec("b", num_embeddings=5, embedding_dim=4)]
    ebc = EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name=f"t_{f}", embedding_dim=4, num_embeddings=n, feature_names=[f])
        for f, n in (("a", 7), ("b", 5))])
    base = build_model(ModelConfig(expert_hidden=(16, 8), tower_hidden=(4,)), ebc,
                       sparse_features=["a", "b"], dense_dim=1, task_names=["ctr", "cvr"])
    head = base.new_task_head("t3", method)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_()  # offsets and residual away from their zero start
    model = NewTaskModel(base, {"t3": head}).eval()
    serving = _serving(model, features)
    dense = torch.rand(6, 1)
    values = [torch.tensor([0, 1, 2, 3, 4, 6]), torch.tensor([4, 3, 2, 1, 0, 0])]
    lengths = [torch.ones(6, dtype=torch.long)] * 2
    kjt = KeyedJaggedTensor.from_lengths_sync(["a", "b"], torch.cat(values), torch.cat(lengths))
    with torch.no_grad():
        want = model(dense, kjt)
        plain = copy.deepcopy(head)
        assert plain.deltas is not None
        for d in plain.deltas:
            d.zero_()
        feats = {**base.features(dense, kjt), "ids": torch.stack(values, dim=1)}
    assert not torch.allclose(want["t3"], plain(feats))  # the offsets change the new task's logits
    _program_matches(serving, features, (dense, values, lengths), want)
    listed, list_features = _fresh_model(0)  # its backbone was not told that 'l' is a list feature
    with pytest.raises(ValueError, match=r"read each row's id .*single-valued features \['a', 'l'\], "
                                         r"but \['l'\] are list features"):
        _serving(NewTaskModel(listed.backbone, {"t4": listed.backbone.new_task_head("t4", method)}),
                 list_features)


def test_head_reading_ids_offsets_only_the_single_valued_features() -> None:
    """With a list feature, ``mptrec_emb`` shifts the single-valued blocks of e; export matches eager."""
    listed, features = _fresh_model(0)
    base = listed.backbone
    base.set_single_valued(["a"])
    torch.manual_seed(1)
    head = base.new_task_head("t3", "mptrec_emb")
    assert head.deltas is not None and [tuple(t.shape) for t in head.deltas] == [(7, 4)]  # 'a' only
    with torch.no_grad():
        for p in head.parameters():
            p.normal_()
    model = NewTaskModel(base, {"t3": head}).eval()
    dense = torch.rand(5, 1)
    values = [torch.tensor([0, 1, 2, 3, 6]), torch.tensor([1, 2, 3, 4, 5, 6, 7, 8])]
    lengths = [torch.ones(5, dtype=torch.long), torch.tensor([1, 0, 3, 2, 2])]
    kjt = _kjt(values, lengths)
    with torch.no_grad():
        want = model(dense, kjt)
        feats = model.backbone_features(dense, kjt)
    assert feats["ids"].tolist() == [[0], [1], [2], [3], [6]]
    shifted = head.shifted_input(feats["e"], feats["ids"])
    torch.testing.assert_close(shifted[:, 1:5], feats["e"][:, 1:5] + head.deltas[0][feats["ids"][:, 0]])
    assert torch.equal(shifted[:, :1], feats["e"][:, :1]) and torch.equal(shifted[:, 5:], feats["e"][:, 5:])
    serving = _serving(model, features)
    _program_matches(serving, features, (dense, values, lengths), want)
