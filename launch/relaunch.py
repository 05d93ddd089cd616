"""Start a job module in child processes: ``python -m MODULE`` for one process, torchrun for N.

The one re-launch of the project: ``mptrec train --nproc N``, ``mptrec prompt-tune --nproc N``
(and its ``--compare-full`` jobs) start their torchrun workers here, so the command line, the
standalone rendezvous and the thread default are the same for every job. Only ``launch/``
starts processes; ``pipeline/`` never starts a module by name.

Example:
    >>> " ".join(command("mptrec.launch.worker_train", ["--config", "c.toml"], nproc=2)[1:])
    '-m torch.distributed.run --standalone --nproc_per_node=2 -m mptrec.launch.worker_train --config c.toml'
    >>> " ".join(command("mptrec.launch.worker_train", ["--config", "c.toml"], nproc=1)[1:])
    '-m mptrec.launch.worker_train --config c.toml'
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

__all__ = ["command", "run_module"]


def command(module: str, args: Sequence[str], nproc: int) -> list[str]:
    """The command line that runs ``python -m module args``, under torchrun when ``nproc > 1``.

    Args:
        module: the module to run (it must run its job under ``if __name__ == "__main__"``).
        args: its arguments.
        nproc: local processes; more than one starts ``torch.distributed.run --standalone``.

    Returns:
        argv, starting with this interpreter.
    """
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else []
    return [sys.executable, *launcher, "-m", module, *args]


def run_module(module: str, args: Sequence[str], nproc: int) -> int:
    """Run :func:`command` and wait; ``OMP_NUM_THREADS`` defaults to 1 in the children.

    Returns:
        The exit code (torchrun's, which is non-zero when any worker failed).
    """
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.call(command(module, args, nproc), env=env)
