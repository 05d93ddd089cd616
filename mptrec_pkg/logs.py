r"""The one logging set-up of mptrec: a handler on the ``mptrec`` logger, INFO lines on rank 0 only.

Every module logs with ``log = get_logger(__name__)``. Importing this module configures the
``mptrec`` logger once: level INFO, one handler that writes each message as it is
(``%(message)s``, no prefix) to the *current* ``sys.stderr`` (so ``contextlib.redirect_stderr``
captures it), and :class:`RankFilter`: INFO and DEBUG lines show on rank 0 only, warnings and
errors on every rank. So a job writes ``log.info(...)`` where it used to write
``if rank == 0: print(..., file=sys.stderr)``. The rank is that of the default process group
when ``torch.distributed`` is initialised, else ``RANK`` from the environment (torchrun), else 0.

Results a command prints on stdout (an evaluation summary, a table) are output, not log lines:
the command prints them.

Like :mod:`mptrec.io` this module imports only the standard library (it looks at
``torch.distributed`` only when that is already imported), so every package may use it.

Example:
    >>> import contextlib, io
    >>> err = io.StringIO()
    >>> with contextlib.redirect_stderr(err):
    ...     get_logger("mptrec.example").info("epoch %d: done", 1)
    >>> err.getvalue()
    'epoch 1: done\n'
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["RankFilter", "current_rank", "get_logger"]

ROOT = "mptrec"


def current_rank() -> int:
    """This process's rank: the default process group's, else ``RANK`` (torchrun), else 0."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


class RankFilter(logging.Filter):
    """Pass warnings and errors on every rank, everything else on rank 0 only."""

    def filter(self, record: logging.LogRecord) -> bool:
        """True when ``record`` is to be written on this rank."""
        return record.levelno >= logging.WARNING or current_rank() == 0


class _StderrHandler(logging.Handler):
    """Write each formatted record to whatever ``sys.stderr`` is at the time, and flush."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def _configure() -> None:
    root = logging.getLogger(ROOT)
    if any(h.get_name() == ROOT for h in root.handlers):
        return
    handler = _StderrHandler()
    handler.set_name(ROOT)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(RankFilter())
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False


def get_logger(name: str) -> logging.Logger:
    """The logger of module ``name`` (under ``mptrec``, which this module configured)."""
    return logging.getLogger(name if name == ROOT or name.startswith(ROOT + ".") else f"{ROOT}.{name}")


_configure()
