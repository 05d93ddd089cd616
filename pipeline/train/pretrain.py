"""Stage 1, ``pretrain(cfg)``: check inputs, build, shard, (resume,) train, checkpoint.

Everything that can be wrong with the inputs is checked before the run folder is created: the
shards' schema (``schema.json``), every configured feature and label column (``ConfigError`` /
``DataError`` naming them), the shards' columns and types (``ShardDataset``), their values
(``mptrec.data_loaders.validate``: statistics of every row group, and the rows of every row
group of a split up to 2M rows, else of the first row group of each shard), the embedding
widths and sharding types (``ShardingError``), the plan for this world size, and on resume the
checkpoint's model identity (``CheckpointError`` naming both models). A run that fails
before its first checkpoint removes what it wrote (the run folder, when it created it);
once a checkpoint exists, everything stays for ``--resume``.

Run folder (``cfg.out_dir``)::

    config.json      the resolved config (rank 0)
    plan.txt         the sharding plan (also printed at start and saved with each checkpoint)
    metrics.jsonl    see mptrec.pipeline.train.metrics_log
    checkpoints/     step-NNNNNN/ (DCP + meta.json), best -> step-NNNNNN
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mptrec.data_loaders.batch import Batch
from mptrec.data_loaders.dataset import ShardDataset, make_dataloader
from mptrec.data_loaders.layout import read_schema, verify_shard_files
from mptrec.data_loaders.schema import DataError, FeatureSpec
from mptrec.data_loaders.validate import validate_dataset
from mptrec.logs import get_logger
from mptrec.models.base import MultiTaskModel
from mptrec.pipeline.build import build_from_config, make_dataset, resolve_run_features
from mptrec.pipeline.checkpoint import TrainState, backbone_state_dict, load_checkpoint
from mptrec.pipeline.checkpoint_files import (
    CheckpointError,
    check_resume_config,
    checkpoint_meta,
    find_checkpoints,
    latest_complete_checkpoint,
)
from mptrec.pipeline.config import RunConfig, write_resolved
from mptrec.pipeline.sharding import ShardedModel, shard_model
from mptrec.pipeline.strict import to_dict
from mptrec.pipeline.train.em import EMLabelStore
from mptrec.pipeline.train.loop import TrainContext, Trainer, TrainResult
from mptrec.pipeline.train.metrics_log import MetricsLogger
from mptrec.pipeline.train.wrapper import TrainWrapper

__all__ = ["ShardData", "check_data", "count_batches", "pretrain", "shard_for_training"]

log = get_logger(__name__)


def count_batches(ds: ShardDataset, epoch: int, num_workers: int) -> int:
    """Batches ``ds`` yields on this rank in ``epoch`` (an upper bound under ``on_error="skip"``).

    Row groups skipped under ``on_error="skip"`` make this an over-estimate; the training loop's
    per-step guard ends the epoch on every rank then.
    """
    return ds.num_batches(num_workers, epoch)


class ShardData:
    """The run's data on this rank, as the loop's :class:`~mptrec.pipeline.train.loop.DataSource`.

    Iterators are created under ``torch.random.fork_rng``: a DataLoader draws a worker base seed
    from the global RNG, which would otherwise shift the dropout stream of a resumed run.
    """

    def __init__(self, cfg: RunConfig, features: list[FeatureSpec], rank: int, world_size: int,
                 device: torch.device) -> None:
        d = cfg.data
        labels = [t.label_spec() for t in cfg.tasks]

        def dataset(split: str, shuffle: bool) -> ShardDataset:
            return make_dataset(d, split, features, labels, rank=rank, world_size=world_size, shuffle=shuffle,
                                seed=cfg.train.seed)

        self.num_workers = d.num_workers
        self.pin_memory = device.type == "cuda"
        self.train_ds = dataset(d.train_split, True)
        self.ordered_ds = dataset(d.train_split, False)
        self.valid_ds = dataset(d.valid_split, False) if d.valid_split else None

    def _iterate(self, ds: ShardDataset) -> Iterator[Batch]:
        with torch.random.fork_rng(devices=[]):
            if self.num_workers == 0:
                return iter(ds)
            return iter(make_dataloader(ds, self.num_workers, pin_memory=self.pin_memory))

    def train(self, epoch: int) -> Iterable[Batch]:
        """Training batches of ``epoch``."""
        self.train_ds.set_epoch(epoch)
        return self._iterate(self.train_ds)

    def num_train_batches(self, epoch: int) -> int:
        """Batches of :meth:`train` on this rank."""
        return count_batches(self.train_ds, epoch, self.num_workers)

    def train_in_order(self) -> Iterable[Batch]:
        """This rank's training rows, unshuffled (EM)."""
        return self._iterate(self.ordered_ds)

    def valid(self) -> Iterable[Batch] | None:
        """Validation batches, or None without a validation split."""
        return self._iterate(self.valid_ds) if self.valid_ds is not None else None


