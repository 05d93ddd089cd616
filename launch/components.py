# ruff: noqa: UP006, UP035, UP045
# torchx reads component signatures from the source (torchx.specs.file_linter) and accepts only
# typing.List / typing.Dict / typing.Optional there, not list[str] or `str | None`; and it evaluates
# the annotations at run time, so this file must not use `from __future__ import annotations`.
r"""torchx components for ``mptrec`` jobs: train, prompt_tune, evaluate, convert, predict.

Each component returns a :class:`torchx.specs.AppDef` built by ``torchx.components.dist.ddp``:
``-j NxM`` starts N nodes (scheduler replicas) with one ``torchrun`` each, and M processes per
node; every process runs ``python -m mptrec.launch.cli <subcommand> ...``, so the ``mptrec`` CLI
is the only entry point and the job arguments mean the same as on the command line. Resources
are per node: ``--cpu/--gpu/--memMB``, or a torchx named resource ``-h``. Nothing here names a
host, user or path; relative paths (``--config configs/x.toml``) resolve in the job's working
directory (the repository for ``local_cwd``, the submit directory or ``job_dir`` for Slurm, the
image's work directory for Kubernetes).

Usage (from the repository root, with the virtual environment's ``bin`` on ``PATH``)::

    torchx run -s local_cwd launch/components.py:train --config configs/debug.toml -j 1x2
    torchx run --dryrun -s slurm -cfg partition=gpu,time=04:00:00 launch/components.py:train \
        --config configs/aliccp_pretrain.toml -j 2x8 --gpu 8 --cpu 64 --memMB 480000
    torchx run launch/components.py:train --help

``--set`` takes comma-separated ``KEY=VALUE`` overrides (torchx splits list arguments at commas;
a piece that does not start a new ``KEY=`` or sits inside unclosed brackets, braces or quotes
continues the previous value, so ``--set 'sharding.sharding_types=["row_wise","table_wise"]'``
stays one override). Failure behaviour: torchrun runs with ``--max_restarts 0`` (its default),
so a process that dies makes torchrun stop the other processes of its node and exit non-zero
with the failing rank's error (``--tee 3`` prefixes every line with its rank); Slurm's
``srun --kill-on-bad-exit=1`` and Volcano's ``maxRetry: 0`` then end the whole job.
"""

import re
from typing import Dict, List, Optional

import torchx.specs as specs
from torchx.components.dist import ddp

_MPTREC_CLI = "mptrec.launch.cli"
_MPTREC_KEY = re.compile(r"^\s*[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*\s*=")


def _mptrec_unbalanced(text: str) -> bool:
    """True when ``text`` has unclosed brackets, braces or double quotes (a value cut at a comma)."""
    return text.count("[") > text.count("]") or text.count("{") > text.count("}") or text.count('"') % 2 == 1


def _mptrec_overrides(values: Optional[List[str]]) -> List[str]:
    """Rejoin ``--set`` pieces that torchx split at commas; each result must be ``KEY=VALUE``."""
    joined: List[str] = []
    for piece in values or []:
        if joined and (_mptrec_unbalanced(joined[-1]) or not _MPTREC_KEY.match(piece)):
            joined[-1] = f"{joined[-1]},{piece}"
        else:
            joined.append(piece)
    for item in joined:
        if not _MPTREC_KEY.match(item):
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=0.01")
        if _mptrec_unbalanced(item):
            raise ValueError(f"--set {item!r}: unclosed bracket, brace or quote in the value")
    return [arg for item in joined for arg in ("--set", item.strip())]


def _mptrec_job(
    role: str,
    cli_args: List[str],
    *,
    j: str,
    image: str,
    h: Optional[str],
    cpu: int,
    gpu: int,
    memMB: int,
    env: Optional[Dict[str, str]],
    max_retries: int,
    rdzv_port: int,
    mounts: Optional[List[str]],
    name: str,
    debug: bool,
) -> specs.AppDef:
    """One ``dist.ddp`` role running ``python -m mptrec.launch.cli ROLE_SUBCOMMAND ...``."""
    if not name or name.endswith("/"):
        name = f"{name or '/'}{role}"
    app = ddp(
        *cli_args, m=_MPTREC_CLI, image=image, name=name, h=h, cpu=cpu, gpu=gpu, memMB=memMB, j=j,
        env=dict(env or {}), max_retries=max_retries, rdzv_port=rdzv_port, mounts=mounts, debug=debug,
    )
    app.roles[0].name = role  # ddp names the role after the module ("cli"); say which job it is
    nproc_per_node = int(j.rsplit("x", 1)[-1])
    gpus = app.roles[0].resource.gpu
    if gpus > 0 and nproc_per_node > gpus:
        raise ValueError(
            f"-j {j} starts {nproc_per_node} processes per node but each node gets {gpus} GPU(s) "
            f"({'-h ' + h if h else '--gpu ' + str(gpu)}); every process needs its own GPU"
        )
    return app


