"""The training metrics log: ``RUN/metrics.jsonl`` (always) and TensorBoard events (if installed).

One JSON object per line, written by rank 0 only and flushed per line, so a killed run keeps
every line it logged. Line kinds:

- training, every ``train.log_every`` steps::

    {"step", "epoch", "loss", "losses": {part: value}, "lr", "samples_per_s", "alpha"}

- validation, each epoch::

    {"epoch", "step", "split": "valid", "auc": {task: value | null}, "auc_sum"}

- EM re-labelling::

    {"epoch", "step", "cluster_sizes": [rows per task]}

On resume the file is appended to; lines of steps after the resumed checkpoint that the killed
run had already logged are dropped first (:meth:`MetricsLogger.truncate_after`), so each step
appears once.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from mptrec.io import atomic_write_text

__all__ = ["MetricsLogger", "read_metrics"]


class MetricsLogger:
    """Append-only JSONL metrics log (rank 0) with optional TensorBoard mirroring.

    Args:
        run_dir: the run folder; the log is ``run_dir/metrics.jsonl``.
        enabled: False on ranks other than 0 (then every call is a no-op).
        tensorboard: also write TensorBoard event files under ``run_dir/tb`` when the
            ``tensorboard`` package is importable.
    """

    def __init__(self, run_dir: str | os.PathLike[str], *, enabled: bool = True,
                 tensorboard: bool = True) -> None:
        self.path: Path = Path(run_dir) / "metrics.jsonl"
        self.enabled: bool = enabled
        self._fh: IO[str] | None = None
        self._tb: Any = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional ([tensorboard] extra)
                self._tb = None
            else:
                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))

    def truncate_after(self, step: int) -> None:
        """Drop lines with a ``step`` greater than ``step`` (before resuming from it)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", -1) <= step]
        if self._fh is not None:
            self._fh.close()
        atomic_write_text(self.path, "".join(line + "\n" for line in keep))
        self._fh = self.path.open("a", encoding="utf-8")

    def log(self, record: Mapping[str, Any]) -> None:
        """Write one line (and mirror numeric values to TensorBoard)."""
        if not self.enabled or self._fh is None:
            return
        self._fh.write(json.dumps(_jsonable(record), sort_keys=False) + "\n")
        self._fh.flush()
        if self._tb is not None:
            self._mirror(record)

    def _mirror(self, record: Mapping[str, Any]) -> None:
        step = int(record.get("step", record.get("epoch", 0)))
        prefix = "valid/" if record.get("split") == "valid" else "train/"
        for key, value in record.items():
            if key in ("step", "epoch", "split"):
                continue
            if isinstance(value, Mapping):
                for sub, v in value.items():
                    if isinstance(v, int | float):
                        self._tb.add_scalar(f"{prefix}{key}/{sub}", v, step)
            elif isinstance(value, int | float):
                self._tb.add_scalar(f"{prefix}{key}", value, step)
            elif key == "cluster_sizes":
                for k, v in enumerate(value):
                    self._tb.add_scalar(f"em/cluster_{k}", v, step)

    def close(self) -> None:
        """Close the files."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and callable(value.item):
        return _jsonable(value.item())
    return value


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every line of ``run_dir/metrics.jsonl`` (for tests and reports)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics log (has the run started?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
