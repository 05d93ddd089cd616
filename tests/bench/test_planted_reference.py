"""bench/planted_reference.py: the fitted form is the generator's form, with the generator's priors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mptrec.bench.planted_reference import CLICK, T3, PlantedForm, fit, main
from mptrec.data_loaders.synth import BUY_SCALES, USER_FACTOR_FIELDS, PlantedModel, generate_aliccp

SPLIT = {"train": 0.8, "valid": 0.1, "test": 0.1}


def _with_true_effects(pm: PlantedModel) -> PlantedForm:
    """A PlantedForm holding the generator's own effects (the user id's effect has no table)."""
    form = PlantedForm({f: int(v) for f, v in pm.vocab.items()}).double()
    with torch.no_grad():
        for f in CLICK:
            form.click[f].copy_(torch.from_numpy(pm.click_eff[f]))
        for f in BUY_SCALES:
            form.buy[f].copy_(torch.from_numpy(pm.buy_eff[f]))
        for f in T3:
            form.t3[f].copy_(torch.from_numpy(pm.t3_eff[f]))
        for f in USER_FACTOR_FIELDS:
            form.user[f].copy_(torch.from_numpy(pm.user_factors[f]))
        form.cat.copy_(torch.from_numpy(pm.cat_factors))
        form.cat_buy.copy_(torch.from_numpy(pm.cat_factors_buy))
        form.weight_q.fill_(0.6)
        form.weight_t.fill_(-0.5 / pm.shared_std)
        form.bias.copy_(torch.tensor([pm.c0, pm.q0, pm.t0 + 0.5 * pm.shared_mean / pm.shared_std],
                                    dtype=torch.float64))
    return form


def test_the_form_with_the_true_effects_gives_the_planted_logits() -> None:
    pm = PlantedModel(3, click_rate=0.2, purchase_rate=0.1, scenario2_rate=0.3)
    cols, parts = pm.features(5000, np.random.default_rng(0))
    seen = parts["shared"] - pm.click_eff["101"][cols["101"]]  # what the inputs can explain
    form = _with_true_effects(pm)
    ids = {f: torch.from_numpy(np.asarray(cols[f], dtype=np.int64)) for f in form.click | form.t3 | form.user}
    ids["206"] = torch.from_numpy(cols["206"])
    click, buy, is2 = (t.detach().numpy() for t in form(ids))
    own = sum(pm.buy_eff[f][cols[f]] for f in BUY_SCALES)
    t3 = sum(pm.t3_eff[f][cols[f]] for f in T3)
    np.testing.assert_allclose(click, pm.c0 + seen, atol=1e-8)
    np.testing.assert_allclose(buy, pm.q0 + 0.6 * seen + own + parts["buy_inter"], atol=1e-8)
    np.testing.assert_allclose(is2, pm.t0 - 0.5 * (seen - pm.shared_mean) / pm.shared_std + t3, atol=1e-8)


def test_the_prior_uses_the_planted_scales() -> None:
    """Effects drawn with scale s cost about 1/2 per id under a N(0, s^2) prior (law of large numbers)."""
    pm = PlantedModel(4, click_rate=0.2, purchase_rate=0.1, scenario2_rate=0.3)
    form = _with_true_effects(pm)
    n = sum(t.numel() for t in form.parameters()) - 5  # minus the three biases and two weights
    with torch.no_grad():
        assert float(form.neg_log_prior()) / (n / 2) == pytest.approx(1.0, abs=0.01)
        form.click["206"].mul_(2.0)  # a table with the wrong scale costs more
        assert float(form.neg_log_prior()) / (n / 2) > 1.01


def test_fit_learns_from_generated_shards(tmp_path: Path) -> None:
    schema = generate_aliccp(tmp_path / "d", rows=60_000, shards=2, seed=7, split=SPLIT,
                             click_rate=0.2, purchase_rate=0.1)
    res = fit(tmp_path / "d", epochs=3, lr=0.05, batch_size=8192, progress=False)
    assert res["train_rows"] == 48_000 and 1 <= res["epochs"] <= 3
    for task, label in (("ctr", "click"), ("cvr", "purchase"), ("scenario", "301")):
        assert 0.55 < res["test"][task] < schema["bayes_auc"][label] + 0.02, (task, res["test"])


def test_cli_refuses_shards_that_are_not_generated(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--data", str(tmp_path), "--out", str(tmp_path / "r.json")]) == 1
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "schema.json").write_text(json.dumps({"dataset": "aliccp"}))
    assert main(["--data", str(tmp_path), "--out", str(tmp_path / "r.json")]) == 1
    assert "not generated data" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()