def train(
    *,
    config: str,
    set: Optional[List[str]] = None,
    resume: bool = False,
    j: str = "1x2",
    h: Optional[str] = None,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    image: str = "",
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
    name: str = "",
    debug: bool = False,
) -> specs.AppDef:
    """Stage 1: multi-task pre-training (``mptrec train --config CONFIG [--set K=V ...]``).

    Args:
        config: run config (TOML), relative to the job's working directory.
        set: config overrides KEY=VALUE, comma-separated (e.g. train.lr=0.01,train.epochs=2).
        resume: continue from the run's latest checkpoint (passes --resume).
        j: {nnodes}x{nproc_per_node}, or {min_nnodes}:{nnodes}x{nproc_per_node} (elastic).
            On GPU nodes nproc_per_node must not exceed the GPUs per node.
        h: torchx named resource per node (takes precedence over cpu, gpu and memMB).
        cpu: CPUs per node.
        gpu: GPUs per node.
        memMB: host memory per node in MB.
        image: container image with mptrec installed (Kubernetes); ignored by local_cwd and slurm.
        env: extra environment variables (e.g. NCCL_DEBUG=INFO,FOO=bar).
        mounts: volume/bind mounts (type=bind,src=/host,dst=/job[,readonly]) for container schedulers.
        max_retries: scheduler-level retries of the whole job.
        rdzv_port: port of the c10d rendezvous on the first node (multi-node jobs).
        name: {experiment}/{run} name; the run part defaults to the component name.
        debug: set PyTorch's distributed debug variables (NCCL_DESYNC_DEBUG, ...).
    """
    args = ["train", "--config", config, *_mptrec_overrides(set)]
    if resume:
        args.append("--resume")
    return _mptrec_job(
        "train", args, j=j, image=image, h=h, cpu=cpu, gpu=gpu, memMB=memMB, env=env,
        max_retries=max_retries, rdzv_port=rdzv_port, mounts=mounts, name=name, debug=debug,
    )


def prompt_tune(
    *,
    run: str,
    task: str,
    set: Optional[List[str]] = None,
    j: str = "1x2",
    h: Optional[str] = None,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    image: str = "",
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
    name: str = "",
    debug: bool = False,
) -> specs.AppDef:
    """Stage 2: train a registered new task on the frozen backbone (``mptrec prompt-tune``).

    Args:
        run: stage-1 run directory (holds the checkpoints and the task registry).
        task: name of the registered new task.
        set: config overrides KEY=VALUE, comma-separated (e.g. train.lr=0.01,train.epochs=2).
        j: {nnodes}x{nproc_per_node}, or {min_nnodes}:{nnodes}x{nproc_per_node} (elastic).
            On GPU nodes nproc_per_node must not exceed the GPUs per node.
        h: torchx named resource per node (takes precedence over cpu, gpu and memMB).
        cpu: CPUs per node.
        gpu: GPUs per node.
        memMB: host memory per node in MB.
        image: container image with mptrec installed (Kubernetes); ignored by local_cwd and slurm.
        env: extra environment variables (e.g. NCCL_DEBUG=INFO,FOO=bar).
        mounts: volume/bind mounts (type=bind,src=/host,dst=/job[,readonly]) for container schedulers.
        max_retries: scheduler-level retries of the whole job.
        rdzv_port: port of the c10d rendezvous on the first node (multi-node jobs).
        name: {experiment}/{run} name; the run part defaults to the component name.
        debug: set PyTorch's distributed debug variables (NCCL_DESYNC_DEBUG, ...).
    """
    args = ["prompt-tune", "--run-dir", run, "--task", task, *_mptrec_overrides(set)]
    return _mptrec_job(
        "prompt-tune", args, j=j, image=image, h=h, cpu=cpu, gpu=gpu, memMB=memMB, env=env,
        max_retries=max_retries, rdzv_port=rdzv_port, mounts=mounts, name=name, debug=debug,
    )


