"""Smoke and correctness tests of the benchmark code (the benchmarks themselves assert nothing)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mptrec.bench.fake import random_batches
from mptrec.bench.harness import Stat, Variant, ratio, throughput
from mptrec.bench.references import RefMPTRec, make_paper_prompt_step, make_train_step, to_ref_batch
from mptrec.data_loaders.schema import FeatureSpec
from mptrec.models import ModelConfig, MPTRec
from mptrec.pipeline.build import build_ebc

TASKS = ["ctr", "cvr"]
FEATURES = [
    FeatureSpec("d0", kind="dense"),
    FeatureSpec("a", num_embeddings=30, embedding_dim=4),
    FeatureSpec("b", num_embeddings=20, embedding_dim=4),
    FeatureSpec("m", num_embeddings=15, embedding_dim=4, multivalent=True, pooling="mean"),
]


def _copy_into_reference(model: MPTRec, ref: RefMPTRec) -> None:
    """Give the reference the pipeline model's weights (StackedMLP nets -> nn.Linear stacks)."""
    with torch.no_grad():
        bags = model.ebc.embedding_bags
        for f, table in zip([f for f in FEATURES if f.kind == "sparse"], ref.emb.tables):
            table.weight.copy_(bags[f"t_{f.name}"].weight)
        linears = [[m for m in seq if isinstance(m, torch.nn.Linear)] for seq in [ref.shared, *ref.specific]]
        for net, layers in enumerate(linears):
            for i, lin in enumerate(layers):
                lin.weight.copy_(model.experts.weights[i][net].t())
                lin.bias.copy_(model.experts.biases[i][net, 0])
        for k, tower in enumerate(ref.towers):
            for i, lin in enumerate(m for m in tower if isinstance(m, torch.nn.Linear)):
                lin.weight.copy_(model.towers.weights[i][k].t())
                lin.bias.copy_(model.towers.biases[i][k, 0])
        assert model.gates is not None and model.classifier is not None and model.task_embedding is not None
        for k, gate in enumerate(ref.gates):
            gate.weight.copy_(model.gates.weight[2 * k : 2 * k + 2])
        ref.prompts.weight.copy_(model.task_embedding.weight)
        ref.classifier.weight.copy_(model.classifier.weight)
        ref.classifier.bias.copy_(model.classifier.bias)


def test_reference_computes_the_pipeline_models_loss_and_gradients() -> None:
    cfg = ModelConfig(expert_hidden=(16, 8), tower_hidden=(6,), r_dnn=1e-3, gan_weight=0.3, aux_weight=0.9)
    sparse = [f.name for f in FEATURES if f.kind == "sparse"]
    model = MPTRec(cfg, build_ebc(FEATURES, "cpu"), sparse_features=sparse, dense_dim=1, task_names=TASKS)
    ref = RefMPTRec(FEATURES, cfg, TASKS, sparse=False)
    _copy_into_reference(model, ref)
    batch = random_batches(FEATURES, TASKS, 32, 1, seed=3)[0]
    assign = torch.randint(0, 2, (32,), generator=torch.Generator().manual_seed(1))
    out = model.forward_train(batch.dense_features, batch.sparse_features)
    loss, _ = model.loss(out, batch.labels, assign)
    ref_loss = ref.loss(to_ref_batch(batch, FEATURES, assign), "plain")  # r_emb = 0: no table L2
    torch.testing.assert_close(ref_loss, loss, rtol=1e-5, atol=1e-6)
    loss.backward()
    ref_loss.backward()
    # the shared expert's first layer gets the reversed GAN gradient in both
    torch.testing.assert_close(ref.shared[0].weight.grad, model.experts.weights[0].grad[0].t(), rtol=1e-4,
                               atol=1e-6)
    torch.testing.assert_close(ref.emb.tables[0].weight.grad, model.ebc.embedding_bags["t_a"].weight.grad,
                               rtol=1e-4, atol=1e-6)


def test_reference_steps_train_and_the_paper_prompt_step_leaves_backbone_gradients() -> None:
    from mptrec.bench.references import RefNewTaskHead, grad_bytes

    cfg = ModelConfig(expert_hidden=(16, 8), tower_hidden=(6,), r_emb=1e-3)
    batches = random_batches(FEATURES, [*TASKS, "t3"], 64, 2, seed=0)
    ref_batches = [to_ref_batch(b, FEATURES, torch.zeros(64, dtype=torch.long)) for b in batches]
    for style, sparse in (("plain", False), ("sparse", True)):
        ref = RefMPTRec(FEATURES, cfg, TASKS, sparse=sparse)
        step = make_train_step(ref, ref_batches, style, lr=0.05, embedding_lr=0.05)
        losses = [step(0) for _ in range(5)]
        assert losses[-1] < losses[0], (style, losses)
    head = RefNewTaskHead(ref.d_in, cfg.hidden_dim, cfg.tower_hidden)
    before = [p.detach().clone() for p in ref.parameters()]
    prompt = make_paper_prompt_step(ref, head, ref_batches, "t3")
    prompt(0)
    assert all(torch.equal(a, p) for a, p in zip(before, ref.parameters()))  # not in the optimizer...
    assert grad_bytes(ref) > 0  # ...but its gradients were computed


def test_mask_dropout_keeps_1_minus_p_and_rescales() -> None:
    from mptrec.models.layers import MaskDropout

    drop = MaskDropout(0.3)
    x = torch.ones(200_000, requires_grad=True)
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.01
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.7))
    y.sum().backward()
    assert x.grad is not None and torch.equal(x.grad != 0, kept)
    assert torch.equal(drop.eval()(x), x)
    # independent masks: two draws agree on about p^2 + (1-p)^2 of the elements, not all
    drop.train()
    agree = ((drop(torch.ones(200_000)) != 0) == (drop(torch.ones(200_000)) != 0)).float().mean().item()
    assert abs(agree - (0.3**2 + 0.7**2)) < 0.01


