"""Config -> modules: feature specs to ``EmbeddingBagConfig`` s, the EBC on meta, the model.

The only place where configs become modules (style guide, rule 3). One table per sparse
feature, named ``t_<feature>`` with ``feature_names=[feature]``; multi-valued features pool
with the spec's pooling (``mean`` for list fields, ``sum`` otherwise).

Initialisation: each table's ``init_fn`` is ``torch.nn.init.normal_`` (N(0, 1), spec Eq. 1),
which is what an unsharded EBC built on a real device uses. On the meta device nothing is
allocated; ``DistributedModelParallel`` materialises each *local shard* and calls ``init_fn``
on it with the global RNG, so the values would depend on the plan and the world size. The
pipeline therefore re-initialises every table after sharding with plan-independent N(0, 1)
values (:func:`mptrec.pipeline.sharding.init_embedding_tables`, seeded by ``train.seed``).
The dense layers are built under ``torch.manual_seed(train.seed)``: the same on every rank.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from mptrec.data_loaders.layout import resolve_features
from mptrec.data_loaders.schema import FeatureSpec
from mptrec.models import build_model
from mptrec.models.base import MultiTaskModel
from mptrec.pipeline.config import RunConfig
from mptrec.pipeline.strict import ConfigError

__all__ = ["build_ebc", "build_from_config", "check_labels", "embedding_bag_configs", "resolve_run_features"]

_POOLING = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}


def embedding_bag_configs(features: Sequence[FeatureSpec]) -> list[EmbeddingBagConfig]:
    """One ``EmbeddingBagConfig`` per sparse feature, in declared order.

    Args:
        features: feature specs (dense ones are skipped).

    Returns:
        Table configs named ``t_<feature>`` with N(0, 1) ``init_fn``.
    """
    out = []
    for f in features:
        if f.kind != "sparse":
            continue
        out.append(EmbeddingBagConfig(
            name=f"t_{f.name}", embedding_dim=f.embedding_dim, num_embeddings=f.num_embeddings,
            feature_names=[f.name], pooling=_POOLING[f.pooling], init_fn=torch.nn.init.normal_,
        ))
    return out


def build_ebc(features: Sequence[FeatureSpec], device: torch.device | str = "meta") -> EmbeddingBagCollection:
    """The model's ``EmbeddingBagCollection`` (on the meta device by default, for DMP).

    Args:
        features: feature specs; at least one sparse.
        device: ``meta`` for sharding; a real device for an unsharded model (tables N(0, 1)
            from the global RNG).

    Returns:
        The EBC.
    """
    tables = embedding_bag_configs(features)
    if not tables:
        raise ValueError("the model has no sparse feature: an EmbeddingBagCollection needs at least "
                         "one table")
    return EmbeddingBagCollection(tables=tables, device=torch.device(device))


def resolve_run_features(cfg: RunConfig, schema: Mapping[str, Any]) -> list[FeatureSpec]:
    """The run's input features from the shards' schema and ``[features]``.

    Raises:
        ConfigError: a feature named in the config is not in the schema, or a label column is
            also an input (naming both).
    """
    overrides = {o.name: (o.embedding_dim, o.num_embeddings) for o in cfg.features.overrides}
    try:
        features = resolve_features(
            schema, embedding_dim=cfg.features.embedding_dim, include=cfg.features.include,
            exclude=cfg.features.exclude, use_dense=cfg.features.use_dense, overrides=overrides,
        )
    except ValueError as e:
        raise ConfigError(f"{cfg.data.path}/schema.json vs config [features]: {e}") from e
    return features


def check_labels(cfg: RunConfig, schema: Mapping[str, Any]) -> None:
    """Every task's label column exists in the shards (and its positive values are declared).

    Raises:
        ConfigError: naming the task, the column and the columns available.
    """
    labels = schema.get("labels", {})
    for t in cfg.tasks:
        if t.label not in labels:
            raise ConfigError(
                f"task {t.name!r}: label column {t.label!r} is not in {cfg.data.path}/schema.json "
                f"(label columns: {sorted(labels)})"
            )
        values = labels[t.label].get("values", []) if isinstance(labels[t.label], Mapping) else []
        bad = [v for v in t.positive_values if v not in values]
        if bad:
            raise ConfigError(f"task {t.name!r}: positive_values {bad} never occur in column {t.label!r} "
                              f"(values: {values})")
        if not t.positive_values and sorted(values) != [0, 1] and values:
            raise ConfigError(f"task {t.name!r}: column {t.label!r} holds values {values}; give "
                              "positive_values to binarise it")


def build_from_config(cfg: RunConfig, schema: Mapping[str, Any],
                      ebc_device: torch.device | str = "meta") -> tuple[MultiTaskModel, list[FeatureSpec]]:
    """Build the run's model (EBC on meta) from the config and the shards' schema.

    Args:
        cfg: the run config.
        schema: from ``mptrec.data_loaders.layout.read_schema(cfg.data.path)``.
        ebc_device: where the EBC is built (``meta`` for DMP).

    Returns:
        (model, features): the ``MultiTaskModel`` and its input features (dense first).
    """
    check_labels(cfg, schema)
    features = resolve_run_features(cfg, schema)
    sparse = [f.name for f in features if f.kind == "sparse"]
    dense_dim = sum(f.kind == "dense" for f in features)
    torch.manual_seed(cfg.train.seed)
    ebc = build_ebc(features, ebc_device)
    model = build_model(cfg.model, ebc, sparse_features=sparse, dense_dim=dense_dim,
                        task_names=cfg.task_names,
                        task_weights={t.name: t.weight for t in cfg.tasks})
    return model, features
