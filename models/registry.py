"""The model registry: an explicit dict filled by :func:`register_model` (duplicates raise).

Which new-task methods fit which model is declared once, as ``new_task_methods`` on each model
class (with ``id_reading_methods``, those whose heads read each row's ids);
:func:`new_task_methods`, :func:`id_reading_methods` and :func:`all_new_task_methods` read it from
:data:`MODELS`.

Example:
    >>> new_task_methods("mptrec")
    ('mptrec', 'mptrec_res', 'mptrec_emb', 'mptrec_mlp', 'fw', 'tes')
    >>> id_reading_methods("mptrec"), id_reading_methods("mmoe")
    (('mptrec_emb', 'mptrec_mlp'), ())
    >>> "ple*" in all_new_task_methods(), new_task_methods("nope")
    (True, ())
"""

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

__all__ = [
    "MODELS",
    "ModelBuilder",
    "all_new_task_methods",
    "build_model",
    "id_reading_methods",
    "new_task_methods",
    "register_model",
]


class ModelBuilder(Protocol):
    """Builds a model from its config and the (possibly meta-device) EBC (a model class is one).

    ``new_task_methods``: the new-task methods whose heads fit the models it builds
    (:attr:`MultiTaskModel.new_task_methods`); ``id_reading_methods``: those among them whose
    heads read each row's sparse ids.
    """

    new_task_methods: tuple[str, ...]
    id_reading_methods: tuple[str, ...]

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
    single_valued: Sequence[str] | None = None,
) -> MultiTaskModel:
    """Build ``MODELS[cfg.name]``.

    Args:
        cfg: the model config; ``cfg.name`` selects the builder.
        ebc: the EmbeddingBagCollection (stored as ``model.ebc``).
        sparse_features: EBC feature names in declared order.
        dense_dim: number of dense columns.
        task_names: the tasks.
        task_weights: task -> BCE weight (default 1 each).
        single_valued: the sparse features with one id per row (None: all of them;
            :meth:`MultiTaskModel.set_single_valued`).

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
    model = MODELS[cfg.name](cfg, ebc, sparse_features=sparse_features, dense_dim=dense_dim,
                             task_names=task_names, task_weights=task_weights)
    if single_valued is not None:
        model.set_single_valued(single_valued)
    return model


def new_task_methods(model_name: str) -> tuple[str, ...]:
    """The new-task methods that fit a base model of registered name ``model_name`` (none if unknown)."""
    builder = MODELS.get(model_name)
    return tuple(builder.new_task_methods) if builder is not None else ()


def id_reading_methods(model_name: str) -> tuple[str, ...]:
    """The new-task methods of ``model_name`` whose heads read each row's ids (single-valued inputs only)."""
    builder = MODELS.get(model_name)
    return tuple(builder.id_reading_methods) if builder is not None else ()


def all_new_task_methods() -> tuple[str, ...]:
    """Every new-task method of any registered model, in registration order, each once."""
    return tuple(dict.fromkeys(m for builder in MODELS.values() for m in builder.new_task_methods))


register_model("mptrec", MPTRec)
register_model("single_task", SingleTask)
register_model("shared_bottom", SharedBottom)
register_model("mmoe", MMoE)
register_model("ple", PLE)
