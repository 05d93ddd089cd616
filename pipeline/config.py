"""Strict TOML configuration: frozen dataclasses, typed, with errors that name file, key and value.

A run config (``configs/*.toml``) loads into :class:`RunConfig`; a new-task config
(``configs/tasks/*.toml``) loads into :class:`PromptTuneConfig`. Loading is strict: an unknown
key, a wrong type or an impossible value raises :class:`ConfigError` naming the file, the dotted
key and the value. ``--set a.b=c`` overrides are applied before validation, with TOML syntax for
the value (``--set train.lr=0.01``, ``--set model.expert_hidden=[64,32]``, bare words are
strings).

Example:
    >>> cfg = load_config("configs/debug.toml", overrides=["train.epochs=2"])
    >>> cfg.train.epochs
    2
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from mptrec.data_loaders.schema import FeatureSpec, LabelSpec, OovPolicy
from mptrec.io import atomic_write_json
from mptrec.models.config import ModelConfig

__all__ = [
    "ConfigError",
    "DataConfig",
    "FeatureOverride",
    "FeatureSpec",
    "FeaturesConfig",
    "ModelConfig",
    "PromptTuneConfig",
    "RunConfig",
    "ShardingConfig",
    "TableConstraint",
    "TaskSpec",
    "TrainConfig",
    "apply_overrides",
    "from_dict",
    "load_config",
    "load_task_config",
    "to_dict",
    "write_resolved",
]


class ConfigError(ValueError):
    """A configuration problem; the message names the file, the dotted key and the value."""


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
        _positive(self, "batch_size")
        _non_negative(self, "num_workers", "shuffle_buffer", "max_rows")


@dataclass(frozen=True)
class FeatureOverride:
    """Per-feature override of the defaults in ``[features]``."""

    name: str
    embedding_dim: int = 0
    num_embeddings: int = 0

    def __post_init__(self) -> None:
        _non_negative(self, "embedding_dim", "num_embeddings")


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
        _positive(self, "embedding_dim")
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
        _non_negative(self, "weight")

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
            fp32). See :func:`mptrec.pipeline.loop.bf16_autocast`.
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
        _positive(self, "epochs", "lr", "embedding_lr", "log_every", "embedding_init_std")
        _non_negative(self, "patience", "max_steps", "checkpoint_every",
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
        out_dir: where checkpoints, logs, the task registry and the resolved config go.
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


PromptMethod = Literal[
    "mptrec", "mptrec_res", "fw", "tes", "shared_bottom*", "mmoe*", "ple*", "single_task"
]


@dataclass(frozen=True)
class PromptTuneConfig:
    """A new business task, declared in ``configs/tasks/<name>.toml`` and trained in stage 2.

    Args:
        name: task name (lower_snake, not taken by the base run).
        label: label column in the shards.
        positive_values: raw values meaning 1 (empty: the column is 0/1).
        description: free text kept in the registry.
        method: ``mptrec`` (prompt tuning, spec 3.3), ``mptrec_res`` (``mptrec`` plus a rank-8
            linear residual path from ``e`` into the new tower's input, beyond the paper),
            ``fw`` / ``tes`` (transfer-weight ablations), or the baselines' fine-tuning
            forms ``shared_bottom*``, ``mmoe*``, ``ple*`` (must match the base model).
        exclude_features: features that must not be inputs for this task (spec section 6);
            registration checks the base model does not use them.
        tower_hidden: new tower sizes (empty: same as the base model's towers).
        lr: Adam learning rate of the new parameters.
        epochs: maximum epochs.
        patience: early-stopping patience on the new task's validation AUC.
        batch_size: rows per batch (0: the base run's).
        seed: seed of the new parameters and shuffling.
        max_steps: stop after this many steps (0: no limit).
        r_dnn: L2 weight on the new tower's weight matrices (Eq. 15; negative: the base run's).
        feature_cache_mib: the frozen backbone's features of the train and validation rows are
            computed once and kept in memory (exactly what every epoch would recompute) when they
            fit in this many MiB per process; 0: recompute them every epoch.
    """

    name: str
    label: str
    positive_values: tuple[int, ...] = ()
    description: str = ""
    method: PromptMethod = "mptrec"
    exclude_features: tuple[str, ...] = ()
    tower_hidden: tuple[int, ...] = ()
    lr: float = 1e-3
    epochs: int = 10
    patience: int = 5
    batch_size: int = 0
    seed: int = 2024
    max_steps: int = 0
    r_dnn: float = -1.0
    feature_cache_mib: int = 4096

    def __post_init__(self) -> None:
        TaskSpec(name=self.name, label=self.label)  # same name rules
        _positive(self, "lr", "epochs")
        _non_negative(self, "patience", "batch_size", "max_steps", "feature_cache_mib")

    def task_spec(self) -> TaskSpec:
        """The task as a :class:`TaskSpec`."""
        return TaskSpec(name=self.name, label=self.label, positive_values=self.positive_values)


# --------------------------------------------------------------------------------------------
# Generic strict conversion
# --------------------------------------------------------------------------------------------

T = TypeVar("T")


def _positive(obj: object, *keys: str) -> None:
    for k in keys:
        v = getattr(obj, k)
        if v <= 0:
            raise ValueError(f"{k} must be > 0, got {v!r}")


def _non_negative(obj: object, *keys: str) -> None:
    for k in keys:
        v = getattr(obj, k)
        if v < 0:
            raise ValueError(f"{k} must be >= 0, got {v!r}")


def _where(source: str, key: str) -> str:
    return f"{source}: {key}" if key else source


def _convert(tp: Any, value: Any, key: str, source: str) -> Any:
    """Convert ``value`` to type ``tp`` or raise a ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in args:
            raise ConfigError(
                f"{_where(source, key)} = {value!r} is not one of {', '.join(map(repr, args))}"
            )
        return value
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if value is None and len(non_none) < len(args):
            return None
        errors = []
        for a in non_none:
            try:
                return _convert(a, value, key, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{_where(source, key)}: {errors}")
    if origin is tuple:
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            raise ConfigError(f"{_where(source, key)} = {value!r} must be a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{key}[{i}]", source) for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{_where(source, key)} = {value!r} must have {len(args)} items")
        return tuple(_convert(a, v, f"{key}[{i}]", source) for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{_where(source, key)} = {value!r} must be a table")
        return {
            _convert(args[0], k, f"{key}.{k}", source): _convert(args[1], v, f"{key}.{k}", source)
            for k, v in value.items()
        }
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source=source, prefix=key)  # type: ignore[arg-type]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{_where(source, key)} = {value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{_where(source, key)} = {value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{_where(source, key)} = {value!r} must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{_where(source, key)} = {value!r} must be a string")
        return value
    raise ConfigError(f"{_where(source, key)}: unsupported config type {tp!r}")


def from_dict(cls: type[T], data: Any, *, source: str = "<config>", prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, strictly.

    Args:
        cls: a (frozen) dataclass type.
        data: the mapping (from TOML or JSON).
        source: file name used in error messages.
        prefix: dotted key of ``data`` within the file, used in error messages.

    Returns:
        The dataclass instance.

    Raises:
        ConfigError: unknown key, missing key, wrong type or invalid value; the message names
            ``source``, the dotted key and the value.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{_where(source, prefix)} = {data!r} must be a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    dotted = (prefix + ".") if prefix else ""
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        raise ConfigError(
            f"{source}: unknown key '{dotted}{k}' (value {data[k]!r}); "
            f"allowed keys here: {', '.join(sorted(fields))}"
        )
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], dotted + name, source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing required key '{dotted}{name}'")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        where = f"'{prefix}'" if prefix else "the top level"
        raise ConfigError(f"{source}: invalid value in {where}: {e}") from e


def to_dict(obj: Any) -> Any:
    """Plain JSON/TOML-able view of a config dataclass (tuples become lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _parse_override_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word is a string


def apply_overrides(data: dict[str, Any], overrides: Sequence[str], source: str) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides to a nested mapping (in place) and return it."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=0.01")
        key, _, raw = item.partition("=")
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set {item!r}: empty component in key {key!r}")
        node = data
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: '{p}' in {source} is not a table")
            node = child
        node[parts[-1]] = _parse_override_value(raw.strip())
    return data


def _read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        raw = p.read_bytes()
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: not UTF-8 text ({e})") from e
    except tomllib.TOMLDecodeError as e:
        duplicate = _duplicate_key(raw.decode("utf-8"), str(e))
        if duplicate:
            raise ConfigError(f"{p}: not valid TOML: {duplicate}") from e
        raise ConfigError(f"{p}: not valid TOML: {e}") from e


_TOML_AT = re.compile(r"\(at line (\d+), column \d+\)|\(at end of document\)")
_TOML_DECLARED = re.compile(r"^Cannot declare \((.*)\) twice \(at line (\d+), column \d+\)")
_TOML_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")


def _duplicate_key(text: str, message: str) -> str:
    """Name the key of a repeated-key error, which tomllib gives by line only ("" for other errors)."""
    declared = _TOML_DECLARED.match(message)
    if declared is not None:
        name = ".".join(part.strip().strip("'\"") for part in declared.group(1).split(",") if part.strip())
        return f"line {declared.group(2)}: table [{name}] is declared twice (TOML forbids it; merge them)"
    if not message.startswith("Cannot overwrite a value"):
        return ""
    m = _TOML_AT.search(message)
    lines = text.splitlines()
    if m is None or not lines:
        return ""
    lineno = int(m.group(1)) if m.group(1) else len(lines)
    while lineno > 1 and not lines[lineno - 1].strip():
        lineno -= 1
    line = lines[lineno - 1] if lineno <= len(lines) else ""
    key, sep, _ = line.partition("=")
    key = ".".join(part.strip().strip("\"'") for part in key.strip().split("."))
    if not sep or not key:
        header = _TOML_HEADER.match(line)
        if header is None:
            return ""
        return (f"line {lineno}: table [{header.group(1)}] conflicts with a key of the same name "
                "defined before")
    table = ""
    for prev in reversed(lines[: lineno - 1]):
        header = _TOML_HEADER.match(prev)
        if header is not None:
            table = header.group(1).strip() + "."
            break
    return (f"line {lineno}: key {table + key!r} is defined twice (TOML forbids repeating a key; "
            f"keep one)")


def load_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> RunConfig:
    """Load a run config strictly, after applying ``--set`` overrides."""
    data = apply_overrides(_read_toml(path), overrides, str(path))
    return from_dict(RunConfig, data, source=str(path))


def load_task_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> PromptTuneConfig:
    """Load a new-task config (``configs/tasks/*.toml``) strictly."""
    data = apply_overrides(_read_toml(path), overrides, str(path))
    return from_dict(PromptTuneConfig, data, source=str(path))


def write_resolved(cfg: Any, path: str | os.PathLike[str]) -> None:
    """Write the resolved config as JSON, atomically (temporary file, then rename)."""
    atomic_write_json(path, to_dict(cfg), indent=2, sort_keys=False)