def _validate_data(check: Callable[[], Any], rank: int, group: dist.ProcessGroup | None) -> None:
    """Run a data check on rank 0 before the run folder exists and share its verdict (collective).

    Rank 0 runs ``check`` (the shard files' CRC-32, before any footer is parsed; then
    :func:`mptrec.data_loaders.validate.validate_dataset`: every row group's statistics, and
    every row group of a split up to ``FULL_SCAN_ROWS`` rows, else the first of each shard) and
    broadcasts the first problem, so every rank raises the same :class:`DataError` and none
    waits in a collective.
    """
    problem = ""
    if rank == 0:
        try:
            check()
        except DataError as e:
            problem = str(e)
    if dist.get_world_size(group) > 1:
        box = [problem]
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group is not None else 0,
                                   group=group)
        problem = box[0]
    if problem:
        raise DataError(problem)


def check_data(cfg: RunConfig) -> dict[str, int]:
    """The data checks of :func:`pretrain`, without a process group.

    ``mptrec train --nproc N`` runs them before it starts torchrun, so a bad input gives one
    line, not torchrun's failure report.

    Raises:
        ConfigError: a configured feature or label the schema lacks.
        DataError: as in :func:`pretrain` (file checksums, footers, statistics, rows).
    """
    d = cfg.data
    schema = read_schema(d.path)
    splits = [s for s in (d.train_split, d.valid_split) if s]
    verify_shard_files(d.path, schema, splits)
    features = resolve_run_features(cfg, schema)
    labels = [t.label_spec() for t in cfg.tasks]
    datasets = [make_dataset(d, split, features, labels) for split in splits]
    return validate_dataset(datasets)


_RUN_FILES = ("config.json", "plan.txt", "metrics.jsonl", "tb", "checkpoints")


def _prepare_run_dir(cfg: RunConfig, resume: bool, rank: int) -> tuple[Path, list[Path]]:
    """Create the run folder (rank 0); returns it and what did not exist before (to undo on failure)."""
    run_dir = Path(cfg.out_dir)
    if not resume and find_checkpoints(run_dir):
        raise CheckpointError(
            f"{run_dir} already holds checkpoints ({find_checkpoints(run_dir)[-1][1].name}, ...): pass "
            "--resume to continue that run, or choose another out_dir (--set out_dir=...)"
        )
    new: list[Path] = []
    if rank == 0:
        if not run_dir.exists():
            top = run_dir
            while not top.parent.exists():
                top = top.parent
            new.append(top)
        else:
            new += [run_dir / name for name in _RUN_FILES if not (run_dir / name).exists()]
        run_dir.mkdir(parents=True, exist_ok=True)
        write_resolved(cfg, run_dir / "config.json")
    return run_dir, new


def _undo_run_dir(run_dir: Path, new: list[Path]) -> None:
    """After a failed run: remove what it created, unless a checkpoint exists (--resume needs it all)."""
    if find_checkpoints(run_dir):
        return
    for path in new:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def pretrain(
    cfg: RunConfig,
    *,
    device: torch.device,
    resume: bool = False,
    progress: bool = True,
    verbose: bool = True,
    group: dist.ProcessGroup | None = None,
    on_step: Callable[[int, Mapping[str, torch.Tensor]], None] | None = None,
) -> TrainResult:
    """Stage 1: multi-task pre-training of ``cfg.model`` on ``cfg.data`` (collective).

    Args:
        cfg: the run config.
        device: this process's device (from ``launch.dist.init_distributed``).
        resume: continue from the last checkpoint in ``cfg.out_dir`` (exactly, when the world
            size is unchanged); without one, start fresh (a message says so).
        progress: progress bars on rank 0.
        verbose: messages on rank 0 (the plan, resume, validation AUCs, EM cluster sizes).
        group: process group (default: the world; must be initialised, also for one process).
        on_step: callback ``(step, parts)`` after every step (tests).

    Returns:
        The :class:`~mptrec.pipeline.train.loop.TrainResult`.
    """
    if not dist.is_initialized():
        raise RuntimeError("pretrain needs an initialised process group "
                           "(mptrec.launch.dist.init_distributed)")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    schema = read_schema(cfg.data.path)
    splits = [s for s in (cfg.data.train_split, cfg.data.valid_split) if s]
    _validate_data(lambda: verify_shard_files(cfg.data.path, schema, splits), rank, group)
    model, features = build_from_config(cfg, schema)
    data = ShardData(cfg, features, rank, world, device)  # checks the shards' columns and types
    _validate_data(lambda: validate_dataset([data.train_ds, data.valid_ds]), rank, group)  # and values
    rows = int(sum(schema["splits"][cfg.data.train_split]["rows"]))
    used = min(rows, cfg.data.max_rows) if cfg.data.max_rows else rows
    r_emb = cfg.model.effective_r_emb(used)
    if verbose and r_emb != cfg.model.r_emb:
        log.info("model.r_emb %g at %d rows (model.r_emb_rows) -> %.3g for %d training rows",
                 cfg.model.r_emb, cfg.model.r_emb_rows, r_emb, used)
    wrapper, em_store, sharded = shard_for_training(cfg, schema, model, features, device, group, r_emb=r_emb)
    run_dir, new = _prepare_run_dir(cfg, resume, rank)
    try:
        return _train(cfg, run_dir, sharded, features, wrapper, data, device, em_store, resume, rank, world,
                      progress, verbose, group, on_step)
    except BaseException:
        if rank == 0:
            _undo_run_dir(run_dir, new)
        raise


