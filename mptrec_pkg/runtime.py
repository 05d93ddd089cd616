"""Process-wide settings every mptrec job applies at start: the C allocator's thresholds.

A training step allocates and frees the same few MiB of activations and gradients each step
(at the paper's Ali-CCP dims the first expert layer alone is 3 x 2000 x 128 floats = 3 MiB a
tensor). With glibc's defaults, whether such blocks are reused from the heap or are fresh
``mmap`` pages (or heap memory that ``free`` trimmed back to the kernel) depends on glibc's
*dynamic* thresholds, that is on what the process freed before: a small MLP's training step on
a batch of 16,000 faulted 3,300-5,000 pages a step with the defaults and 240-400 with these
settings in 4 runs (the probe of ``tests/test_runtime.py``), while the pipeline's own
stage-1 step, whose setup happens to raise the thresholds, faults few pages either way and
runs at the same speed within the machine's noise (``mptrec bench --only allocator``).
Fixing the ``mmap`` threshold at its maximum (32 MiB on 64-bit) and the trim threshold at 1 GiB
makes the reuse independent of that history. The cost: up to 1 GiB of freed heap may stay
resident instead of going back to the kernel (allocations of 32 MiB and more, such as large
tables, still use ``mmap``); the bench's growth points measured the same resident memory with
and without the settings.

Set ``MPTREC_MALLOC_TUNING=0`` to keep the C library's defaults. Other C libraries than glibc
(no ``mallopt``) are left alone; :func:`tune_allocator` says whether it applied the settings.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "allocator_status", "tune_allocator"]

#: glibc's ``mallopt`` parameters (``malloc.h``)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: the largest mmap threshold glibc accepts on 64-bit (``DEFAULT_MMAP_THRESHOLD_MAX``)
MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_THRESHOLD = 1024 * 1024 * 1024
ENV = "MPTREC_MALLOC_TUNING"

_applied: bool | None = None


def tune_allocator() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once); True when applied.

    Returns False (and changes nothing) when ``MPTREC_MALLOC_TUNING=0``, off Linux, or when the
    C library has no ``mallopt`` (not glibc).
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get(ENV, "1").strip() == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                    and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
    return _applied


def allocator_status() -> str:
    """One line for the logs: what :func:`tune_allocator` did."""
    if _applied:
        return (f"allocator: glibc mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim threshold "
                f"{TRIM_THRESHOLD >> 20} MiB ({ENV}=0 keeps the defaults)")
    if os.environ.get(ENV, "1").strip() == "0":
        return f"allocator: C library defaults ({ENV}=0)"
    return "allocator: C library defaults (no glibc mallopt here)"
