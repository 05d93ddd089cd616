"""pipeline/build.py: feature specs -> tables and EBC on meta, config + schema -> model, input checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchrec.modules.embedding_configs import PoolingType

from mptrec.data_loaders.layout import read_schema
from mptrec.data_loaders.schema import FeatureSpec
from mptrec.models import MPTRec
from mptrec.pipeline.build import build_ebc, build_from_config, embedding_bag_configs
from mptrec.pipeline.strict import ConfigError
from tests.pipeline.train.test_train_data import debug_config, write_tiny_shards


def test_one_table_per_sparse_feature_named_t_feature() -> None:
    feats = [FeatureSpec("age", kind="dense"), FeatureSpec("a", num_embeddings=10, embedding_dim=4),
             FeatureSpec("b", num_embeddings=7, embedding_dim=8, multivalent=True, pooling="mean")]
    tables = embedding_bag_configs(feats)
    assert [(t.name, t.feature_names, t.num_embeddings, t.embedding_dim) for t in tables] == [
        ("t_a", ["a"], 10, 4), ("t_b", ["b"], 7, 8)]
    assert tables[1].pooling == PoolingType.MEAN and tables[0].pooling == PoolingType.SUM
    meta = build_ebc(feats)
    assert all(p.device.type == "meta" for p in meta.parameters())
    torch.manual_seed(0)
    real = build_ebc(feats, "cpu")  # init_fn: N(0, 1) (spec Eq. 1), not TorchRec's uniform default
    w = real.embedding_bags["t_a"].weight
    assert float(w.abs().max()) > 1.0 / 10 ** 0.5
    with pytest.raises(ValueError, match="no sparse feature"):
        build_ebc([FeatureSpec("age", kind="dense")])


def test_build_from_config_and_schema(tmp_path: Path) -> None:
    data = write_tiny_shards(tmp_path / "data", rows={"train": 64, "valid": 64})
    cfg = debug_config(data, tmp_path / "run", 'features.exclude=["f2"]',
                       'features.overrides=[{name = "f1", embedding_dim = 8}]')
    model, features = build_from_config(cfg, read_schema(data))
    assert isinstance(model, MPTRec) and model.task_names == ["ctr", "cvr"]
    assert [f.name for f in features] == ["d0", "d1", "f0", "f1", "m0"]
    assert model.input_dim == 2 + 4 + 8 + 4
    assert model.ebc.embedding_bags["t_f0"].weight.device.type == "meta"
    again, _ = build_from_config(cfg, read_schema(data))  # dense layers seeded by train.seed
    assert all(torch.equal(a, b) for (n, a), (_, b) in zip(model.named_parameters(), again.named_parameters())
               if "ebc" not in n)


def test_config_naming_absent_columns_is_an_error(tmp_path: Path) -> None:
    data = write_tiny_shards(tmp_path / "data", rows={"train": 64, "valid": 64})
    schema = read_schema(data)
    with pytest.raises(ConfigError, match="'nope'"):
        build_from_config(debug_config(data, tmp_path, 'features.exclude=["nope"]'), schema)
    with pytest.raises(ConfigError, match="task 'ctr': label column 'clk' is not in"):
        build_from_config(debug_config(data, tmp_path, 'tasks=[{name = "ctr", label = "clk"}]'), schema)
    with pytest.raises(ConfigError, match="positive_values \\[3\\] never occur in column 'click'"):
        build_from_config(debug_config(data, tmp_path, 'tasks=[{name = "ctr", label = "click", '
                                                       'positive_values = [3]}]'), schema)
