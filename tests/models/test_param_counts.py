"""Parameter-count anchors of spec sections 1, 4 and 8 (the paper's #Params columns).

Census (three-task, new-task experiments): 11 dense fields + 28 sparse fields of width 4
(``education`` removed) -> D_in = 123, experts (256, 128), towers (64, 32). The authors'
``config.py`` (29 fields, 488 ids) is not available here; the per-field vocabulary sizes below
are the distinct-value counts of the UCI Census-Income training file (they sum to 488 with
``education``'s 17 values, as the spec says), so the tables hold 471 * 4 = 1,884 parameters
and the dense part 291,176: total 293,060, the spec's anchor.

Ali-CCP: 16 sparse fields of width 5 (``101`` and ``301`` removed) with AITM's vocabulary sizes
(../shared/data/README.md), D_in = 80, experts (128, 64), towers (32, 32): tables
1,044,451 * 5 = 5,222,255, dense 84,870, total 5,307,125 (the spec's anchor). The EBC is built
on the meta device (shapes only).
"""

from __future__ import annotations

import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

from mptrec.models import ModelConfig, MultiTaskModel, build_model, count_parameters

torch.set_num_threads(1)

CENSUS_VOCAB = {
    "class_worker": 9, "det_ind_code": 52, "det_occ_code": 47, "hs_college": 3, "major_ind_code": 24,
    "major_occ_code": 15, "race": 5, "hisp_origin": 10, "sex": 2, "union_member": 3, "unemp_reason": 6,
    "full_or_part_emp": 8, "tax_filer_stat": 6, "region_prev_res": 6, "state_prev_res": 51,
    "det_hh_fam_stat": 38, "det_hh_summ": 8, "mig_chg_msa": 10, "mig_chg_reg": 9, "mig_move_reg": 10,
    "mig_same": 3, "mig_prev_sunbelt": 4, "fam_under_18": 5, "country_father": 43, "country_mother": 43,
    "country_self": 43, "citizenship": 5, "vet_question": 3,
}  # + education (17) = 29 fields, 488 ids
ALICCP_VOCAB = {
    "121": 98, "122": 14, "124": 3, "125": 8, "126": 4, "127": 4, "128": 3, "129": 5, "205": 467298,
    "206": 6929, "207": 263942, "216": 106399, "508": 5888, "509": 104830, "702": 51878, "853": 37148,
}
CENSUS = ModelConfig(expert_hidden=(256, 128), tower_hidden=(64, 32))
ALICCP = ModelConfig(expert_hidden=(128, 64), tower_hidden=(32, 32), expert_dropout=(0.1, 0.3))


def _ebc(vocab: dict[str, int], dim: int) -> EmbeddingBagCollection:
    tables = [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=dim, num_embeddings=n, feature_names=[f])
              for f, n in vocab.items()]
    return EmbeddingBagCollection(tables=tables, device=torch.device("meta"))


def _model(cfg: ModelConfig, vocab: dict[str, int], dim: int, dense_dim: int,
           tasks: list[str]) -> MultiTaskModel:
    return build_model(cfg, _ebc(vocab, dim), sparse_features=list(vocab), dense_dim=dense_dim,
                       task_names=tasks)


def _dense_count(model: MultiTaskModel) -> int:
    return count_parameters(model)[1] - count_parameters(model.ebc)[1]


def test_census_vocabulary_matches_the_spec_totals() -> None:
    assert len(CENSUS_VOCAB) == 28 and sum(CENSUS_VOCAB.values()) + 17 == 488


def test_census_three_task_mptrec_has_293060_parameters() -> None:
    model = _model(CENSUS, CENSUS_VOCAB, 4, 11, ["income", "marital", "education"])
    assert model.input_dim == 123
    assert count_parameters(model.ebc) == (471 * 4, 471 * 4)
    assert _dense_count(model) == 291_176
    assert count_parameters(model) == (293_060, 293_060)


def test_aliccp_three_task_mptrec_has_5307125_parameters() -> None:
    model = _model(ALICCP, ALICCP_VOCAB, 5, 0, ["ctr", "cvr", "t3"])
    assert model.input_dim == 80
    assert _dense_count(model) == 84_870
    assert count_parameters(model)[1] == 5_307_125


@pytest.mark.parametrize(
    ("cfg", "vocab", "dim", "dense", "expected"),
    [(CENSUS, CENSUS_VOCAB, 4, 11, 27_063), (ALICCP, ALICCP_VOCAB, 5, 0, 8_129)],
    ids=["census", "aliccp"],
)
def test_new_task_module_parameters(cfg: ModelConfig, vocab: dict[str, int], dim: int, dense: int,
                                    expected: int) -> None:
    model = _model(cfg, vocab, dim, dense, ["t1", "t2"])
    head = model.new_task_head("t3", "mptrec")
    assert count_parameters(head) == (expected, expected)
    hidden, d_in, tower = cfg.hidden_dim, model.input_dim, count_parameters(head.tower)[1]
    # FW and TES drop the projection only: p_new + gate + tower
    for method in ("fw", "tes"):
        assert count_parameters(model.new_task_head("t3", method))[1] == hidden + 2 * d_in + tower


@pytest.mark.parametrize(
    ("cfg", "vocab", "dim", "dense", "percent", "digits"),
    [(CENSUS, CENSUS_VOCAB, 4, 11, 9.23, 2), (ALICCP, ALICCP_VOCAB, 5, 0, 0.153, 3)],
    ids=["census", "aliccp"],
)
def test_paper_percentages(cfg: ModelConfig, vocab: dict[str, int], dim: int, dense: int, percent: float,
                           digits: int) -> None:
    """The paper's trainable share of a new task: the built head over the built three-task model."""
    head = _model(cfg, vocab, dim, dense, ["t1", "t2"]).new_task_head("t3", "mptrec")
    full = _model(cfg, vocab, dim, dense, ["t1", "t2", "t3"])
    assert round(100 * count_parameters(head)[1] / count_parameters(full)[1], digits) == percent


def test_census_three_task_shared_bottom_has_97631_parameters_and_one_tower_is_10369() -> None:
    cfg = ModelConfig(name="shared_bottom", expert_hidden=(256, 128), tower_hidden=(64, 32))
    model = _model(cfg, CENSUS_VOCAB, 4, 11, ["income", "marital", "education"])
    assert count_parameters(model)[1] == 97_631  # spec section 8
    assert count_parameters(model.new_task_head("t4", "shared_bottom*"))[1] == 10_369