def evaluate(
    *args: str,
    run: str,
    out: Optional[str] = None,
    checkpoint: str = "best",
    data: Optional[str] = None,
    split: Optional[str] = None,
    set: Optional[List[str]] = None,
    j: str = "1x1",
    h: Optional[str] = None,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    image: str = "",
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
    name: str = "",
    debug: bool = False,
) -> specs.AppDef:
    """Offline evaluation: exact AUC of every registered task (``mptrec eval``).

    Args:
        args: further ``mptrec eval`` options, passed through unchanged after ``--``
            (e.g. -- --user-field 101 --dump-predictions RUN/predictions.parquet).
        run: run directory to evaluate.
        out: report file (JSON; default: RUN/eval.json).
        checkpoint: best, last, a checkpoint name or a path.
        data: shard directory to evaluate on (default: the run's data.path).
        split: split to score (default: the run's data.test_split).
        set: run-config overrides KEY=VALUE, comma-separated (e.g. data.batch_size=16384).
        j: {nnodes}x{nproc_per_node}, or {min_nnodes}:{nnodes}x{nproc_per_node} (elastic).
            On GPU nodes nproc_per_node must not exceed the GPUs per node.
        h: torchx named resource per node (takes precedence over cpu, gpu and memMB).
        cpu: CPUs per node.
        gpu: GPUs per node.
        memMB: host memory per node in MB.
        image: container image with mptrec installed (Kubernetes); ignored by local_cwd and slurm.
        env: extra environment variables (e.g. NCCL_DEBUG=INFO,FOO=bar).
        mounts: volume/bind mounts (type=bind,src=/host,dst=/job[,readonly]) for container schedulers.
        max_retries: scheduler-level retries of the whole job.
        rdzv_port: port of the c10d rendezvous on the first node (multi-node jobs).
        name: {experiment}/{run} name; the run part defaults to the component name.
        debug: set PyTorch's distributed debug variables (NCCL_DESYNC_DEBUG, ...).
    """
    cli = ["eval", "--run-dir", run, "--checkpoint", checkpoint]
    for flag, value in (("--out", out), ("--data", data), ("--split", split)):
        if value:
            cli += [flag, value]
    cli += [*_mptrec_overrides(set), *args]
    return _mptrec_job(
        "evaluate", cli, j=j, image=image, h=h, cpu=cpu, gpu=gpu, memMB=memMB, env=env,
        max_retries=max_retries, rdzv_port=rdzv_port, mounts=mounts, name=name, debug=debug,
    )


def convert(
    *args: str,
    j: str = "1x1",
    h: Optional[str] = None,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    image: str = "",
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
    name: str = "",
    debug: bool = False,
) -> specs.AppDef:
    """Data conversion: raw sources to Parquet shards, or synthetic shards (``mptrec data ...``).

    Args:
        args: the arguments of ``mptrec data``, passed through unchanged; put them after ``--``
            on the torchx command line (see ``mptrec data --help``).
        j: {nnodes}x{nproc_per_node}; conversion is one process by default.
        h: torchx named resource per node (takes precedence over cpu, gpu and memMB).
        cpu: CPUs per node.
        gpu: GPUs per node.
        memMB: host memory per node in MB.
        image: container image with mptrec installed (Kubernetes); ignored by local_cwd and slurm.
        env: extra environment variables (e.g. FOO=bar).
        mounts: volume/bind mounts (type=bind,src=/host,dst=/job[,readonly]) for container schedulers.
        max_retries: scheduler-level retries of the whole job.
        rdzv_port: port of the c10d rendezvous on the first node (multi-node jobs).
        name: {experiment}/{run} name; the run part defaults to the component name.
        debug: set PyTorch's distributed debug variables.
    """
    return _mptrec_job(
        "convert", ["data", *args], j=j, image=image, h=h, cpu=cpu, gpu=gpu, memMB=memMB, env=env,
        max_retries=max_retries, rdzv_port=rdzv_port, mounts=mounts, name=name, debug=debug,
    )


def predict(
    *args: str,
    model: str,
    data: str,
    out: str,
    split: str = "test",
    batch_size: int = 8192,
    j: str = "1x1",
    h: Optional[str] = None,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    image: str = "",
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
    name: str = "",
    debug: bool = False,
) -> specs.AppDef:
    """Serving: batch-score a split with an artifact from ``mptrec export`` (``mptrec predict``).

    With ``-j 1xN`` the N ranks share the split's row groups (every row scored once) and rank 0
    writes the one output file; the artifact needs no GPU and no process group of its own.

    Args:
        args: further ``mptrec predict`` options, passed through unchanged after ``--``
            (e.g. -- --threads 1 --no-progress).
        model: artifact folder (model.pt2, manifest.json).
        data: shard folder (with schema.json).
        out: output Parquet file (sample_id, <task>_prob, <task>_logit).
        split: split to score.
        batch_size: rows per program call.
        j: {nnodes}x{nproc_per_node}.
        h: torchx named resource per node (takes precedence over cpu, gpu and memMB).
        cpu: CPUs per node.
        gpu: GPUs per node.
        memMB: host memory per node in MB.
        image: container image with mptrec installed (Kubernetes); ignored by local_cwd and slurm.
        env: extra environment variables (e.g. FOO=bar).
        mounts: volume/bind mounts (type=bind,src=/host,dst=/job[,readonly]) for container schedulers.
        max_retries: scheduler-level retries of the whole job.
        rdzv_port: port of the c10d rendezvous on the first node (multi-node jobs).
        name: {experiment}/{run} name; the run part defaults to the component name.
        debug: set PyTorch's distributed debug variables.
    """
    cli = ["predict", "--model", model, "--data", data, "--out", out, "--split", split,
           "--batch-size", str(batch_size), *args]
    return _mptrec_job(
        "predict", cli, j=j, image=image, h=h, cpu=cpu, gpu=gpu, memMB=memMB, env=env,
        max_retries=max_retries, rdzv_port=rdzv_port, mounts=mounts, name=name, debug=debug,
    )