def test_use_bernoulli_dropout_swaps_every_mask_dropout() -> None:
    from mptrec.bench.dense import use_bernoulli_dropout
    from mptrec.models.layers import MaskDropout, StackedMLP

    mlp = StackedMLP(2, 4, (8, 4), last_activation=True, dropout=(0.1, 0.3))
    assert use_bernoulli_dropout(mlp) == 2
    assert not any(isinstance(m, MaskDropout) for m in mlp.modules())
    assert [m.p for m in mlp.modules() if isinstance(m, torch.nn.Dropout)] == [0.1, 0.3]


def test_throughput_interleaves_repeats_and_ratios_pair_them() -> None:
    calls: list[str] = []
    a = Variant("a", lambda i: calls.append("a"), 10)
    b = Variant("b", lambda i: calls.append("b"), 10, steps=2, warmup=0)
    stats = throughput([a, b], warmup=1, steps=3, repeats=2)
    assert calls == ["a"] + ["a"] * 3 + ["b"] * 2 + ["a"] * 3 + ["b"] * 2
    assert len(stats["a"].values) == 2 and stats["a"].unit == "samples/s"
    r = ratio(Stat([2.0, 4.0], "x"), Stat([1.0, 1.0], "x"))
    assert r.to_json()["median"] == 3.0 and r.to_json()["min"] == 2.0
    with pytest.raises(ValueError, match="repeats"):
        throughput([a], warmup=0, steps=1, repeats=0)


@pytest.mark.slow
def test_mptrec_bench_runs_end_to_end_on_tiny_sizes(tmp_path: Path) -> None:
    from mptrec.bench.common import make_settings
    from mptrec.bench.run import TARGETS, run_bench

    torch.set_num_threads(1)
    s = replace(make_settings(True, tmp_path / "work", threads=1, compile_dense=False),
                repeats=2, warmup=1, steps=1, rows=10_000, distinct_batches=2, auc_steps=2)
    out, md = tmp_path / "results.json", tmp_path / "results.md"
    results = run_bench(out, markdown=md, settings=s, serving_run=tmp_path / "no-run")
    assert results["errors"] == {}, results["errors"]
    saved = json.loads(out.read_text())
    for key in TARGETS:
        assert isinstance(saved[key], float), (key, saved[key])
    assert saved["machine"]["cpu_model"] and saved["versions"]["torch"]
    assert saved["threads"]["torch_num_threads"] == 1
    stage1 = saved["stage1"]["paper_dims"]["samples_per_s"]["ours"]
    assert set(stage1) >= {"min", "median", "max", "values"} and len(stage1["values"]) == 2
    assert saved["new_task"]["variants"]["paper_prompt"]["backbone_grad_mib"] > 0
    assert saved["new_task"]["variants"]["prompt_tune"]["backbone_grad_mib"] == 0
    cached = saved["new_task"]["variants"]["prompt_tune_cached"]
    assert cached["backbone_grad_mib"] == 0 and cached["cache_fill_s"]["median"] > 0
    # the headline charges the cache fill: above the cached epochs' own fraction
    nt = saved["new_task"]
    assert nt["time_fraction_of_full"]["median"] > nt["time_fraction_of_full_cached_epoch"]["median"]
    assert set(saved["loader"]["training"]["end_to_end_by_workers"]) >= {"0", "2"}
    alloc = saved["allocator"]  # glibc here: the settings apply (their effect: tests/launch/test_runtime.py)
    assert alloc["applied"] is True
    assert len(alloc["speedup"]["values"]) == len(alloc["pinned_speedup"]["values"]) == 2
    assert all(alloc[m]["samples_per_s"]["min"] > 0 for m in ("tuned", "defaults", "pinned"))
    dense = saved["dense_speedups"]
    assert dense["dense L2 through autograd (the old loss term; same update)"]["l2_matrices"] == 5
    gather = saved["new_task"]["variants"]["prompt_tune_cached"]["gather_ms_per_batch"]
    assert gather["index_select"]["min"] > 0 and gather["indexing"]["min"] > 0
    assert "no trained run" in saved["serving"]["skipped"]  # with a run: tests/pipeline/serve/test_export.py
    points = saved["growth"]["points"]
    grid = [(p["rows"], p["vocab_scale"]) for p in points]
    assert grid == [(10_000, 1), (10_000, 10), (40_000, 1), (40_000, 10)]
    assert all(p["samples_per_s"] > 0 and p["peak_rss_mib"] > 0 for p in points)
    # ten times the table rows hold more memory (weights + optimizer state: 10 x 16 MiB at least)
    assert points[1]["rss_after_build_mib"] > points[0]["rss_after_build_mib"] + 100
    text = md.read_text()
    headings = ("Stage-1 training throughput", "New task cost", "Dense-side speedups", "Loader",
                "How cost grows", "Allocator settings")
    for heading in headings:
        assert heading in text


def test_scaled_schema_multiplies_only_sparse_tables() -> None:
    from mptrec.bench.growth import scaled_schema

    schema = {"features": [{"name": "a", "kind": "sparse", "num_embeddings": 7},
                           {"name": "d", "kind": "dense"}]}
    scaled = scaled_schema(schema, 10)
    assert scaled["features"][0]["num_embeddings"] == 70 and "num_embeddings" not in scaled["features"][1]
    assert schema["features"][0]["num_embeddings"] == 7  # a copy
    with pytest.raises(ValueError, match="vocab scale"):
        scaled_schema(schema, 0)
