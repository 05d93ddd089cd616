"""All of the distribution of a model in one place: planner, sharders, DMP, optimizers in backward.

This is the only module of the project that imports ``torchrec.distributed`` (besides the train
pipeline, ``TrainPipelineSparseDist``, in :mod:`mptrec.pipeline.train.loop`). It turns a
single-device module holding ``EmbeddingBagCollection`` s (built on the meta device by
:mod:`mptrec.pipeline.build`) into a ``DistributedModelParallel`` and builds its optimizers:

- **Sharding types.** On CPU (gloo) TorchRec offers only ``table_wise`` and ``column_wise``
  (fused kernel) and ``data_parallel`` (dense kernel); row-wise and the hybrids are CUDA-only
  (``../shared/stack.md``). Default on CPU: ``table_wise`` + ``column_wise``; on CUDA the planner
  chooses among all of them. ``[sharding]`` in the run config narrows the choice for every
  table or per table (:class:`mptrec.pipeline.config.ShardingConfig`).
- **Embedding width.** The fused kernel needs a width that is a multiple of 4; a table that
  may be served by it with another width is an error naming the feature, raised before
  planning.
- **Embedding optimizer** (``train.embedding_optimizer``), fused into backward: row-wise
  Adagrad, Adagrad or SGD on CPU; Adam only on CUDA (FBGEMM's CPU kernel has none).
- **Dense optimizer**: Adam (``train.lr``) over every parameter that has no in-backward
  optimizer, as a ``KeyedOptimizerWrapper``, combined with ``dmp.fused_optimizer`` in one
  ``CombinedOptimizer`` (the object the train pipeline steps and the checkpoint saves).
  ``data_parallel`` tables (dense kernel, replicated, gradients all-reduced by TorchRec) get
  the embedding optimizer as a third, non-fused ``KeyedOptimizerWrapper`` (``dp_tables``).
- **Table initialisation.** DMP initialises each local shard with the table's ``init_fn`` on
  the process's global RNG, so the values depend on the plan and the world size. After
  sharding, :func:`mptrec.pipeline.table_init.init_embedding_tables` overwrites every table
  with plan-independent values.

Example (one process; see ``tests/pipeline/test_sharding.py``)::

    sharded = shard_model(wrapper, features, cfg.sharding, cfg.train, torch.device("cpu"))
    loss, _ = sharded.dmp(batch)
    loss.backward()
    sharded.optimizer.step()
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torchrec.optim as trec_optim
from torch import nn
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.comm import get_local_size
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DataParallelWrapper, DefaultDataParallelWrapper
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.types import (
    KernelConfig,
    ParameterConstraints,
    PlannerError,
    TopologyFactory,
    TrainerConfig,
)
from torchrec.distributed.types import ModuleSharder, ShardingEnv, ShardingPlan
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from mptrec.data_loaders.schema import FeatureSpec
from mptrec.models.base import MultiTaskModel
from mptrec.pipeline.build import TABLE_KEY, table_name
from mptrec.pipeline.config import ShardingConfig, TrainConfig
from mptrec.pipeline.table_init import init_embedding_tables

__all__ = [
    "CPU_SHARDING_TYPES",
    "EMBEDDING_OPTIMIZERS",
    "ShardedModel",
    "ShardingError",
    "allowed_sharding_types",
    "all_data_parallel",
    "check_embedding_widths",
    "dense_adam",
    "embedding_optimizer",
    "l2_weight_decay",
    "plan_sharding",
    "plan_to_text",
    "shard_model",
    "unwrap_dmp",
]

CPU_SHARDING_TYPES = ("table_wise", "column_wise", "data_parallel")
DEFAULT_CPU_SHARDING_TYPES = ("table_wise", "column_wise")
EMBEDDING_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "rowwise_adagrad": trec_optim.RowWiseAdagrad,
    "adagrad": torch.optim.Adagrad,
    "sgd": torch.optim.SGD,
    "adam": trec_optim.Adam,
}
_CUDA_ONLY_OPTIMIZERS = ("adam",)


class _DropCachingNotice(logging.Filter):
    """Drops TorchRec's per-table "caching params will be ignored" notice for data_parallel tables.

    We set no caching params, so the notice (29 lines on Census) tells a user nothing.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "caching params will be ignored" not in record.getMessage()


