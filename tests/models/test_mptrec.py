"""MPT-Rec specifics: GRL on the shared expert, loss terms, variants, new-task weights, EM labels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mptrec.models import MPTRec, em_assign
from tests.models.tiny import TASKS, tiny_batch, tiny_model

torch.set_num_threads(1)


def _mptrec(variant: str = "full", seed: int = 0, **overrides: object) -> MPTRec:
    torch.manual_seed(seed)
    model = tiny_model("mptrec", variant=variant, **overrides)
    assert isinstance(model, MPTRec)
    return model


def _grads(model: MPTRec) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            for n, p in model.named_parameters()}


def test_shared_expert_receives_minus_alpha_times_the_classifier_gradient() -> None:
    model = _mptrec().eval()
    dense, kjt, _ = tiny_batch(12)
    assign = torch.randint(0, 2, (12,))
    model.set_grl_alpha(0.37)
    F.nll_loss(model.forward_train(dense, kjt).task_logits, assign).backward()  # type: ignore[arg-type]
    with_grl = _grads(model)
    model.zero_grad()
    # the same GAN loss by hand, without the reversal layer
    h_shared = model.features(dense, kjt)["h_shared"]
    assert model.classifier is not None
    F.nll_loss(F.log_softmax(model.classifier(h_shared), dim=-1), assign).backward()
    plain = _grads(model)
    for name in with_grl:
        if name.startswith("classifier"):
            torch.testing.assert_close(with_grl[name], plain[name])  # the classifier descends
        elif name.startswith(("experts", "ebc")):
            torch.testing.assert_close(with_grl[name], -0.37 * plain[name])  # generator ascends
        else:
            assert not with_grl[name].any(), name
    w0 = with_grl["experts.weights.0"]
    assert w0[0].abs().sum() > 0 and not w0[1:].any()  # only the shared expert (net 0), not specific


def test_loss_is_the_sum_of_its_weighted_parts() -> None:
    model = _mptrec(r_dnn=0.01, aux_weight=0.9, gan_weight=0.1).train()
    model.task_weights = {"ctr": 1.0, "cvr": 2.0}
    dense, kjt, labels = tiny_batch(10)
    assign = torch.randint(0, 2, (10,))
    torch.manual_seed(5)
    out = model.forward_train(dense, kjt)
    total, parts = model.loss(out, labels, assign)
    assert set(parts) == {"ctr", "cvr", "aux", "gan", "l2"}
    bce = {t: F.binary_cross_entropy_with_logits(out.logits[t], labels[t]) for t in TASKS}
    aux = sum(w * F.binary_cross_entropy_with_logits(out.aux_logits[t], labels[t])
              for t, w in model.task_weights.items())
    gan = F.nll_loss(out.task_logits, assign)  # type: ignore[arg-type]
    l2 = sum(0.5 * w.pow(2).sum() for w in [*model.experts.weights, *model.towers.weights])
    expected = bce["ctr"] + 2 * bce["cvr"] + 0.9 * aux + 0.1 * gan + 0.01 * l2
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(parts["gan"], gan.detach())
    with pytest.raises(ValueError, match="task_assign"):
        model.loss(out, labels, None)
    with pytest.raises(ValueError, match=r"labels for tasks \['cvr'\] are missing"):
        model.loss(out, {"ctr": labels["ctr"]}, assign)


def test_variant_parameter_sets() -> None:
    names = {v: {n.split(".")[0] for n, _ in _mptrec(v).named_parameters()} for v in
             ("full", "share", "specific", "no_gan")}
    base = {"ebc", "experts", "towers"}
    assert names["full"] == base | {"task_embedding", "gates", "classifier"}
    assert names["no_gan"] == names["full"] - {"classifier"}
    assert names["specific"] == names["full"] - {"gates"}
    assert names["share"] == base | {"classifier"}
    assert _mptrec("share").experts.num_nets == 1 and _mptrec("full").experts.num_nets == 1 + len(TASKS)
    assert [_mptrec(v).uses_em for v in ("full", "share", "specific", "no_gan")] == [True, True, True, False]


def test_no_gan_changes_only_the_classifier_and_its_loss() -> None:
    full, no_gan = _mptrec("full").eval(), _mptrec("no_gan").eval()  # same seed: same shared weights
    dense, kjt, labels = tiny_batch(8)
    f_out, n_out = full.forward_train(dense, kjt), no_gan.forward_train(dense, kjt)
    assert all(torch.equal(f_out.logits[t], n_out.logits[t]) for t in TASKS)
    assert all(torch.equal(f_out.aux_logits[t], n_out.aux_logits[t]) for t in TASKS)
    assert n_out.task_logits is None and f_out.task_logits is not None
    f_total, f_parts = full.loss(f_out, labels, torch.zeros(8, dtype=torch.long))
    n_total, n_parts = no_gan.loss(n_out, labels, None)
    assert "gan" not in n_parts
    torch.testing.assert_close(f_total - n_total, full.cfg.gan_weight * f_parts["gan"])


def test_specific_variant_drops_the_shared_path_from_the_fusion() -> None:
    full, spec = _mptrec("full").eval(), _mptrec("specific").eval()
    dense, kjt, _ = tiny_batch(8)
    assert torch.equal(full.experts.weights[0], spec.experts.weights[0])
    feats = full.features(dense, kjt)
    tilde = feats["h_specific"].transpose(0, 1) * feats["prompts"].unsqueeze(1)
    expected = full.towers(tilde).squeeze(-1)
    got = spec(dense, kjt)
    assert all(torch.equal(got[t], expected[i]) for i, t in enumerate(TASKS))
    s_feats = spec.features(dense, kjt)
    assert not s_feats["h_shared"].any() and torch.equal(s_feats["h_specific"], feats["h_specific"])
    out = spec.forward_train(dense, kjt)  # aux and GAN still use the real shared expert
    assert torch.equal(out.aux_logits["ctr"], full.forward_train(dense, kjt).aux_logits["ctr"])


def test_share_variant_predicts_from_the_shared_expert_only() -> None:
    full, share = _mptrec("full").eval(), _mptrec("share").eval()
    with torch.no_grad():  # give share the full model's shared expert and towers
        for w_s, w_f in zip([*share.experts.weights, *share.experts.biases],
                            [*full.experts.weights, *full.experts.biases]):
            w_s.copy_(w_f[:1])
        share.towers.load_state_dict(full.towers.state_dict())
    dense, kjt, _ = tiny_batch(8)
    got, out_full = share(dense, kjt), full.forward_train(dense, kjt)
    assert all(torch.equal(got[t], out_full.aux_logits[t]) for t in TASKS)
    feats = share.features(dense, kjt)
    assert feats["h_specific"].shape == (8, 2, 16) and not feats["h_specific"].any()
    assert not feats["prompts"].any()
    assert torch.equal(feats["h_shared"], full.features(dense, kjt)["h_shared"])


def _feats() -> dict[str, torch.Tensor]:
    model = _mptrec().eval()
    dense, kjt, _ = tiny_batch(6)
    with torch.no_grad():
        return model.features(dense, kjt)


def test_transfer_weights_of_mptrec_fw_and_tes() -> None:
    model, feats = _mptrec(), _feats()
    heads = {}
    for m in ("mptrec", "fw", "tes"):
        torch.manual_seed(1)
        heads[m] = model.new_task_head("t3", m)
    w = {m: h.transfer_weights(feats) for m, h in heads.items()}
    for m in w:
        assert w[m].shape == (6, 2)
        torch.testing.assert_close(w[m].sum(1), torch.ones(6))
    assert torch.equal(w["fw"], torch.full((6, 2), 0.5))
    tes = torch.softmax(feats["prompts"] @ heads["tes"].prompt / model.cfg.tau, dim=0)
    assert torch.equal(w["tes"], tes.expand(6, -1))
    proj = heads["mptrec"].projection
    assert proj is not None and heads["fw"].projection is None and heads["tes"].projection is None
    z = proj(feats["e"])
    torch.testing.assert_close(w["mptrec"], torch.softmax(z @ feats["prompts"].t() / 150.0, dim=-1))
    assert not torch.allclose(w["mptrec"][0], w["mptrec"][1])  # per sample
    # fw and tes share every parameter (same seed); only the weights differ
    fw_p, tes_p = dict(heads["fw"].named_parameters()), dict(heads["tes"].named_parameters())
    assert fw_p.keys() == tes_p.keys() and all(torch.equal(fw_p[k], tes_p[k]) for k in fw_p)
    same_prompts = {**feats, "prompts": feats["prompts"][:1].expand(2, -1)}
    assert torch.equal(heads["fw"](same_prompts), heads["tes"](same_prompts))


def test_new_head_output_is_eq_12_to_14() -> None:
    model, feats = _mptrec(), _feats()
    head = model.new_task_head("t3", "mptrec")
    w = head.transfer_weights(feats)
    h_new = (w.unsqueeze(-1) * feats["h_specific"]).sum(1)
    g = torch.softmax(feats["e"] @ head.gate.weight.t(), dim=-1)
    fused = g[:, :1] * h_new * head.prompt + g[:, 1:] * feats["h_shared"]
    torch.testing.assert_close(head(feats), head.tower.forward_shared(fused)[0, :, 0])
    assert head.adapter_params() == [n for n, _ in head.named_parameters()]
    torch.testing.assert_close(head.l2_penalty(), head.tower.weight_l2())


def test_new_task_head_errors() -> None:
    model = _mptrec()
    with pytest.raises(ValueError, match=r"'mmoe\*' does not apply to model MPTRec"):
        model.new_task_head("t3", "mmoe*")
    with pytest.raises(ValueError, match="already a task"):
        model.new_task_head("ctr", "mptrec")
    assert model.new_task_head("t3", "fw", tower_hidden=(3,)).tower.layer_sizes == (3, 1)


def test_em_assign_hand_built() -> None:
    logits = {"a": torch.tensor([4.0, -4.0, 0.0, 2.0]), "b": torch.tensor([0.0, 0.0, 0.0, -3.0])}
    labels = {"a": torch.tensor([1.0, 1.0, 1.0, 0.0]), "b": torch.tensor([1.0, 1.0, 0.0, 0.0])}
    # per-sample BCE a: [0.018, 4.018, 0.693, 2.127]; b: [0.693, 0.693, 0.693, 0.049]
    got = em_assign(logits, labels, ["a", "b"])
    assert got.dtype == torch.int64 and got.tolist() == [0, 1, 0, 1]  # tie (sample 2) -> first task
    assert em_assign(logits, labels, ["b", "a"]).tolist() == [1, 0, 0, 0]
    with pytest.raises(ValueError, match=r"tasks \['c'\] missing"):
        em_assign(logits, labels, ["a", "c"])


def test_em_labels_come_from_the_fused_predictions() -> None:
    model = _mptrec().eval()
    dense, kjt, labels = tiny_batch(64)
    with torch.no_grad():
        assign = em_assign(model(dense, kjt), labels, model.task_names)
        out = model.forward_train(dense, kjt)

    def argmin(logits: dict[str, torch.Tensor]) -> torch.Tensor:
        losses = [F.binary_cross_entropy_with_logits(logits[t], labels[t], reduction="none") for t in TASKS]
        return torch.stack(losses, 1).argmin(1)

    assert torch.equal(assign, argmin(out.logits))
    assert not torch.equal(assign, argmin(out.aux_logits))  # the shared path would differ


def test_confusion_objective_splits_the_gradients_and_is_bounded() -> None:
    """``adversarial = "confusion"``: the classifier learns only from its NLL on a detached h^s;
    h^s learns only from the cross-entropy of the frozen classifier against the uniform target,
    which is >= 0 (after subtracting log K) and 0 exactly at the uniform output."""
    model = _mptrec(adversarial="confusion", aux_weight=0.0, gan_weight=1.0).eval()
    dense, kjt, labels = tiny_batch(16)
    assign = torch.randint(0, 2, (16,))
    model.set_grl_alpha(0.5)
    out = model.forward_train(dense, kjt)
    assert out.task_logits is not None and out.confusion_logits is not None
    F.nll_loss(out.task_logits, assign).backward(retain_graph=True)
    nll = _grads(model)
    assert nll["classifier.weight"].abs().sum() > 0
    assert all(not g.any() for n, g in nll.items() if not n.startswith("classifier")), "h^s got NLL grads"
    model.zero_grad()
    (-out.confusion_logits.mean()).backward()
    conf = _grads(model)
    assert not conf["classifier.weight"].any() and not conf["classifier.bias"].any()
    assert conf["experts.weights.0"][0].abs().sum() > 0 and not conf["experts.weights.0"][1:].any()
    _, parts = model.loss(out, {t: torch.zeros(16) for t in TASKS}, assign)
    assert float(parts["confusion"]) >= 0.0
    # the total uses gan_weight * (nll + alpha * confusion)
    total, parts = model.loss(out, labels, assign)
    bce = sum(F.binary_cross_entropy_with_logits(out.logits[t], labels[t]) for t in TASKS)
    torch.testing.assert_close(total, bce + 1.0 * (parts["gan"] + 0.5 * parts["confusion"]))
    with torch.no_grad():  # uniform output: the bound is reached
        model.classifier.weight.zero_()  # type: ignore[union-attr]
        model.classifier.bias.zero_()  # type: ignore[union-attr]
    _, parts = model.loss(model.forward_train(dense, kjt), labels, assign)
    assert abs(float(parts["confusion"])) < 1e-6


def test_mptrec_res_head_starts_as_mptrec_and_stays_under_ten_percent() -> None:
    from mptrec.models.mptrec import MPTRecNewTaskHead

    kw = {"input_dim": 123, "hidden_dim": 128, "num_tasks": 2, "tower_hidden": (64, 32), "tau": 150.0}
    torch.manual_seed(0)
    base = MPTRecNewTaskHead("t3", "mptrec", **kw)  # type: ignore[arg-type]
    torch.manual_seed(0)
    res = MPTRecNewTaskHead("t3", "mptrec_res", **kw)  # type: ignore[arg-type]
    n_res = sum(p.numel() for p in res.parameters())
    assert n_res == 27_063 + 8 * (123 + 128) == 29_071 and n_res / 293_060 < 0.10
    res.load_state_dict(base.state_dict(), strict=False)  # the shared parts
    feats = {"e": torch.rand(6, 123), "h_shared": torch.rand(6, 128), "h_specific": torch.rand(6, 2, 128),
             "prompts": torch.randn(2, 128)}
    torch.testing.assert_close(res(feats), base(feats))  # B = 0 at initialisation
    assert res.residual is not None
    with torch.no_grad():
        res.residual[1].weight.normal_()
    assert not torch.allclose(res(feats), base(feats))  # the path is live once B moves


def test_mptrec_emb_head_starts_as_mptrec_moves_its_own_rows_and_stays_under_ten_percent() -> None:
    from mptrec.models.mptrec import MPTRecNewTaskHead

    # Census-sized: 11 dense columns, 28 width-4 tables of 471 rows in all (the sizes are made up)
    vocab = [9, 17, 3, 24, 16, 47, 10, 6, 2, 3, 3, 38, 8, 6, 6, 51, 38, 8, 10, 9, 10, 3, 4, 5, 42, 42, 43, 8]
    assert sum(vocab) == 471 and len(vocab) == 28
    kw = {"input_dim": 123, "hidden_dim": 128, "num_tasks": 2, "tower_hidden": (64, 32), "tau": 150.0}
    torch.manual_seed(0)
    base = MPTRecNewTaskHead("t3", "mptrec", **kw)  # type: ignore[arg-type]
    emb = MPTRecNewTaskHead("t3", "mptrec_emb", **kw, id_tables=[(v, 4) for v in vocab], dense_dim=11)  # type: ignore[arg-type]
    n_emb = sum(p.numel() for p in emb.parameters())
    assert n_emb == 27_063 + 4 * 471 + 1 * (123 + 128) == 29_198 and n_emb / 293_060 < 0.10
    assert emb.needs_ids and not base.needs_ids
    emb.load_state_dict(base.state_dict(), strict=False)
    g = torch.Generator().manual_seed(1)
    ids = torch.stack([torch.randint(0, v, (6,), generator=g) for v in vocab], dim=1)
    feats = {"e": torch.rand(6, 123), "h_shared": torch.rand(6, 128), "h_specific": torch.rand(6, 2, 128),
             "prompts": torch.randn(2, 128), "ids": ids}
    torch.testing.assert_close(emb(feats), base(feats))  # delta = 0 and B = 0 at initialisation
    assert float(emb.l2_penalty()) == float(emb.tower.weight_l2())
    # a row's offset moves exactly that row's block of e (dense columns never move)
    assert emb.deltas is not None
    with torch.no_grad():
        emb.deltas[3][int(ids[0, 3])] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    shifted = emb.shifted_input(feats["e"], ids)
    moved = (shifted != feats["e"]).nonzero().tolist()
    rows_with_id = (ids[:, 3] == ids[0, 3]).nonzero().flatten().tolist()
    assert {r for r, _ in moved} == set(rows_with_id)
    assert {c for _, c in moved} == set(range(11 + 12, 11 + 16))
    assert float(emb.l2_penalty()) == pytest.approx(float(emb.tower.weight_l2()) + 15.0)
    # every offset gets a gradient only through the rows that use it
    emb.zero_grad()
    emb(feats).sum().backward()
    assert emb.deltas[0].grad is not None
    unused = sorted(set(range(vocab[0])) - set(ids[:, 0].tolist()))
    assert unused and not emb.deltas[0].grad[unused].any()


def test_mptrec_mlp_head_starts_without_its_residual_path_and_stays_under_ten_percent() -> None:
    from mptrec.models.mptrec import MPTRecNewTaskHead

    vocab = [9, 17, 3, 24, 16, 47, 10, 6, 2, 3, 3, 38, 8, 6, 6, 51, 38, 8, 10, 9, 10, 3, 4, 5, 42, 42, 43, 8]
    kw = {"input_dim": 123, "hidden_dim": 128, "num_tasks": 2, "tower_hidden": (64, 32), "tau": 150.0}
    torch.manual_seed(0)
    mlp = MPTRecNewTaskHead("t3", "mptrec_mlp", **kw, id_tables=[(v, 4) for v in vocab], dense_dim=11)  # type: ignore[arg-type]
    n = sum(p.numel() for p in mlp.parameters())
    # the paper's head with an H/8 projection (123x16 + 16x128 instead of 123x64 + 64x128), the
    # offsets of every table, and the residual MLP 123 -> 32 (+ bias) -> 128
    assert n == 27_063 - (123 * 64 + 64 * 128) + (123 * 16 + 16 * 128) + 4 * 471 + (123 * 32 + 32 + 32 * 128)
    assert n == 24_963 and n / 293_060 < 0.10
    assert mlp.projection is not None and mlp.projection[0].weight.shape == (16, 123)
    assert mlp.needs_ids and mlp.residual is not None
    g = torch.Generator().manual_seed(1)
    ids = torch.stack([torch.randint(0, v, (6,), generator=g) for v in vocab], dim=1)
    feats = {"e": torch.rand(6, 123), "h_shared": torch.rand(6, 128), "h_specific": torch.rand(6, 2, 128),
             "prompts": torch.randn(2, 128), "ids": ids}
    with_path = mlp(feats)
    residual, mlp.residual = mlp.residual, None
    torch.testing.assert_close(with_path, mlp(feats))  # B = 0 at initialisation: the path adds nothing
    mlp.residual = residual
    with torch.no_grad():
        residual[2].weight.normal_()
    assert not torch.allclose(mlp(feats), with_path)  # live once B moves
    e = feats["e"]
    assert not torch.allclose(residual(2 * e), 2 * residual(e))  # and not linear (ReLU, bias)
    # the offsets reach the logit through the residual path too
    mlp.zero_grad()
    mlp(feats).sum().backward()
    assert mlp.deltas is not None and mlp.deltas[5].grad is not None
    assert mlp.deltas[5].grad[ids[:, 5]].abs().sum() > 0
    assert float(mlp.l2_penalty()) == pytest.approx(float(mlp.tower.weight_l2()))  # zero offsets


def test_mptrec_emb_needs_tables_that_make_up_the_input() -> None:
    from mptrec.models.mptrec import MPTRecNewTaskHead

    kw = {"input_dim": 10, "hidden_dim": 8, "num_tasks": 2, "tower_hidden": (4,), "tau": 1.0}
    with pytest.raises(ValueError, match="needs id_tables"):
        MPTRecNewTaskHead("t3", "mptrec_emb", **kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="do not make up"):
        MPTRecNewTaskHead("t3", "mptrec_emb", **kw, id_tables=[(5, 4)], dense_dim=2)  # type: ignore[arg-type]


def test_cross_interaction_starts_as_the_identity_and_learns_products() -> None:
    from tests.models.tiny import tiny_config

    torch.manual_seed(0)
    plain = tiny_model("mptrec")
    torch.manual_seed(0)
    cross = tiny_model("mptrec", interaction="cross")
    assert cross.cross is not None and plain.cross is None  # type: ignore[attr-defined]
    missing = cross.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["cross.bias", "cross.weight"]
    dense, kjt, _ = tiny_batch(8)
    plain.eval()
    cross.eval()
    with torch.no_grad():
        want, got = plain(dense, kjt), cross(dense, kjt)
    for t in want:  # W = 0, b = 0: x = e
        torch.testing.assert_close(got[t], want[t])
    assert float(cross.dense_l2()) == float(plain.dense_l2())
    with torch.no_grad():
        cross.cross.weight.fill_(0.5)  # type: ignore[union-attr]
        extra = 0.125 * cross.input_dim ** 2  # sum of 0.5^2 / 2 over W
        assert float(cross.dense_l2()) == pytest.approx(float(plain.dense_l2()) + extra)
        moved = cross(dense, kjt)
    assert not torch.allclose(moved["ctr"], want["ctr"])
    # the gates and the new-task heads read e, not the crossed input
    assert torch.equal(cross.features(dense, kjt)["e"], plain.features(dense, kjt)["e"])
    with pytest.raises(ValueError, match="'cross' is implemented for the mptrec model only, not 'mmoe'"):
        tiny_config("mmoe", interaction="cross")
    with pytest.raises(ValueError, match="interaction must be 'none' or 'cross'"):
        tiny_config("mptrec", interaction="dot")


def test_feature_ids_are_one_per_row_or_a_clear_error() -> None:
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

    from mptrec.models.config import ModelConfig

    ebc = EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name=f"t_{f}", embedding_dim=4, num_embeddings=10, feature_names=[f])
        for f in "ab"])
    model = MPTRec(ModelConfig(expert_hidden=(8, 4), tower_hidden=(4,)), ebc, sparse_features=["b", "a"],
                   dense_dim=0, task_names=["ctr", "cvr"])
    kjt = KeyedJaggedTensor.from_lengths_sync(["a", "b"], torch.tensor([1, 2, 3, 7, 8, 9]),
                                              torch.ones(6, dtype=torch.long))
    assert model.feature_ids(kjt).tolist() == [[7, 1], [8, 2], [9, 3]]  # sparse_features order
    listed = KeyedJaggedTensor.from_lengths_sync(["a", "b"], torch.tensor([1, 2, 3, 7, 8, 9, 9]),
                                                 torch.tensor([1, 1, 1, 2, 1, 1]))
    with pytest.raises(ValueError, match=r"batch of 3 rows, \(feature, ids\): \[\('b', 4\)\]"):
        model.feature_ids(listed)
    model.set_single_valued(["a"])  # 'b' is a list feature: its ids are not returned
    assert model.id_features == ["a"] and model.feature_ids(listed).tolist() == [[1], [2], [3]]
    with pytest.raises(ValueError, match=r"single-valued features \['c'\] are not sparse features"):
        model.set_single_valued(["a", "c"])


def test_mptrec_emb_offsets_only_the_flagged_blocks() -> None:
    from mptrec.models.mptrec import MPTRecNewTaskHead

    kw = {"input_dim": 14, "hidden_dim": 8, "num_tasks": 2, "tower_hidden": (4,), "tau": 1.0}
    tables = [(5, 4), (7, 4), (3, 4)]
    torch.manual_seed(0)
    head = MPTRecNewTaskHead("t3", "mptrec_emb", **kw, id_tables=tables, dense_dim=2,  # type: ignore[arg-type]
                             offset_columns=[0, -1, 1])
    assert head.deltas is not None and [tuple(t.shape) for t in head.deltas] == [(5, 4), (3, 4)]
    with torch.no_grad():
        for t in head.deltas:
            t.normal_()
    e, ids = torch.rand(6, 14), torch.tensor([[0, 2], [1, 0], [4, 1], [3, 2], [0, 0], [2, 1]])
    shifted = head.shifted_input(e, ids)
    torch.testing.assert_close(shifted[:, 2:6], e[:, 2:6] + head.deltas[0][ids[:, 0]])
    assert torch.equal(shifted[:, :2], e[:, :2]) and torch.equal(shifted[:, 6:10], e[:, 6:10])
    torch.testing.assert_close(shifted[:, 10:], e[:, 10:] + head.deltas[1][ids[:, 1]])
    # every block flagged (the one-add path): each block moves by its own table's rows
    every = MPTRecNewTaskHead("t3", "mptrec_emb", **kw, id_tables=tables, dense_dim=2)  # type: ignore[arg-type]
    assert every.deltas is not None
    with torch.no_grad():
        for t in every.deltas:
            t.normal_()
    ids3 = torch.tensor([[0, 6, 2], [4, 1, 0]])
    want = torch.cat([e[:2, :2]] + [e[:2, a:a + 4] + every.deltas[k][ids3[:, k]]
                                    for k, a in enumerate((2, 6, 10))], dim=1)
    torch.testing.assert_close(every.shifted_input(e[:2], ids3), want)
    for bad in ([-1, -1, -1], [0, 0, -1], [0, 1]):
        with pytest.raises(ValueError, match="must give each of the 3 id_tables a distinct ids column"):
            MPTRecNewTaskHead("t3", "mptrec_emb", **kw, id_tables=tables, dense_dim=2,  # type: ignore[arg-type]
                              offset_columns=bad)


def test_offset_max_rows_keeps_the_offsets_to_small_single_valued_tables() -> None:
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

    from mptrec.models.config import ModelConfig

    rows = {"a": 10, "b": 500, "c": 40, "l": 20}
    ebc = EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name=f"t_{f}", embedding_dim=4, num_embeddings=n, feature_names=[f])
        for f, n in rows.items()])
    model = MPTRec(ModelConfig(expert_hidden=(8, 4), tower_hidden=(4,)), ebc, sparse_features=list(rows),
                   dense_dim=1, task_names=["ctr", "cvr"])
    model.set_single_valued(["a", "b", "c"])  # 'l' is a list feature
    every = model.new_task_head("t3", "mptrec_emb")
    assert every.deltas is not None and [t.shape[0] for t in every.deltas] == [10, 500, 40]
    capped = model.new_task_head("t3", "mptrec_emb", offset_max_rows=100)
    assert capped.deltas is not None and [t.shape[0] for t in capped.deltas] == [10, 40]  # 'b' is too big
    e = torch.rand(3, model.input_dim)
    ids = torch.tensor([[1, 400, 7], [2, 401, 8], [3, 402, 9]])  # columns: a, b, c (id_features)
    with torch.no_grad():
        for t in capped.deltas:
            t.fill_(1.0)
    shifted = capped.shifted_input(e, ids)
    # e = [dense | a | b | c | l]: a and c move by 1, the dense column, b and l do not
    moved = [0.0] + [1.0] * 4 + [0.0] * 4 + [1.0] * 4 + [0.0] * 4
    torch.testing.assert_close(shifted - e, torch.tensor([moved] * 3))
    with pytest.raises(ValueError, match=r"no table to offset: single-valued features \['a', 'b', 'c'\] "
                                         r"\(rows \[10, 500, 40\]\), offset_max_rows = 5"):
        model.new_task_head("t3", "mptrec_emb", offset_max_rows=5)
    with pytest.raises(ValueError, match=r"offset_max_rows = 100: .* not 'mptrec_res'"):
        model.new_task_head("t3", "mptrec_res", offset_max_rows=100)
    mmoe = tiny_model("mmoe")
    with pytest.raises(ValueError, match=r"offset_max_rows = 3: .* \[\], not 'mmoe\*'"):
        mmoe.new_task_head("t3", "mmoe*", offset_max_rows=3)


@pytest.mark.parametrize("method", ["mptrec_emb", "mptrec_mlp"])
@pytest.mark.parametrize("offset_columns", [None, [2, -1, 0]])
def test_stacked_offset_lookup_equals_one_lookup_per_table(method: str,
                                                           offset_columns: list[int] | None) -> None:
    """The offsets looked up as one stacked table (the default when widths agree): the same e' and
    the same gradients of every table, to the bit, as one lookup per table."""
    from mptrec.models.mptrec import MPTRecNewTaskHead

    torch.manual_seed(0)
    tables = [(5, 4), (7, 4), (3, 4)]
    head = MPTRecNewTaskHead("t", method, input_dim=2 + 12, hidden_dim=16, num_tasks=2, tower_hidden=(8,),
                             tau=10.0, id_tables=tables, dense_dim=2, offset_columns=offset_columns)
    assert head.fused_offsets and head.deltas is not None
    with torch.no_grad():
        for p in head.deltas:
            p.normal_()
    ids = torch.stack([torch.randint(0, n, (300,)) for n, _ in tables], 1)
    if offset_columns is not None:  # table 0 reads ids column 2, table 2 column 0
        ids = ids[:, [2, 1, 0]]
    e, weights = torch.randn(300, 14), torch.randn(14)
    got = []
    for fused in (True, False):
        head.fused_offsets = fused
        head.zero_grad()
        shifted = head.shifted_input(e, ids)
        (shifted * weights).sum().backward()
        got.append((shifted.detach(), [p.grad for p in head.deltas]))
    assert torch.equal(got[0][0], got[1][0])
    assert all(a is not None and b is not None and torch.equal(a, b) for a, b in zip(got[0][1], got[1][1]))
    # mixed widths: one lookup per table
    mixed = MPTRecNewTaskHead("t", method, input_dim=2 + 10, hidden_dim=16, num_tasks=2, tower_hidden=(8,),
                              tau=10.0, id_tables=[(5, 4), (7, 6)], dense_dim=2)
    assert not mixed.fused_offsets
    assert mixed.shifted_input(torch.zeros(3, 12), torch.zeros(3, 2, dtype=torch.int64)).shape == (3, 12)
