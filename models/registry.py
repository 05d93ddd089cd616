"""The model registry: an explicit dict filled by :func:`register_model` (duplicates raise)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import torch  # noqa: F401  (used by the doctest)
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from mptrec.models.base import MultiTaskModel
from mptrec.models.baselines import MMoE, SharedBottom, SingleTask
from mptrec.models.config import ModelConfig
from mptrec.models.mptrec import MPTRec
from mptrec.models.ple import PLE

__all__ = ["MODELS", "ModelBuilder", "build_model", "register_model"]


class ModelBuilder(Protocol):
    """Builds a model from its config and the (possibly meta-device) EBC."""

    def __call__(
        self,
        cfg: ModelConfig,
        ebc: EmbeddingBagCollection,
        *,
        sparse_features: Sequence[str],
        dense_dim: int,
        task_names: Sequence[str],
        task_weights: Mapping[str, float] | None = None,
    ) -> MultiTaskModel:
        """Build the model."""
        ...


MODELS: dict[str, ModelBuilder] = {}


def register_model(name: str, builder: ModelBuilder) -> None:
    """Add ``builder`` under ``name``.

    Args:
        name: the ``model.name`` value that selects it.
        builder: a :class:`ModelBuilder` (a model class works).

    Raises:
        ValueError: ``name`` is empty or already registered.
    """
    if not name:
        raise ValueError("model name must be non-empty")
    if name in MODELS:
        raise ValueError(f"model {name!r} is already registered ({MODELS[name]!r})")
    MODELS[name] = builder


def build_model(
    cfg: ModelConfig,
    ebc: EmbeddingBagCollection,
    *,
    sparse_features: Sequence[str],
    dense_dim: int,
    task_names: Sequence[str],
    task_weights: Mapping[str, float] | None = None,
) -> MultiTaskModel:
    """Build ``MODELS[cfg.name]``.

    Args:
        cfg: the model config; ``cfg.name`` selects the builder.
        ebc: the EmbeddingBagCollection (stored as ``model.ebc``).
        sparse_features: EBC feature names in declared order.
        dense_dim: number of dense columns.
        task_names: the tasks.
        task_weights: task -> BCE weight (default 1 each).

    Returns:
        The model.

    Example:
        >>> from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
        >>> ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="t_a", embedding_dim=4,
        ...     num_embeddings=10, feature_names=["a"])], device=torch.device("meta"))
        >>> type(build_model(ModelConfig(name="mmoe"), ebc, sparse_features=["a"], dense_dim=0,
        ...                  task_names=["ctr"])).__name__
        'MMoE'
    """
    if cfg.name not in MODELS:
        raise ValueError(f"model.name = {cfg.name!r} is not registered; known: {sorted(MODELS)}")
    return MODELS[cfg.name](cfg, ebc, sparse_features=sparse_features, dense_dim=dense_dim,
                            task_names=task_names, task_weights=task_weights)


register_model("mptrec", MPTRec)
register_model("single_task", SingleTask)
register_model("shared_bottom", SharedBottom)
register_model("mmoe", MMoE)
register_model("ple", PLE)
