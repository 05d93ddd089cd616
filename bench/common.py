"""What every benchmark shares: settings, the generated data, the run config, batches in memory.

Data: synthetic Ali-CCP shards (``mptrec.data_loaders.synth``, the same generator as ``mptrec
data synth --dataset aliccp``) at the real vocabulary sizes. Model inputs: the 16 single-valued
AITM fields, i.e. the paper's 18 Ali-CCP fields minus 101 (user id) and 301 (the new task's
source), as in the pipeline's Ali-CCP config; the generator's list fields (210, ``*_14``) are not
inputs, so ``D_in = 16 * width``.

Run config: ``configs/aliccp_pretrain.toml`` (what ``mptrec train`` runs on Ali-CCP) with the
data path, the feature list, the embedding width, the batch size and the thread count
overridden. Width 4, not the paper's 5: the fused CPU kernel needs a multiple of 4.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mptrec.data_loaders.batch import Batch
from mptrec.data_loaders.layout import read_schema
from mptrec.data_loaders.schema import ALICCP_SINGLE_FIELDS, FeatureSpec, LabelSpec
from mptrec.pipeline.build import make_dataset
from mptrec.pipeline.config import DataConfig, RunConfig, TaskSpec, load_config

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "configs" / "aliccp_pretrain.toml"
#: The paper's Ali-CCP inputs: its 18 fields minus 101 (user id) and 301 (source of T3).
PAPER_FIELDS: tuple[str, ...] = tuple(f for f in ALICCP_SINGLE_FIELDS if f not in ("101", "301"))
#: The new task T3 of the new-task benchmark (configs/tasks/aliccp_scenario.toml).
NEW_TASK = TaskSpec(name="scenario", label="301", positive_values=(1, 3))


@dataclass(frozen=True)
class Size:
    """A model size of the stage-1 comparison."""

    name: str
    embedding_dim: int
    batch_size: int
    note: str = ""


PAPER = Size(
    "paper_dims", 4, 2000, "paper's Ali-CCP dims, width 4 instead of 5 (fused CPU kernel: multiple of 4)"
)
WIDTH32 = Size("width32", 32, 2000, "production width 32, same vocabularies and expert sizes")


@dataclass(frozen=True)
class Settings:
    """How much of everything a bench run does.

    Args:
        quick: the ``--quick`` sizes.
        repeats: repeats of every figure (>= 3 for min/median/max).
        warmup: steps before timing starts (per variant).
        steps: timed steps per repeat.
        threads: torch intra-op threads of every single-process measurement.
        rows: rows of the generated data (split 80/10/10 into train/valid/test).
        distinct_batches: batches held in memory for the step benchmarks (cycled).
        auc_steps: training steps of each model in the bf16 AUC check.
        compile: try ``torch.compile`` of the dense arch.
        workdir: where the data and scratch files go.
        config: the base run config.
        seed: data and model seed.
    """

    quick: bool
    repeats: int
    warmup: int
    steps: int
    threads: int
    rows: int
    distinct_batches: int
    auc_steps: int
    compile: bool
    workdir: Path
    config: Path = BASE_CONFIG
    seed: int = 1688723512

    @property
    def data_dir(self) -> Path:
        """The generated shards."""
        return self.workdir / f"aliccp-synth-{self.rows}-{self.seed}"


def make_settings(
    quick: bool,
    workdir: str | os.PathLike[str],
    *,
    repeats: int = 0,
    threads: int = 0,
    compile_dense: bool | None = None,
    config: str | os.PathLike[str] | None = None,
) -> Settings:
    """Default settings for a full or a ``--quick`` run (0 / None: the default)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    base = Settings(
        quick=quick,
        repeats=repeats or (3 if quick else 5),
        warmup=3 if quick else 5,
        steps=6 if quick else 20,
        threads=threads or cores,
        rows=40_000 if quick else 250_000,
        distinct_batches=8 if quick else 16,
        auc_steps=120 if quick else 300,
        compile=(not quick) if compile_dense is None else compile_dense,
        workdir=Path(workdir),
    )
    if base.repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {base.repeats}")
    return replace(base, config=Path(config)) if config else base


def ensure_data(s: Settings) -> dict[str, Any]:
    """Generate the synthetic Ali-CCP shards once (reused when present); returns the schema."""
    from mptrec.data_loaders.synth import generate_aliccp

    if (s.data_dir / "schema.json").is_file():
        schema = read_schema(s.data_dir)
        if schema.get("synth", {}).get("rows") == s.rows:
            return schema
    generate_aliccp(
        s.data_dir,
        rows=s.rows,
        shards=4,
        seed=s.seed,
        split={"train": 0.8, "valid": 0.1, "test": 0.1},
        overwrite=True,
    )
    return read_schema(s.data_dir)


def run_config(
    s: Settings, size: Size, *, batch_size: int = 0, extra: Sequence[str] = (), name: str = "bench"
) -> RunConfig:
    """The base config with the bench's data, inputs, width, batch size and threads."""
    fields = json.dumps(list(PAPER_FIELDS))
    overrides = [
        f"name={json.dumps(name)}",
        f"out_dir={json.dumps(str(s.workdir / 'runs' / name))}",
        f"data.path={json.dumps(str(s.data_dir))}",
        f"data.batch_size={batch_size or size.batch_size}",
        f"features.include={fields}",
        "features.exclude=[]",
        f"features.embedding_dim={size.embedding_dim}",
        f"train.threads={s.threads}",
        'train.device="cpu"',
        *extra,
    ]
    return load_config(s.config, overrides)


def with_new_task(cfg: RunConfig) -> RunConfig:
    """The same run with the new task T3 added (full retraining)."""
    return replace(cfg, tasks=(*cfg.tasks, NEW_TASK))


def load_batches(
    data_dir: str | os.PathLike[str],
    split: str,
    features: Sequence[FeatureSpec],
    labels: Sequence[LabelSpec],
    batch_size: int,
    max_batches: int = 0,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = True,
) -> list[Batch]:
    """Read batches of a split into memory (the loader's own path, no workers).

    The dataset comes from the pipeline's factory (:func:`mptrec.pipeline.build.make_dataset`)
    with a default ``[data]`` section: unshuffled, out-of-range ids raise, every row read.
    """
    ds = make_dataset(DataConfig(path=os.fspath(data_dir)), split, features, labels, rank=rank,
                      world_size=world_size, batch_size=batch_size, drop_last=drop_last)
    out: list[Batch] = []
    for b in ds:
        out.append(b)
        if max_batches and len(out) >= max_batches:
            break
    if not out:
        raise ValueError(
            f"{data_dir} split {split!r}: no full batch of {batch_size} rows (rank {rank} of {world_size})"
        )
    return out


def cycle(batches: Sequence[Batch]) -> Iterator[Batch]:
    """Endless iterator over in-memory batches."""
    if not batches:
        raise ValueError("cycle needs at least one batch")
    while True:
        yield from batches


@contextmanager
def process_group() -> Iterator[dist.ProcessGroup]:
    """A one-process gloo group on an in-memory store (as ``mptrec train`` without torchrun).

    Like :func:`mptrec.launch.dist.init_distributed`, it first applies the allocator settings of
    :mod:`mptrec.runtime` (a process-wide setting: the references measured in the same
    process get them too).
    """
    from mptrec.runtime import tune_allocator

    tune_allocator()
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        group = dist.GroupMember.WORLD
        assert group is not None
        yield group
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def set_threads(n: int) -> None:
    """Intra-op threads of this process."""
    torch.set_num_threads(n)
