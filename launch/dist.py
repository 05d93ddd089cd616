"""Process-group set-up and tear-down for ``mptrec`` jobs, from torchrun's environment.

torchrun (and so every torchx component in :mod:`mptrec.launch.components`) starts one process
per device and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``
for each. :func:`init_distributed` reads them, picks the backend from the device (``nccl`` for
CUDA, ``gloo`` for CPU), binds the process to GPU ``LOCAL_RANK`` on CUDA, and creates the default
process group. Started without torchrun (none of those variables set) it creates a one-process
group on an in-memory store, so ``mptrec train`` also runs as a plain command. This is the only
module that reads the distributed environment; ``pipeline/`` receives the device and the
process group as arguments.

The entry point's pattern (``tests/launch/_dist_probe.py`` runs it under torchrun)::

    device, rank, world_size = init_distributed(cfg.train.device)
    try:
        ...  # build, shard and train on `device`
    finally:
        teardown()
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from mptrec.runtime import tune_allocator

__all__ = ["init_distributed", "teardown", "resolve_device"]

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str) -> str:
    """Turn a configured device (``auto``, ``cpu`` or ``cuda``) into ``cpu`` or ``cuda``.

    Args:
        device: ``auto`` (CUDA when a GPU is visible, else CPU), ``cpu`` or ``cuda``.

    Returns:
        ``"cpu"`` or ``"cuda"``.

    Raises:
        ValueError: for any other name.
        RuntimeError: for ``cuda`` when no CUDA device is visible.
    """
    if device not in _DEVICES:
        raise ValueError(f"device must be one of {list(_DEVICES)}, got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "device 'cuda' was asked for but torch sees no CUDA device "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); install the CUDA "
            "stack with `MPTREC_DEVICE=cuda make setup` or use device 'cpu'"
        )
    return device


def _env_int(name: str) -> int:
    raw = os.environ[name]
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None
    if value < 0:
        raise ValueError(f"environment variable {name}={raw!r} must be >= 0")
    return value


def _read_launch_env() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) from torchrun's variables; None when none is set."""
    present = [v for v in _TORCHRUN_VARS if v in os.environ]
    if not present:
        return None
    missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise RuntimeError(
            f"incomplete launch environment: {', '.join(present)} set but {', '.join(missing)} "
            "missing; start the job with torchrun / `torchx run` (which set all of "
            f"{', '.join(_TORCHRUN_VARS)}) or with none of them for a single process"
        )
    rank, world_size, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if world_size < 1 or rank >= world_size:
        raise ValueError(f"environment RANK={rank} is not in [0, WORLD_SIZE={world_size})")
    return rank, world_size, local_rank


def init_distributed(device: str) -> tuple[torch.device, int, int]:
    """Create the default process group for this process and pick its device.

    The backend is ``nccl`` on CUDA and ``gloo`` on CPU. On CUDA the process uses GPU
    ``LOCAL_RANK`` (``torch.cuda.set_device``), so ``-j NxM`` needs at least M visible GPUs
    per node. Without torchrun's variables a one-process group (rank 0 of 1) is created.
    First it applies the process-wide allocator settings of :mod:`mptrec.runtime`.

    Args:
        device: ``auto``, ``cpu`` or ``cuda`` (the config's ``train.device``).

    Returns:
        ``(device, rank, world_size)``: ``cpu`` or ``cuda:LOCAL_RANK``, and the global rank and
        number of processes.

    Raises:
        RuntimeError: if a default process group already exists, the launch variables are
            incomplete, or ``LOCAL_RANK`` names a GPU that is not visible.
        ValueError: for an unknown device name or malformed launch variables.
    """
    if dist.is_initialized():
        raise RuntimeError("init_distributed: a default process group already exists; call teardown() first")
    tune_allocator()  # every job starts here (mptrec.runtime: the allocator settings)
    kind = resolve_device(device)
    launch = _read_launch_env()
    rank, world_size, local_rank = launch if launch is not None else (0, 1, 0)
    if kind == "cuda":
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise RuntimeError(
                f"LOCAL_RANK={local_rank} but only {count} CUDA device(s) are visible "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); "
                "start at most one process per GPU (-j NODESxGPUS)"
            )
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        dev = torch.device("cpu")
        backend = "gloo"
    device_id = dev if kind == "cuda" else None
    if launch is None:
        # No torchrun: a one-process group on an in-memory store (no ports, no environment).
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, device_id=device_id)
    else:
        dist.init_process_group(backend, rank=rank, world_size=world_size, device_id=device_id)
    return dev, rank, world_size


def teardown() -> None:
    """Destroy the default process group if there is one (safe to call twice, or after a failure)."""
    if dist.is_initialized():
        dist.destroy_process_group()
