"""Loader throughput: ``ShardDataset`` + DataLoader vs a bare pyarrow read of the same shards.

Both read every feature and label column of one split. The bare read is
``ParquetFile.iter_batches`` over all files (pyarrow's own threads), touching every column
(flat columns and list values/lengths to numpy), with no tensors, KJT or checks. Prints samples/s
of both and their ratio (best of ``repeats`` epochs; the loader's persistent workers start in
the first one); asserts nothing.

    .venv/bin/python -m mptrec.bench.bench_dataload /tmp/synth1m --batch-size 4096 --workers 2
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mptrec.data_loaders.batch import Batch
from mptrec.data_loaders.dataset import ShardDataset, make_dataloader
from mptrec.data_loaders.layout import read_schema, resolve_features
from mptrec.data_loaders.schema import LabelSpec


def _labels(schema: dict[str, Any]) -> list[LabelSpec]:
    out = []
    for col, spec in schema["labels"].items():
        vals = spec["values"]
        pos = () if sorted(vals) == [0, 1] else tuple(v for v in vals if v != 2)
        out.append(LabelSpec(name=f"label_{col}", column=col, positive_values=pos))
    return out


def bare_read(files: list[Path], columns: list[str], batch_size: int) -> int:
    """Read all files with pyarrow, touching every column; returns rows read."""
    rows = 0
    for f in files:
        for rb in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns):
            for col in rb.columns:
                if pa.types.is_list(col.type):
                    pc.list_value_length(col).to_numpy()
                    pc.list_flatten(col).to_numpy()
                else:
                    col.to_numpy(zero_copy_only=False)
            rows += rb.num_rows
    return rows


def loader_read(loader: Iterable[Batch]) -> int:
    """Iterate one epoch through the DataLoader; returns rows read."""
    rows = 0
    for batch in loader:
        rows += batch.batch_size
    return rows


def run(
    data_dir: str, batch_size: int = 4096, num_workers: int = 2, repeats: int = 3, split: str = "train"
) -> dict[str, Any]:
    """Measure loader and bare-read samples/s (best of ``repeats``) and their ratio."""
    schema = read_schema(data_dir)
    features = resolve_features(schema, embedding_dim=4)
    labels = _labels(schema)
    ds = ShardDataset(data_dir, split, features=features, labels=labels, batch_size=batch_size)
    files = [Path(data_dir) / f for f in schema["splits"][split]["files"]]
    columns = list(dict.fromkeys([f.column for f in features] + [lab.column for lab in labels]))
    loader = make_dataloader(ds, num_workers)  # persistent workers: created once, like a training run
    best = {"loader": 0.0, "bare": 0.0}
    rows = {"loader": 0, "bare": 0}
    for _ in range(repeats):
        for name, fn in (
            ("bare", lambda: bare_read(files, columns, batch_size)),
            ("loader", lambda: loader_read(loader)),
        ):
            t0 = time.perf_counter()
            rows[name] = fn()
            best[name] = max(best[name], rows[name] / (time.perf_counter() - t0))
    if rows["loader"] != rows["bare"]:
        raise RuntimeError(f"loader read {rows['loader']} rows, bare read {rows['bare']}")
    return {
        "data_dir": str(data_dir),
        "split": split,
        "rows": rows["loader"],
        "batch_size": batch_size,
        "num_workers": num_workers,
        "repeats": repeats,
        "columns": len(columns),
        "loader_samples_per_s": round(best["loader"]),
        "bare_samples_per_s": round(best["bare"]),
        "ratio": round(best["loader"] / best["bare"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("data_dir")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--split", default="train")
    args = parser.parse_args()
    print(json.dumps(run(args.data_dir, args.batch_size, args.workers, args.repeats, args.split), indent=1))


if __name__ == "__main__":
    main()
