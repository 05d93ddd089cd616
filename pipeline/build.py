"""Config -> modules: input features, label check, datasets, ``EmbeddingBagConfig`` s, EBC, model.

The only place where configs become modules and datasets (style guide, rule 3): the run's input
features (:func:`resolve_run_features`), the one label check (:func:`check_label`, for the
stage-1 tasks and for a new task), the one :class:`ShardDataset` factory (:func:`make_dataset`).

One table per sparse feature, named ``t_<feature>`` with ``feature_names=[feature]``;
multi-valued features pool with the spec's pooling (``mean`` for list fields, ``sum`` otherwise).

Initialisation: each table's ``init_fn`` is ``torch.nn.init.normal_`` (N(0, 1), spec Eq. 1),
which is what an unsharded EBC built on a real device uses. On the meta device nothing is
allocated; ``DistributedModelParallel`` materialises each *local shard* and calls ``init_fn``
on it with the global RNG, so the values would depend on the plan and the world size. The
pipeline therefore re-initialises every table after sharding with plan-independent N(0, 1)
values (:func:`mptrec.pipeline.table_init.init_embedding_tables`, seeded by ``train.seed``).
The dense layers are built under ``torch.manual_seed(train.seed)``: the same on every rank.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from mptrec.data_loaders.layout import resolve_features
from mptrec.data_loaders.schema import FeatureSpec, LabelSpec
from mptrec.models import build_model
from mptrec.models.base import MultiTaskModel
from mptrec.pipeline.config import DataConfig, RunConfig, TaskSpec
from mptrec.pipeline.strict import ConfigError

if TYPE_CHECKING:
    from mptrec.data_loaders.dataset import ShardDataset

__all__ = [
    "TABLE_KEY",
    "build_ebc",
    "build_from_config",
    "check_label",
    "embedding_bag_configs",
    "make_dataset",
    "resolve_run_features",
    "table_name",
]

_POOLING = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}


#: a table's weight in a state dict (group 1: the table's name), whatever wraps the EBC
TABLE_KEY = re.compile(r"(?:^|\.)embedding_bags\.(t_.+)\.weight$")


def table_name(feature: str) -> str:
    """Name of the embedding table of a sparse feature (one table per feature)."""
    return f"t_{feature}"


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
            name=table_name(f.name), embedding_dim=f.embedding_dim, num_embeddings=f.num_embeddings,
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


def check_label(task: TaskSpec, schema: Mapping[str, Any], data_path: str) -> None:
    """A task's label column exists in the shards' schema and gives a binary label.

    The one label check, for the stage-1 tasks (:func:`build_from_config`) and for a new task
    (``mptrec tasks register``): the column is a label column of ``schema.json``; every
    ``positive_values`` entry occurs in it; without ``positive_values`` its values are 0/1.

    Raises:
        ConfigError: naming the task, the column and the columns or values available.
    """
    labels = schema.get("labels", {})
    where = f"task {task.name!r}"
    if task.label not in labels:
        raise ConfigError(f"{where}: label column {task.label!r} is not in {data_path}/schema.json "
                          f"(label columns: {sorted(labels)})")
    values = labels[task.label].get("values") if isinstance(labels[task.label], Mapping) else None
    if not values:  # read_schema refuses this; a hand-made schema may lack them
        return
    bad = [v for v in task.positive_values if v not in values]
    if bad:
        raise ConfigError(f"{where}: positive_values {bad} never occur in column {task.label!r} "
                          f"(values: {values})")
    if not task.positive_values and not set(values) <= {0, 1}:
        raise ConfigError(f"{where}: column {task.label!r} holds values {values}; set "
                          "positive_values to binarise it")


def make_dataset(data: DataConfig, split: str, features: Sequence[FeatureSpec], labels: Sequence[LabelSpec],
                 *, rank: int = 0, world_size: int = 1, shuffle: bool = False, seed: int = 0,
                 batch_size: int | None = None, drop_last: bool = False) -> ShardDataset:
    """The :class:`ShardDataset` of a split as the config ``[data]`` reads it (the one factory).

    Args:
        data: the run's ``[data]`` (path, batch size, shuffling, OOV policy, error policy, rows).
        split: the split.
        features: input features.
        labels: the labels to read.
        rank: this process's rank.
        world_size: the number of ranks.
        shuffle: shuffle this split when the config shuffles (``data.shuffle``), with its
            ``shuffle_buffer``.
        seed: shuffling seed.
        batch_size: rows per batch (None: ``data.batch_size``).
        drop_last: drop each reader's last incomplete batch.
    """
    from mptrec.data_loaders.dataset import ShardDataset

    shuffle = shuffle and data.shuffle
    return ShardDataset(data.path, split, features=features, labels=labels,
                        batch_size=data.batch_size if batch_size is None else batch_size, rank=rank,
                        world_size=world_size, shuffle=shuffle,
                        shuffle_buffer=data.shuffle_buffer if shuffle else 0, seed=seed,
                        oov_policy=data.oov_policy, on_error=data.on_error, max_rows=data.max_rows,
                        drop_last=drop_last)


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
    for task in cfg.tasks:
        check_label(task, schema, cfg.data.path)
    features = resolve_run_features(cfg, schema)
    sparse = [f.name for f in features if f.kind == "sparse"]
    dense_dim = sum(f.kind == "dense" for f in features)
    torch.manual_seed(cfg.train.seed)
    ebc = build_ebc(features, ebc_device)
    model = build_model(cfg.model, ebc, sparse_features=sparse, dense_dim=dense_dim,
                        task_names=cfg.task_names,
                        task_weights={t.name: t.weight for t in cfg.tasks},
                        single_valued=[f.name for f in features if f.single_valued])
    return model, features