logging.getLogger("torchrec.distributed.utils").addFilter(_DropCachingNotice())


class ShardingError(ValueError):
    """The tables cannot be sharded as configured; the message names the feature or the setting."""


@dataclass
class ShardedModel:
    """A sharded module and its optimizers.

    Attributes:
        dmp: the ``DistributedModelParallel``; ``unwrap_dmp(dmp)`` is the original module with
            its embedding collections replaced by sharded ones.
        optimizer: dense Adam + fused embedding optimizer (``CombinedOptimizer``); ``None``
            when sharded without a ``TrainConfig`` (frozen / inference use).
        dense_optimizer: the dense part alone (``KeyedOptimizerWrapper``) or ``None``.
        plan: the sharding plan.
        plan_text: the plan as printed and saved (``RUN/plan.txt``).
    """

    dmp: DistributedModelParallel
    optimizer: CombinedOptimizer | None
    dense_optimizer: KeyedOptimizerWrapper | None
    plan: ShardingPlan
    plan_text: str


class SingleRankDataParallelWrapper(DataParallelWrapper):
    """TorchRec's default DDP wrapping of the dense part, skipped when there is one rank.

    With one process DDP has nothing to average, yet every step pays for its forward hooks and
    its gradient buckets (measured: ``DistributedDataParallel.forward`` alone was 2.2 ms of a
    30 ms step at the paper's dims). Checkpoint keys do not change: DMP's state dict never
    shows DDP's ``module.`` prefix, so checkpoints move between world sizes as before.
    """

    def __init__(self) -> None:
        self._default = DefaultDataParallelWrapper()

    def wrap(self, dmp: DistributedModelParallel, env: ShardingEnv, device: torch.device) -> None:
        """Wrap in DDP when ``env.world_size > 1``; else only move the dense part to ``device``."""
        if env.world_size > 1:
            self._default.wrap(dmp, env, device)
        else:
            dmp._dmp_wrapped_module = dmp._dmp_wrapped_module.to(device)


def unwrap_dmp(dmp: nn.Module) -> nn.Module:
    """The module wrapped by DMP (without DDP), whose state-dict keys the checkpoints use."""
    if isinstance(dmp, DistributedModelParallel):
        return dmp.module
    return dmp


def allowed_sharding_types(feature: str, sharding_cfg: ShardingConfig, device_type: str) -> list[str] | None:
    """Sharding types the planner may use for one feature's table.

    Args:
        feature: sparse feature name.
        sharding_cfg: the run's ``[sharding]`` table.
        device_type: ``"cpu"`` or ``"cuda"``.

    Returns:
        The list of sharding types, or ``None`` for "any" (CUDA without constraints).

    Raises:
        ShardingError: a CUDA-only sharding type is asked for on CPU (naming the feature).
    """
    types: tuple[str, ...] = sharding_cfg.sharding_types
    for c in sharding_cfg.constraints:
        if c.feature == feature:
            types = c.sharding_types
    if not types:
        return list(DEFAULT_CPU_SHARDING_TYPES) if device_type == "cpu" else None
    if device_type == "cpu":
        bad = [t for t in types if t not in CPU_SHARDING_TYPES]
        if bad:
            raise ShardingError(
                f"feature {feature!r}: sharding type(s) {bad} need CUDA; on CPU TorchRec offers only "
                f"{list(CPU_SHARDING_TYPES)} (set sharding.sharding_types / sharding.constraints)"
            )
    return list(types)


def _check_constraint_features(features: Sequence[FeatureSpec], sharding_cfg: ShardingConfig) -> None:
    sparse = {f.name for f in features if f.kind == "sparse"}
    unknown = [c.feature for c in sharding_cfg.constraints if c.feature not in sparse]
    if unknown:
        raise ShardingError(
            f"sharding.constraints name feature(s) {unknown} that are not sparse model inputs; "
            f"sparse features: {sorted(sparse)}"
        )


def _uses_fused_kernel(types: list[str] | None) -> bool:
    return types is None or any(t != "data_parallel" for t in types)


