"""The dense L2 (spec Eq. 9 and 15's ``r_dnn``) as Adam's weight decay equals the L2 term in the loss."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

from mptrec.models import ModelConfig, build_model
from mptrec.pipeline.sharding import dense_adam, l2_weight_decay
from mptrec.pipeline.tasks.tuning_loop import head_optimizer, head_step

R_DNN = 0.05  # large, so that a wrong or missing decay moves the weights visibly


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
        name="t_a", embedding_dim=4, num_embeddings=10, feature_names=["a"])])
    cfg = ModelConfig(name=name, expert_hidden=(16, 8), tower_hidden=(4,), r_dnn=R_DNN, num_experts=2,
                      interaction="cross" if name == "mptrec" else "none")
    return build_model(cfg, ebc, sparse_features=["a"], dense_dim=3, task_names=["ctr", "cvr"])


def _batch(i: int) -> tuple[torch.Tensor, KeyedJaggedTensor, dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    kjt = KeyedJaggedTensor.from_lengths_sync(["a"], torch.randint(0, 10, (32,), generator=g),
                                              torch.ones(32, dtype=torch.int64))
    labels = {t: (torch.rand(32, generator=g) < 0.4).float() for t in ("ctr", "cvr")}
    return torch.randn(32, 3, generator=g), kjt, labels, torch.randint(0, 2, (32,), generator=g)


@pytest.mark.parametrize("name", ["mptrec", "mmoe", "ple", "shared_bottom", "single_task"])
def test_weight_decay_gives_the_updates_and_losses_of_the_l2_term_in_the_loss(name: str) -> None:
    in_loss = _model(name)
    by_opt = copy.deepcopy(in_loss)
    opt_loss = torch.optim.Adam(in_loss.parameters(), lr=1e-2, fused=True)
    decay = l2_weight_decay(by_opt)
    assert by_opt.l2_by_optimizer and not in_loss.l2_by_optimizer
    assert set(decay) == {id(p) for p in by_opt.l2_parameters()} and set(decay.values()) == {R_DNN}
    opt_decay = dense_adam(list(by_opt.parameters()), 1e-2, decay)
    for i in range(5):
        dense, kjt, labels, assign = _batch(i)
        losses = []
        for model, opt in ((in_loss, opt_loss), (by_opt, opt_decay)):
            opt.zero_grad()
            loss, parts = model.loss(model.forward_train(dense, kjt), labels, assign)
            loss.backward()
            opt.step()
            losses.append((float(loss.detach()), float(parts["l2"])))
        assert losses[0] == pytest.approx(losses[1], rel=1e-5)  # the reported loss keeps the term
    for (k, a), b in zip(in_loss.state_dict().items(), by_opt.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)  # Adam amplifies rounding
    start = _model(name).l2_parameters()
    moved = max(float((a - b).abs().max()) for a, b in zip(in_loss.l2_parameters(), start))
    assert moved > 1e-3  # the weights did train


def test_without_decay_the_l2_weights_train_differently() -> None:
    # the check above can fail: leaving the decay out gives other weights
    in_loss, no_decay = _model("mmoe"), _model("mmoe")
    no_decay.l2_by_optimizer = True  # the loss adds the value only, and no optimizer decays
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (in_loss, no_decay)]
    for i in range(5):
        dense, kjt, labels, _ = _batch(i)
        for model, opt in zip((in_loss, no_decay), opts):
            opt.zero_grad()
            model.loss(model.forward_train(dense, kjt), labels)[0].backward()
            opt.step()
    diff = max(float((a - b).abs().max()) for a, b in zip(in_loss.l2_parameters(), no_decay.l2_parameters()))
    assert diff > 1e-4


@pytest.mark.parametrize("method", ["mptrec", "mptrec_emb", "mptrec_mlp", "fw"])
def test_head_step_equals_the_l2_penalty_in_the_loss(method: str) -> None:
    backbone = _model("mptrec")
    backbone.eval()
    torch.manual_seed(1)
    head = backbone.new_task_head("t3", method)
    ref = copy.deepcopy(head)
    opt, ref_opt = head_optimizer(head, 1e-2, R_DNN), torch.optim.Adam(ref.parameters(), lr=1e-2, fused=True)
    in_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert in_opt == sum(p.numel() for p in head.parameters())
    for i in range(5):
        dense, kjt, labels, _ = _batch(i)
        with torch.no_grad():
            feats = backbone.features(dense, kjt)
        feats["ids"] = backbone.feature_ids(kjt)
        value = head_step(head, opt, feats, labels["ctr"], R_DNN)
        ref_opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(ref(feats), labels["ctr"]) + R_DNN * ref.l2_penalty()
        loss.backward()
        ref_opt.step()
        assert value == pytest.approx(float(loss), rel=1e-5)
    for (k, a), b in zip(ref.state_dict().items(), head.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=k)
