"""Strict TOML configuration: frozen dataclasses, typed, with errors that name file, key and value.

A run config (``configs/*.toml``) loads into :class:`RunConfig`; a new-task config
(``configs/tasks/*.toml``) loads into :class:`NewTaskSpec`. Loading is strict
(:mod:`mptrec.pipeline.strict`): an unknown key, a wrong type or an impossible value raises
:class:`~mptrec.pipeline.strict.ConfigError` naming the file, the dotted key and the value.
``--set a.b=c`` overrides are applied before validation, with TOML syntax for the value
(``--set train.lr=0.01``, ``--set model.expert_hidden=[64,32]``, bare words are strings).

Example:
    >>> cfg = load_config("configs/debug.toml", overrides=["train.epochs=2"])
    >>> cfg.train.epochs
    2
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from mptrec.data_loaders.schema import FeatureSpec, LabelSpec, OovPolicy
from mptrec.io import atomic_write_json
from mptrec.models.config import ModelConfig
from mptrec.models.registry import all_new_task_methods
from mptrec.pipeline.strict import (
    apply_overrides,
    from_dict,
    read_toml,
    require_non_negative,
    require_positive,
    to_dict,
)

__all__ = [
    "DataConfig",
    "FeatureOverride",
    "FeatureSpec",
    "FeaturesConfig",
    "ModelConfig",
    "NewTaskSettings",
    "NewTaskSpec",
    "RunConfig",
    "ShardingConfig",
    "TableConstraint",
    "TaskSpec",
    "TrainConfig",
    "load_config",
    "load_task_config",
    "write_resolved",
]


# --------------------------------------------------------------------------------------------
# Dataclasses
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataConfig:
    """Where the shards are and how they are read.

    Args:
        path: folder holding ``schema.json`` and one sub-folder of Parquet shards per split.
        train_split: split used for training.
        valid_split: split used for validation and early stopping ("" disables validation).
        test_split: split scored by ``mptrec eval`` by default.
        batch_size: rows per batch (per process).
        num_workers: DataLoader worker processes per rank (0: read in the main process).
        shuffle: shuffle each epoch: the order of the row groups and the rows inside every row
            group (seeded by seed, epoch, shard and row group, so a resumed epoch is the same).
        shuffle_buffer: rows held for a further shuffle across row groups (0: none).
        oov_policy: what to do with an id >= the table size: ``error``, ``hash`` (modulo) or
            ``clip`` (to the last row).
        on_error: ``raise`` on a bad row group, or ``skip`` it (counted and logged).
        max_rows: read at most this many rows of each split (0: all).
    """

    path: str
    train_split: str = "train"
    valid_split: str = "valid"
    test_split: str = "test"
    batch_size: int = 2048
    num_workers: int = 0
    shuffle: bool = True
    shuffle_buffer: int = 0
    oov_policy: OovPolicy = "error"
    on_error: Literal["raise", "skip"] = "raise"
    max_rows: int = 0

    def __post_init__(self) -> None:
        require_positive(self, "batch_size")
        require_non_negative(self, "num_workers", "shuffle_buffer", "max_rows")


@dataclass(frozen=True)
class FeatureOverride:
    """Per-feature override of the defaults in ``[features]``."""

    name: str
    embedding_dim: int = 0
    num_embeddings: int = 0

    def __post_init__(self) -> None:
        require_non_negative(self, "embedding_dim", "num_embeddings")


@dataclass(frozen=True)
class FeaturesConfig:
    """Which columns of the shards are model inputs.

    Args:
        embedding_dim: default width of every sparse feature's table. The fused CPU kernel
            needs a multiple of 4 (../shared/stack.md): the paper's Ali-CCP width 5 becomes 4.
        include: feature columns to use (empty: every feature column in ``schema.json``).
        exclude: feature columns never used as inputs (e.g. Ali-CCP ``101`` and ``301``).
        use_dense: use the dense (float) columns.
        overrides: per-feature embedding width or vocabulary size.
    """

    embedding_dim: int = 4
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    use_dense: bool = True
    overrides: tuple[FeatureOverride, ...] = ()

    def __post_init__(self) -> None:
        require_positive(self, "embedding_dim")
        both = sorted(set(self.include) & set(self.exclude))
        if both:
            raise ValueError(f"features {both} are both included and excluded")


@dataclass(frozen=True)
class TaskSpec:
    """A binary prediction task (field names follow TorchRec's ``RecTaskInfo``).

    Args:
        name: lower_snake task name; the key of the model's output dict.
        label: label column in the shards.
        positive_values: empty if the column is 0/1; else the raw values that mean 1.
        weight: weight of this task's loss.
    """

    name: str
    label: str
    positive_values: tuple[int, ...] = ()
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").isalnum() or self.name != self.name.lower():
            raise ValueError(f"task name must be lower_snake, got {self.name!r}")
        require_non_negative(self, "weight")

    def label_spec(self) -> LabelSpec:
        """The loader's view of this task's label."""
        return LabelSpec(name=self.name, column=self.label, positive_values=self.positive_values)


@dataclass(frozen=True)
class TrainConfig:
    """Stage-1 training.

    Args:
        epochs: maximum epochs.
        lr: dense optimizer (Adam) learning rate.
        embedding_optimizer: optimizer of the tables. For fused tables on CPU only
            ``rowwise_adagrad``, ``adagrad`` and ``sgd`` exist (``adam`` needs CUDA); tables that
            are all ``data_parallel`` take any of them, ``adam`` included.
        embedding_lr: learning rate of the embedding optimizer.
        embedding_init_std: standard deviation of the N(0, std^2) table initialisation (spec
            Eq. 1: 1.0, PyTorch's default).
        patience: early-stopping patience on the sum of validation AUCs, counted in validation
            points (epoch ends, and every ``validate_every`` steps when set).
        seed: seed of parameters, EM initial labels and shuffling.
        pipelined: use ``TrainPipelineSparseDist`` (False: a plain loop, same losses).
        max_steps: stop after this many steps (0: no limit); for smoke runs.
        log_every: steps between metrics-log lines.
        checkpoint_every: steps between mid-epoch checkpoints (0: end of epoch only).
        validate_every: steps between mid-epoch validations (0: end of epoch only). Each one
            counts towards ``patience`` like an epoch end, may stop the run mid-epoch, and writes
            a checkpoint (the best one when the AUC sum improved): ID-heavy CTR models often
            peak within the first epoch.
        keep_last: checkpoints kept besides the best.
        device: ``auto`` (CUDA with nccl when visible, else CPU with gloo), ``cpu`` or ``cuda``.
        threads: torch intra-op threads per process (0: leave torch's default).
        autocast: ``none`` (fp32), ``bf16``, or ``auto`` (bf16 on CUDA and on CPUs with native
            bf16 arithmetic, AVX512-BF16 or AMX in ``/proc/cpuinfo``; else fp32): the training
            forward and backward run under ``torch.autocast`` in bfloat16 (matrix products in
            bf16; weights, optimizer states, embedding tables, validation and evaluation stay
            fp32). See :func:`mptrec.pipeline.train.loop.bf16_autocast`.
    """

    epochs: int = 10
    lr: float = 1e-3
    embedding_optimizer: Literal["rowwise_adagrad", "adagrad", "sgd", "adam"] = "rowwise_adagrad"
    embedding_lr: float = 0.05
    embedding_init_std: float = 1.0
    patience: int = 3
    seed: int = 2024
    pipelined: bool = True
    max_steps: int = 0
    log_every: int = 50
    checkpoint_every: int = 0
    validate_every: int = 0
    keep_last: int = 2
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = 0
    autocast: Literal["none", "bf16", "auto"] = "none"

    def __post_init__(self) -> None:
        require_positive(self, "epochs", "lr", "embedding_lr", "log_every", "embedding_init_std")
        require_non_negative(self, "patience", "max_steps", "checkpoint_every",
                      "validate_every", "keep_last", "threads")


@dataclass(frozen=True)
class TableConstraint:
    """Planner constraint for one table (by feature name)."""

    feature: str
    sharding_types: tuple[
        Literal["table_wise", "column_wise", "row_wise", "table_row_wise", "data_parallel"], ...
    ] = ()

    def __post_init__(self) -> None:
        if not self.sharding_types:
            raise ValueError(f"constraint for {self.feature!r} lists no sharding_types")


@dataclass(frozen=True)
class ShardingConfig:
    """How the embedding tables are sharded.

    Args:
        sharding_types: sharding types the planner may use for every table (empty: on CPU
            ``table_wise`` and ``column_wise``; on CUDA everything).
        constraints: per-table overrides.
    """

    sharding_types: tuple[
        Literal["table_wise", "column_wise", "row_wise", "table_row_wise", "data_parallel"], ...
    ] = ()
    constraints: tuple[TableConstraint, ...] = ()


@dataclass(frozen=True)
class RunConfig:
    """A stage-1 run: data, features, tasks, model, training, sharding.

    Args:
        name: run name.
        out_dir: where checkpoints, logs, the task store and the resolved config go.
        data: see :class:`DataConfig`.
        features: see :class:`FeaturesConfig`.
        tasks: the pre-training tasks (at least one).
        model: see :class:`mptrec.models.config.ModelConfig`.
        train: see :class:`TrainConfig`.
        sharding: see :class:`ShardingConfig`.
    """

    name: str
    data: DataConfig
    tasks: tuple[TaskSpec, ...]
    out_dir: str = ""
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("at least one task is needed")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        if not self.out_dir:
            object.__setattr__(self, "out_dir", f"runs/{self.name}")

    @property
    def task_names(self) -> list[str]:
        """Task names in declared order."""
        return [t.name for t in self.tasks]


@dataclass(frozen=True)
class NewTaskSettings:
    """A new task's settings that may be inherited from the base run, with nothing left to inherit.

    Made only by :meth:`NewTaskSpec.resolve`.
    """

    tower_hidden: tuple[int, ...]
    batch_size: int
    r_dnn: float


@dataclass(frozen=True)
class NewTaskSpec:
    """A new business task, declared in ``configs/tasks/<name>.toml`` and trained in stage 2.

    ``None`` (the key left out) means "the base run's value"; :meth:`resolve` is the one place
    that fills it in. Values that meant the same in earlier versions (``tower_hidden = []``,
    ``batch_size = 0``, a negative ``r_dnn``, as ``task.json`` files of existing runs and
    ``configs/tasks/*.toml`` hold them) load as ``None``.

    Args:
        name: task name (lower_snake, not taken by the base run).
        label: label column in the shards.
        positive_values: raw values meaning 1 (empty: the column is 0/1).
        description: free text kept in the task store.
        method: ``mptrec`` (prompt tuning, spec 3.3), ``mptrec_res`` (``mptrec`` plus a rank-8
            linear residual path from ``e`` into the new tower's input, beyond the paper),
            ``mptrec_emb`` (``mptrec`` on the new task's own offsets of the single-valued sparse
            inputs' frozen embeddings, plus a rank-1 residual path, beyond the paper),
            ``mptrec_mlp`` (``mptrec_emb`` with a one-hidden-layer residual path of width 32 and
            an Eq. 10 projection of width H / 8, beyond the paper),
            ``fw`` / ``tes`` (transfer-weight ablations), or the baselines' fine-tuning
            forms ``shared_bottom*``, ``mmoe*``, ``ple*``: one of the ``new_task_methods`` a
            model class of ``mptrec.models.MODELS`` declares (and registration checks it is one
            of the base model's).
        exclude_features: features that must not be inputs for this task (spec section 6);
            registration checks the base model does not use them.
        tower_hidden: new tower sizes (None: the base model's towers).
        lr: Adam learning rate of the new parameters.
        epochs: maximum epochs.
        patience: stop after this many consecutive epochs without a better validation AUC of
            the new task (0: never; the best epoch's head is kept).
        batch_size: rows per batch (None: the base run's).
        seed: seed of the new parameters and shuffling.
        max_steps: stop after this many steps (0: no limit).
        r_dnn: L2 weight on the new tower's weight matrices (Eq. 15; None: the base run's).
        offset_max_rows: ``mptrec_emb`` / ``mptrec_mlp`` only: > 0 gives the new task offsets of
            the single-valued features whose table has at most this many rows, and none for
            bigger tables (their frozen rows are read as they are); 0: every single-valued
            feature.
        feature_cache_mib: the frozen backbone's features of the train and validation rows are
            computed once and kept in memory (exactly what every epoch would recompute) when they
            fit in this many MiB per process; 0: recompute them every epoch.

    Example:
        >>> run = load_config("configs/debug.toml")
        >>> spec = NewTaskSpec(name="t3", label="c", batch_size=0, r_dnn=-1.0)  # earlier "inherit"
        >>> spec.batch_size, spec.r_dnn, spec.resolve(run).batch_size == run.data.batch_size
        (None, None, True)
    """

    name: str
    label: str
    positive_values: tuple[int, ...] = ()
    description: str = ""
    method: str = "mptrec"
    exclude_features: tuple[str, ...] = ()
    tower_hidden: tuple[int, ...] | None = None
    lr: float = 1e-3
    epochs: int = 10
    patience: int = 5
    batch_size: int | None = None
    seed: int = 2024
    max_steps: int = 0
    r_dnn: float | None = None
    offset_max_rows: int = 0
    feature_cache_mib: int = 4096

    def __post_init__(self) -> None:
        TaskSpec(name=self.name, label=self.label)  # same name rules
        if self.method not in all_new_task_methods():
            raise ValueError(f"method {self.method!r} is not a new-task method of any model; "
                             f"known: {', '.join(all_new_task_methods())}")
        for key, legacy in (("tower_hidden", self.tower_hidden == ()), ("batch_size", self.batch_size == 0),
                            ("r_dnn", self.r_dnn is not None and self.r_dnn < 0)):
            if legacy:  # the earlier spelling of "inherit"
                object.__setattr__(self, key, None)
        require_positive(self, "lr", "epochs", *(["batch_size"] if self.batch_size is not None else []))
        require_non_negative(self, "patience", "max_steps", "offset_max_rows", "feature_cache_mib")

    def task_spec(self) -> TaskSpec:
        """The task as a :class:`TaskSpec`."""
        return TaskSpec(name=self.name, label=self.label, positive_values=self.positive_values)

    def resolve(self, run_cfg: RunConfig) -> NewTaskSettings:
        """The inherited settings: each ``None`` replaced by the base run's value."""
        return NewTaskSettings(
            tower_hidden=run_cfg.model.tower_hidden if self.tower_hidden is None else self.tower_hidden,
            batch_size=run_cfg.data.batch_size if self.batch_size is None else self.batch_size,
            r_dnn=run_cfg.model.r_dnn if self.r_dnn is None else self.r_dnn,
        )


def load_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> RunConfig:
    """Load a run config strictly, after applying ``--set`` overrides."""
    data = apply_overrides(read_toml(path), overrides, str(path))
    return from_dict(RunConfig, data, source=str(path))


def load_task_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> NewTaskSpec:
    """Load a new-task config (``configs/tasks/*.toml``) strictly."""
    data = apply_overrides(read_toml(path), overrides, str(path))
    return from_dict(NewTaskSpec, data, source=str(path))


def write_resolved(cfg: Any, path: str | os.PathLike[str]) -> None:
    """Write the resolved config as JSON, atomically (temporary file, then rename)."""
    atomic_write_json(path, to_dict(cfg), indent=2, sort_keys=False)