def check_embedding_widths(
    features: Sequence[FeatureSpec], sharding_cfg: ShardingConfig, device_type: str
) -> None:
    """Refuse widths the fused kernel cannot serve, naming the feature (before any planning).

    Raises:
        ShardingError: a table that may use the fused kernel has a width not divisible by 4.
    """
    for f in features:
        if f.kind != "sparse":
            continue
        types = allowed_sharding_types(f.name, sharding_cfg, device_type)
        if _uses_fused_kernel(types) and f.embedding_dim % 4 != 0:
            raise ShardingError(
                f"feature {f.name!r} has embedding_dim {f.embedding_dim}, but the fused TorchRec/FBGEMM "
                "embedding kernel needs a multiple of 4 (e.g. the paper's Ali-CCP width 5 -> 4 or 8): "
                "set features.embedding_dim (or a [[features.overrides]] entry), or constrain this "
                "table to data_parallel (dense kernel) with [[sharding.constraints]]"
            )


def embedding_optimizer(
    train_cfg: TrainConfig, device_type: str, *, dense_tables: bool = False, r_emb: float = 0.0
) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """The embedding optimizer class and its keyword arguments.

    Args:
        train_cfg: ``embedding_optimizer`` and ``embedding_lr``.
        device_type: ``cpu`` or ``cuda``.
        dense_tables: for ``data_parallel`` tables (dense kernel, plain replicated parameters
            with whole-table gradients): a plain torch optimizer, so ``adam`` works on CPU too,
            and ``r_emb`` becomes its (coupled) ``weight_decay``, which is exactly the gradient
            of the spec's whole-table term ``r_emb * sum_j ||E_j||^2 / 2``.
        r_emb: whole-table L2 weight (``dense_tables`` only).

    Raises:
        ShardingError: ``adam`` for fused tables on CPU (FBGEMM's CPU kernel has no fused Adam).
    """
    name = train_cfg.embedding_optimizer
    if name in _CUDA_ONLY_OPTIMIZERS and device_type != "cuda" and not dense_tables:
        raise ShardingError(
            f"train.embedding_optimizer = {name!r} needs CUDA: the fused CPU kernel offers only "
            "rowwise_adagrad, adagrad and sgd (or make every table data_parallel: "
            "sharding.sharding_types = [\"data_parallel\"])"
        )
    if not dense_tables:
        return EMBEDDING_OPTIMIZERS[name], {"lr": train_cfg.embedding_lr}
    if name == "adam":
        return torch.optim.Adam, {"lr": train_cfg.embedding_lr, "weight_decay": r_emb, "fused": True}
    return EMBEDDING_OPTIMIZERS[name], {"lr": train_cfg.embedding_lr, "weight_decay": r_emb}


def all_data_parallel(features: Sequence[FeatureSpec], sharding_cfg: ShardingConfig,
                      device_type: str) -> bool:
    """Whether every sparse feature's table is constrained to ``data_parallel`` (dense kernel)."""
    return all(allowed_sharding_types(f.name, sharding_cfg, device_type) == ["data_parallel"]
               for f in features if f.kind == "sparse")


def _collections(module: nn.Module) -> list[tuple[str, EmbeddingBagCollection]]:
    found = [(n, m) for n, m in module.named_modules() if isinstance(m, EmbeddingBagCollection)]
    if not found:
        raise ShardingError(f"{type(module).__name__} holds no EmbeddingBagCollection to shard")
    return found


def _constraints(
    features: Sequence[FeatureSpec], sharding_cfg: ShardingConfig, device_type: str
) -> dict[str, ParameterConstraints]:
    out: dict[str, ParameterConstraints] = {}
    for f in features:
        if f.kind != "sparse":
            continue
        types = allowed_sharding_types(f.name, sharding_cfg, device_type)
        if types is None:
            continue
        kernels = ["dense"] if types == ["data_parallel"] else ["fused", "dense"]
        out[table_name(f.name)] = ParameterConstraints(
            sharding_types=types,
            compute_kernels=kernels if device_type == "cpu" else None,
            pooling_factors=[2.0 if f.multivalent else 1.0],
        )
    return out


