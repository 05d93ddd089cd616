"""Timing, repeats, machine description and result files shared by every benchmark.

A figure is measured ``repeats`` times and reported as ``{"min", "median", "max", "values",
"unit"}``. Several variants that are compared with each other are timed *interleaved* (A1 B1 C1
A2 B2 C2 ...), so a burst of load from another process on the machine hits all of them rather
than one, and each repeat gives one paired ratio.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from mptrec.io import atomic_write_text


@dataclass
class Stat:
    """One figure over repeats."""

    values: list[float]
    unit: str

    def __post_init__(self) -> None:
        if not self.values:
            raise ValueError(f"a Stat ({self.unit}) needs at least one value")

    @property
    def median(self) -> float:
        """Median over repeats."""
        return float(statistics.median(self.values))

    def to_json(self) -> dict[str, Any]:
        """JSON form: min, median, max, values, unit."""
        return {
            "min": min(self.values),
            "median": self.median,
            "max": max(self.values),
            "values": list(self.values),
            "unit": self.unit,
        }


def ratio(num: Stat, den: Stat, unit: str = "x") -> Stat:
    """Per-repeat ratios ``num[i] / den[i]`` of two interleaved measurements."""
    if len(num.values) != len(den.values):
        raise ValueError(f"ratio of {len(num.values)} and {len(den.values)} repeats")
    return Stat([a / b for a, b in zip(num.values, den.values)], unit)


StepFn = Callable[[int], Any]


@dataclass
class Variant:
    """A thing to time: ``step(i)`` processes batch ``i`` of ``samples_per_step`` samples."""

    name: str
    step: StepFn
    samples_per_step: int
    setup: Callable[[], None] = field(default=lambda: None)
    steps: int = 0  # timed steps per repeat (0: the caller's default)
    warmup: int = -1  # warm-up steps (-1: the caller's default)


def _progress(desc: str, total: int) -> tqdm:
    return tqdm(total=total, desc=desc, unit="step", leave=False, file=sys.stderr, dynamic_ncols=True)


def time_steps(variant: Variant, steps: int, start: int = 0, desc: str = "") -> float:
    """Wall seconds of ``steps`` calls of ``variant.step`` (starting at batch ``start``)."""
    variant.setup()
    bar = _progress(desc or variant.name, steps)
    try:
        t0 = time.perf_counter()
        for i in range(start, start + steps):
            variant.step(i)
            bar.update(1)
        return time.perf_counter() - t0
    finally:
        bar.close()


def throughput(
    variants: Sequence[Variant], *, warmup: int, steps: int, repeats: int, label: str = ""
) -> dict[str, Stat]:
    """Samples/s of each variant, steady state after ``warmup`` steps, repeats interleaved.

    A variant's own ``steps`` / ``warmup`` (when set) replace the defaults, so variants with
    different batch sizes can process the same number of samples per repeat.
    """
    if repeats < 1 or steps < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1, steps >= 1, warmup >= 0; got {repeats}, {steps}, {warmup}")
    for v in variants:
        w = warmup if v.warmup < 0 else v.warmup
        if w:
            time_steps(v, w, desc=f"{label}{v.name} warm-up")
    values: dict[str, list[float]] = {v.name: [] for v in variants}
    for r in range(repeats):
        for v in variants:
            n = v.steps or steps
            secs = time_steps(v, n, start=r * n, desc=f"{label}{v.name} {r + 1}/{repeats}")
            values[v.name].append(v.samples_per_step * n / secs)
        line = ", ".join(f"{n} {vals[-1]:,.0f}" for n, vals in values.items())
        tqdm.write(f"[bench] {label}repeat {r + 1}/{repeats}: samples/s {line}", file=sys.stderr)
    return {n: Stat(vals, "samples/s") for n, vals in values.items()}


def repeat_timed(fn: Callable[[], float | None], repeats: int, unit: str, desc: str) -> Stat:
    """Run ``fn`` ``repeats`` times; it returns its own figure, or None to use its wall seconds."""
    out: list[float] = []
    for r in tqdm(range(repeats), desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True):
        t0 = time.perf_counter()
        got = fn()
        out.append(time.perf_counter() - t0 if got is None else float(got))
        tqdm.write(f"[bench] {desc} {r + 1}/{repeats}: {out[-1]:,.4g} {unit}", file=sys.stderr)
    return Stat(out, unit)


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Context manager sampling this process's RSS every ``interval`` s; ``peak`` - ``start`` = growth."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.start = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRss:
        self.start = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def growth(self) -> int:
        """Peak RSS minus RSS at entry, bytes."""
        return self.peak - self.start


# --------------------------------------------------------------------------------------------
# Machine and versions
# --------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, load, OS."""
    cores = os.cpu_count() or 0
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = cores
    mem = 0
    try:
        with open("/proc/meminfo") as fh:
            mem = int(fh.readline().split()[1]) * 1024
    except OSError:
        pass
    flags: list[str] = []
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    flags = sorted(have & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
                    break
    except OSError:
        pass
    return {
        "cpu_model": cpu_model(),
        "cores": cores,
        "usable_cores": usable,
        "memory_bytes": mem,
        "cpu_flags": flags,
        "load_average_at_start": list(os.getloadavg()),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def versions() -> dict[str, str]:
    """Versions of the stack."""
    from importlib import metadata

    out: dict[str, str] = {}
    for pkg in ("torch", "torchrec", "fbgemm_gpu_cpu", "fbgemm_gpu", "pyarrow", "numpy", "torchmetrics"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


def thread_info() -> dict[str, Any]:
    """Torch intra/inter-op threads and the OMP/MKL environment."""
    import torch

    return {
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", ""),
        "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS", ""),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def jsonable(obj: Any) -> Any:
    """Turn Stats (and nested containers of them) into plain JSON."""
    if isinstance(obj, Stat):
        return obj.to_json()
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and obj != obj:
        return None
    return obj


def write_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file, then rename)."""
    atomic_write_text(path, text)


def write_json(path: str | os.PathLike[str], results: Mapping[str, Any]) -> None:
    """Write results as indented JSON, atomically."""
    write_atomic(path, json.dumps(jsonable(results), indent=2) + "\n")


def in_fresh_process(target: Callable[..., None], args: Sequence[Any], what: str,
                     timeout: float = 900.0) -> dict[str, Any]:
    """Run ``target(*args, queue)`` in a freshly spawned process; returns the dict it reports.

    ``target`` must put ``("ok", result)`` or ``("error", traceback_text)`` on the queue.
    The process is spawned (not forked), so it inherits none of this process's allocations.

    Raises:
        RuntimeError: naming ``what``, with the child's traceback, when it reports an error.
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    try:
        status, payload = queue.get(timeout=timeout)
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    if status != "ok":
        raise RuntimeError(f"{what} failed:\n{payload}")
    result: dict[str, Any] = payload
    return result