def shard_for_training(
    cfg: RunConfig,
    schema: Mapping[str, Any],
    model: MultiTaskModel,
    features: Sequence[FeatureSpec],
    device: torch.device,
    group: dist.ProcessGroup | None = None,
    *,
    r_emb: float = 0.0,
) -> tuple[TrainWrapper, EMLabelStore | None, ShardedModel]:
    """Stage 1's training module: ``model`` in its :class:`TrainWrapper`, sharded with its optimizers.

    The wrapper holds an :class:`EMLabelStore` over every row of the training split (seeded by
    ``train.seed``) when the model trains on EM labels; :func:`~mptrec.pipeline.sharding.shard_model`
    then shards it with the embedding optimizer and the dense Adam of ``cfg.train``. Used by
    :func:`pretrain` and by the benchmarks (``mptrec.bench.ours.build_stage1``). Collective.

    Args:
        cfg: the run config.
        schema: the shards' ``schema.json`` (training-split row count).
        model: from :func:`~mptrec.pipeline.build.build_from_config` (EBC on the meta device).
        features: the model's input features.
        device: compute device.
        group: process group (default: the world).
        r_emb: whole-table L2 weight (:func:`pretrain` passes ``cfg.model.effective_r_emb(rows)``).

    Returns:
        ``(wrapper, em_store, sharded)``; ``em_store`` is None for a model without EM labels.
    """
    em_store = None
    if model.uses_em:
        rows = int(sum(schema["splits"][cfg.data.train_split]["rows"]))
        em_store = EMLabelStore(rows, cfg.task_names, seed=cfg.train.seed, device=device)
    wrapper = TrainWrapper(model, em_store)
    sharded = shard_model(wrapper, features, cfg.sharding, cfg.train, device, group,
                          batch_size=cfg.data.batch_size, r_emb=r_emb)
    return wrapper, em_store, sharded


def _train(cfg: RunConfig, run_dir: Path, sharded: Any, features: list[FeatureSpec], wrapper: TrainWrapper,
           data: ShardData, device: torch.device, em_store: EMLabelStore | None, resume: bool, rank: int,
           world: int, progress: bool, verbose: bool, group: dist.ProcessGroup | None,
           on_step: Callable[[int, Mapping[str, torch.Tensor]], None] | None) -> TrainResult:
    if rank == 0:
        (run_dir / "plan.txt").write_text(sharded.plan_text)
    if verbose:
        log.info("sharding plan (%d process(es), %s):\n%s", world, device.type, sharded.plan_text)
    identity = checkpoint_meta(cfg.model.name, features, cfg.task_names,
                               backbone_state_dict(sharded.dmp, "model."))
    state, logger = _resume(cfg, run_dir, resume, sharded, identity, em_store, rank, verbose, group)
    ctx = TrainContext(cfg=cfg, run_dir=run_dir, dmp=sharded.dmp, wrapper=wrapper,
                       optimizer=sharded.optimizer, data=data, device=device, identity=identity,
                       plan_text=sharded.plan_text, em_store=em_store, logger=logger, rank=rank,
                       world_size=world, progress=progress, verbose=verbose, group=group)
    try:
        return Trainer(ctx, state, on_step=on_step).fit()
    finally:
        logger.close()


def _resume(cfg: RunConfig, run_dir: Path, resume: bool, sharded: Any, identity: Mapping[str, Any],
            em_store: EMLabelStore | None, rank: int, verbose: bool,
            group: dist.ProcessGroup | None) -> tuple[TrainState, MetricsLogger]:
    logger = MetricsLogger(run_dir, enabled=rank == 0)
    path, skipped = latest_complete_checkpoint(run_dir) if resume else (None, [])
    if verbose:
        for note in skipped:
            log.info("--resume: %s", note)
    if path is None and skipped:
        raise CheckpointError(f"--resume: no complete checkpoint in {run_dir / 'checkpoints'} ("
                              + "; ".join(skipped) + ")")
    if path is None:
        if resume and verbose:
            log.info("--resume: no checkpoint in %s; starting from scratch", run_dir / "checkpoints")
        return TrainState(), logger
    check_resume_config(path, to_dict(cfg))
    loaded = load_checkpoint(path, module=sharded.dmp, prefix="model.", optimizer=sharded.optimizer,
                             identity=identity, group=group)
    if em_store is not None:
        if loaded.em_labels is None:
            raise CheckpointError(f"{path}: no em_labels.pt, but {cfg.model.name} trains on EM labels")
        em_store.load_state_dict(loaded.em_labels)
    logger.truncate_after(loaded.state.step)
    if verbose:
        notes = "".join(f"\n  note: {n}" for n in loaded.notes)
        log.info("resumed from %s (step %d, epoch %d, %d batches into it)%s", path, loaded.state.step,
                 loaded.state.epoch + 1, loaded.state.batches_in_epoch, notes)
    return loaded.state, logger