def plan_sharding(
    module: nn.Module,
    features: Sequence[FeatureSpec],
    sharding_cfg: ShardingConfig,
    device: torch.device,
    pg: dist.ProcessGroup,
    *,
    batch_size: int = 512,
    sharders: Sequence[ModuleSharder[nn.Module]] | None = None,
) -> ShardingPlan:
    """Plan the sharding of every ``EmbeddingBagCollection`` in ``module`` (collective).

    Raises:
        ShardingError: bad widths or types (before planning), or a plan the planner cannot
            produce for this world size (the message names the world size and the device).
    """
    _check_constraint_features(features, sharding_cfg)
    check_embedding_widths(features, sharding_cfg, device.type)
    world_size = dist.get_world_size(pg)
    local = get_local_size(world_size)
    topology = TopologyFactory.create_topology(
        trainer_config=TrainerConfig(world_size=world_size,
                                     local_world_size=local if world_size % local == 0 else world_size),
        kernel_config=KernelConfig(compute_device=device.type),
    )
    planner = EmbeddingShardingPlanner(
        topology=topology, batch_size=batch_size,
        constraints=_constraints(features, sharding_cfg, device.type),
    )
    # Like planner.collective_plan (plan on rank 0, broadcast), but a planner error reaches
    # every rank as a ShardingError instead of leaving the other ranks in the broadcast.
    outcome: list[Any] = [None]
    if dist.get_rank(pg) == 0:
        try:
            outcome = [("ok", planner.plan(module, list(sharders or [EmbeddingBagCollectionSharder()])))]
        except PlannerError as e:
            outcome = [("error", str(e))]
    dist.broadcast_object_list(outcome, group=pg, group_src=0)
    status, value = outcome[0]
    if status == "error":
        raise ShardingError(
            f"the sharding planner cannot serve world size {world_size} on {device.type} with "
            f"{sum(f.kind == 'sparse' for f in features)} tables: {value}"
        )
    plan: ShardingPlan = value
    return plan


def plan_to_text(plan: ShardingPlan) -> str:
    """The plan as a human-readable table (printed on rank 0, saved as ``plan.txt``)."""
    return str(plan).strip() + "\n"


def l2_weight_decay(module: nn.Module) -> dict[int, float]:
    """``id(param) -> r_dnn`` for the L2 weights of every model in ``module`` with ``r_dnn > 0``.

    Marks those models ``l2_by_optimizer``: give the returned decay to the optimizer
    (:func:`dense_adam`), which then adds ``r_dnn * W`` to each such gradient, the gradient of
    the loss's ``r_dnn * ||W||^2 / 2`` (spec Eq. 9), and :meth:`MultiTaskModel.loss` adds only
    the term's value. Same update, to float rounding, with about 10 fewer autograd ops per
    weight matrix and step.
    """
    decay: dict[int, float] = {}
    for m in module.modules():
        if isinstance(m, MultiTaskModel) and m.r_dnn > 0:
            decay.update((id(p), m.r_dnn) for p in m.l2_parameters())
            m.l2_by_optimizer = True
    return decay


def dense_adam(params: Sequence[torch.Tensor], lr: float,
               decay: Mapping[int, float] | None = None) -> torch.optim.Adam:
    """Fused Adam over ``params``; a parameter whose ``id`` is in ``decay`` gets that weight decay.

    ``torch.optim.Adam``'s weight decay is coupled: it adds ``wd * p`` to the gradient before the
    moments, exactly the gradient of ``wd * ||p||^2 / 2`` in the loss.

    Example:
        >>> w, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
        >>> [g["weight_decay"] for g in dense_adam([w, b], 1e-3, {id(w): 0.5}).param_groups]
        [0.5, 0.0]
    """
    groups: dict[float, list[torch.Tensor]] = {}
    for p in params:
        groups.setdefault(float((decay or {}).get(id(p), 0.0)), []).append(p)
    return torch.optim.Adam([{"params": ps, "weight_decay": wd} for wd, ps in groups.items()], lr=lr,
                            fused=True)


def shard_model(
    module: nn.Module,
    features: Sequence[FeatureSpec],
    sharding_cfg: ShardingConfig,
    train_cfg: TrainConfig | None,
    device: torch.device,
    pg: dist.ProcessGroup | None = None,
    *,
    seed: int | None = None,
    batch_size: int = 512,
    r_emb: float = 0.0,
) -> ShardedModel:
    """Shard ``module``'s embedding collections with DMP and build its optimizers (collective).

    Args:
        module: a module holding one or more ``EmbeddingBagCollection`` built on the meta device
            (tables named ``t_<feature>``), e.g. a :class:`~mptrec.pipeline.train.wrapper.TrainWrapper`.
        features: the model's features (widths, names).
        sharding_cfg: allowed sharding types.
        train_cfg: embedding optimizer, learning rates and seed; ``None`` shards without any
            optimizer (no optimizer in backward, no dense optimizer: a frozen or inference model).
        device: compute device (CPU or ``cuda:LOCAL_RANK``).
        pg: process group (default: the world; it must be initialised, also for one process).
        seed: seed of the table initialisation (default ``train_cfg.seed``, else 0).
        batch_size: per-rank batch size, for the planner's cost estimates.
        r_emb: whole-table L2 weight; only tables that are all ``data_parallel`` can take it
            (as the weight decay of their plain optimizer, see :func:`embedding_optimizer`).

    Returns:
        The :class:`ShardedModel`.

    Raises:
        ShardingError: ``r_emb > 0`` while some table may be served by a fused kernel.
    """
    group = pg if pg is not None else dist.GroupMember.WORLD
    if group is None or not dist.is_initialized():
        raise RuntimeError("shard_model needs an initialised process group (launch.dist.init_distributed)")
    collections = _collections(module)
    all_dp = all_data_parallel(features, sharding_cfg, device.type)
    if r_emb > 0 and not all_dp:
        raise ShardingError(
            f"model.r_emb = {r_emb}: the whole-table L2 term needs every table data_parallel (dense "
            "kernel, whole-table gradients); a fused kernel updates only the looked-up rows. Set "
            "sharding.sharding_types = [\"data_parallel\"] (small vocabularies) or model.r_emb = 0"
        )
    if train_cfg is not None and not all_dp:
        opt_cls, opt_kwargs = embedding_optimizer(train_cfg, device.type)
        for _, ebc in collections:
            apply_optimizer_in_backward(opt_cls, ebc.parameters(), opt_kwargs)
    sharders: list[ModuleSharder[nn.Module]] = [EmbeddingBagCollectionSharder()]  # type: ignore[list-item]
    plan = plan_sharding(module, features, sharding_cfg, device, group, batch_size=batch_size,
                         sharders=sharders)
    dmp = DistributedModelParallel(module, env=ShardingEnv.from_process_group(group), device=device,
                                   plan=plan, sharders=sharders,
                                   data_parallel_wrapper=SingleRankDataParallelWrapper())
    init_embedding_tables(dmp, features, seed if seed is not None else (train_cfg.seed if train_cfg else 0),
                          std=train_cfg.embedding_init_std if train_cfg else 1.0)
    optimizer: CombinedOptimizer | None = None
    dense: KeyedOptimizerWrapper | None = None
    if train_cfg is not None:
        lr = train_cfg.lr
        plain = dict(in_backward_optimizer_filter(dmp.named_parameters()))
        # data_parallel tables (dense kernel) are plain replicated parameters that DMP leaves to
        # the caller's optimizer: give them the embedding optimizer, not the dense Adam
        dp_tables = {k: v for k, v in plain.items() if TABLE_KEY.search(k)}
        dense_params = {k: v for k, v in plain.items() if k not in dp_tables}
        # fused Adam: one kernel for every parameter (foreach Adam's update rule, to float rounding);
        # the models' dense L2 (r_dnn) as its coupled weight decay, not through autograd
        decay = l2_weight_decay(module)
        dense = KeyedOptimizerWrapper(dense_params, lambda ps: dense_adam(ps, lr, decay))
        parts: list[Any] = [("embeddings", dmp.fused_optimizer), ("dense", dense)]
        if dp_tables:
            dp_cls, dp_kwargs = embedding_optimizer(train_cfg, device.type, dense_tables=True, r_emb=r_emb)
            dp_opt = KeyedOptimizerWrapper(dp_tables, lambda ps: dp_cls(ps, **dp_kwargs))
            parts.append(("dp_tables", dp_opt))
        optimizer = CombinedOptimizer(parts)
    return ShardedModel(dmp=dmp, optimizer=optimizer, dense_optimizer=dense, plan=plan,
                        plan_text=plan_to_text(plan))
