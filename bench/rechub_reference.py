"""torch-rechub 0.9.0 peer reference for the Census-income accuracy benchmark.

Trains torch-rechub's own SharedBottom / MMOE / PLE (and a single-task MLP built from rechub's
``EmbeddingLayer`` + ``MLP``) on the Parquet shards written by ``mptrec data convert --format
census``, so both sides see identical splits and features, and reports exact test AUCs
(sklearn ``roc_auc_score``). Standalone: it never imports ``mptrec`` or TorchRec, and runs with
the isolated venv made by ``scripts/rechub_env.sh``::

    bash scripts/rechub_env.sh
    runs/.rechub-venv/bin/python bench/rechub_reference.py --data runs/census/data --seed 1685480945 \\
        --exclude education --out runs/rechub/s1685480945.json --predictions runs/rechub/pred-s1685480945

Training: rechub's ``MTLTrainer`` does the optimisation (its Adam over all parameters, its loss
``mean_k BCE_k``, one ``train_one_epoch`` per epoch). Its ``fit`` is not used: it early-stops on
one task's validation AUC only and restores the best weights only when early stopping fires (a
run that uses all epochs keeps the last weights). The epoch loop here instead validates after
every epoch, early-stops with rechub's ``EarlyStopper`` on the SUM of the model's task AUCs, and
always evaluates the test split with the best-validation weights.

The data-reading half (argument parsing, schema, Parquet to arrays, atomic writes) imports only
numpy and pyarrow, so tests can import it without torch-rechub; torch and torch_rechub are
imported inside the functions that train.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

MODELS = ("shared_bottom", "mmoe", "ple", "single_income", "single_marital", "single_education")
# single-task models: the label each one learns
SINGLE_TASK_LABEL = {
    "single_income": "income",
    "single_marital": "marital",
    "single_education": "education_label",
}
# Multi-task models learn T1 income + T2 marital (the paper's Table 2 stage 1, as in
# configs/census_pretrain.toml and rechub's own examples/ranking/run_census.py); --tasks changes it.
DEFAULT_TASKS = ("income", "marital")
SPLITS = ("train", "valid", "test")

# Architecture, following the paper's Census settings as far as rechub's classes allow.
EMBED_DIM = 4
MMOE_EXPERTS = 3
MMOE_EXPERT_DIMS = (256, 128)
PLE_LEVELS = 2
PLE_SPECIFIC = 1
PLE_SHARED = 1
PLE_EXPERT_DIMS = (256,)
BOTTOM_DIMS = (256, 128)
TOWER_DIMS = (64, 32)
SINGLE_DIMS = (256, 128, 64, 32)
EVAL_BATCH = 8192


@dataclass(frozen=True)
class Feature:
    """One input column of the converted data (``schema.json`` ``features`` entry)."""

    name: str
    column: str
    kind: str  # "dense" or "sparse"
    vocab: int | None = None  # number of ids of a sparse feature


@dataclass
class SplitArrays:
    """One split as arrays: inputs by feature name, labels by label column, in file order."""

    x: dict[str, np.ndarray]
    y: dict[str, np.ndarray]
    rows: int


# --------------------------------------------------------------------------- arguments


def _names(values: Sequence[str] | None) -> list[str]:
    """Flatten ``["a,b", "c"]`` into ``["a", "b", "c"]`` (both spellings are accepted)."""
    out: list[str] = []
    for v in values or ():
        out += [s.strip() for s in v.split(",") if s.strip()]
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="torch-rechub 0.9.0 reference: Census-income AUC on mptrec's converted splits.")
    p.add_argument("--data", required=True, type=Path,
                   help="folder from `mptrec data convert --format census` (schema.json, train/valid/test)")
    p.add_argument("--seed", required=True, type=int, help="seeds torch, numpy, random and the shuffling")
    p.add_argument("--models", nargs="+", default=[",".join(MODELS)],
                   help=f"comma- or space-separated subset of {','.join(MODELS)} (default: all)")
    p.add_argument("--tasks", nargs="+", default=[",".join(DEFAULT_TASKS)],
                   help="label columns of the multi-task models (default: income,marital)")
    p.add_argument("--exclude", nargs="*", default=[], help="feature names to drop, e.g. education")
    p.add_argument("--out", required=True, type=Path, help="result JSON (written atomically)")
    p.add_argument("--predictions", type=Path, default=None,
                   help="folder for per-model test predictions, MODEL.parquet: row + one column per task")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--patience", type=int, default=5,
                   help="stop after this many epochs without a better validation AUC sum")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4,
                   help="Adam weight decay (1e-4: rechub's examples/ranking/run_census.py default)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and normalise the arguments (list options flattened and checked)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.models = _names(args.models)
    args.tasks = _names(args.tasks)
    args.exclude = _names(args.exclude)
    bad = [m for m in args.models if m not in MODELS]
    if bad or not args.models:
        parser.error(f"--models: unknown {bad or 'empty list'}; choose from {', '.join(MODELS)}")
    if len(set(args.models)) != len(args.models):
        parser.error(f"--models: repeated name in {args.models}")
    if not args.tasks or len(set(args.tasks)) != len(args.tasks):
        parser.error(f"--tasks: need distinct label names, got {args.tasks}")
    for name in ("epochs", "patience", "batch_size", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


# --------------------------------------------------------------------------- data


def load_schema(data: Path) -> dict[str, Any]:
    path = Path(data) / "schema.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --data must be a folder made by `mptrec data convert`")
    return json.loads(path.read_text())


def select_features(schema: dict[str, Any], exclude: Sequence[str] = ()) -> list[Feature]:
    """The schema's input features in schema order, minus ``exclude`` (each must exist)."""
    feats = []
    for f in schema["features"]:
        kind = f["kind"]
        if kind not in ("dense", "sparse"):
            raise ValueError(f"feature {f['name']!r}: kind {kind!r} is not supported (dense or sparse)")
        if kind == "sparse" and f.get("multivalent", False):
            raise ValueError(f"feature {f['name']!r}: multivalent sparse features are not supported")
        vocab = int(f["num_embeddings"]) if kind == "sparse" else None
        feats.append(Feature(f["name"], f.get("column", f["name"]), kind, vocab))
    unknown = sorted(set(exclude) - {f.name for f in feats})
    if unknown:
        raise ValueError(f"--exclude: unknown feature(s) {unknown}; features are {[f.name for f in feats]}")
    kept = [f for f in feats if f.name not in set(exclude)]
    if not kept:
        raise ValueError("no input feature left after --exclude")
    return kept


def check_labels(schema: dict[str, Any], labels: Sequence[str]) -> None:
    """Each label must be a binary label column of the schema."""
    declared = schema.get("labels", {})
    for name in labels:
        if name not in declared:
            raise ValueError(f"label {name!r} not in schema labels {sorted(declared)}")
        values = declared[name].get("values")
        if values is not None and sorted(values) != [0, 1]:
            raise ValueError(f"label {name!r} is not binary (values {values})")


def split_files(data: Path, schema: dict[str, Any], split: str) -> list[Path]:
    """The split's Parquet shards in the order the schema lists them (that order defines ``row``)."""
    entry = schema.get("splits", {}).get(split)
    if entry and entry.get("files"):
        files = [Path(data) / f for f in entry["files"]]
    else:
        files = sorted((Path(data) / split).glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no Parquet files for split {split!r} under {data}")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"split {split!r}: missing {missing}")
    return files


def read_split(data: Path, schema: dict[str, Any], split: str, features: Sequence[Feature],
               labels: Sequence[str]) -> SplitArrays:
    """Read one split into arrays: dense float32, sparse int64 ids (checked against the
    vocabulary), labels float32 0/1; rows in file order."""
    columns = [f.column for f in features] + list(labels)
    tables = []
    for path in split_files(data, schema, split):
        names = set(pq.read_schema(path).names)
        missing = [c for c in columns if c not in names]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}")
        tables.append(pq.read_table(path, columns=columns))
    table = pa.concat_tables(tables)
    x: dict[str, np.ndarray] = {}
    for f in features:
        col = table.column(f.column)
        if col.null_count:
            raise ValueError(f"{split}: column {f.column!r} has {col.null_count} nulls")
        arr = col.to_numpy()
        if f.kind == "dense":
            x[f.name] = np.array(arr, dtype=np.float32)  # a writable copy of the Arrow buffer
        else:
            ids = np.array(arr, dtype=np.int64)
            if ids.size and (ids.min() < 0 or ids.max() >= (f.vocab or 0)):
                raise ValueError(f"{split}: feature {f.name!r} has ids in [{ids.min()}, {ids.max()}], "
                                 f"outside its vocabulary of {f.vocab}")
            x[f.name] = ids
    y: dict[str, np.ndarray] = {}
    for name in labels:
        arr = np.asarray(table.column(name).to_numpy(), dtype=np.float32)
        if not np.isin(arr, (0.0, 1.0)).all():
            raise ValueError(f"{split}: label {name!r} has values other than 0/1")
        y[name] = arr
    return SplitArrays(x=x, y=y, rows=table.num_rows)


def read_data(data: Path, schema: dict[str, Any], features: Sequence[Feature],
              labels: Sequence[str]) -> dict[str, SplitArrays]:
    return {s: read_split(data, schema, s, features, labels) for s in SPLITS}


# --------------------------------------------------------------------------- outputs


def write_json_atomic(path: Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def write_predictions(path: Path, probs: dict[str, np.ndarray]) -> None:
    """Test predictions as Parquet: ``row`` (position in the test split, file order) and one
    probability column per task, written to a temp file then renamed into place."""
    path = Path(path)
    n = len(next(iter(probs.values())))
    cols = {"row": pa.array(np.arange(n, dtype=np.int64))}
    for task, p in probs.items():
        if len(p) != n:
            raise ValueError(f"predictions of {task!r}: {len(p)} rows, expected {n}")
        cols[task] = pa.array(np.asarray(p, dtype=np.float64))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(pa.table(cols), tmp)
    os.replace(tmp, path)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- training (torch-rechub)


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def model_tasks(name: str, mtl_tasks: Sequence[str]) -> list[str]:
    return [SINGLE_TASK_LABEL[name]] if name in SINGLE_TASK_LABEL else list(mtl_tasks)


def build_model(name: str, features: Sequence[Feature], n_task: int) -> Any:
    """A torch-rechub model over fresh rechub feature objects (rechub caches each feature's
    embedding table on the feature object, so every model gets its own)."""
    from torch import nn
    from torch_rechub.basic.features import DenseFeature, SparseFeature
    from torch_rechub.basic.layers import MLP, EmbeddingLayer, PredictionLayer
    from torch_rechub.models.multi_task import MMOE, PLE, SharedBottom

    rh = [SparseFeature(f.name, f.vocab, embed_dim=EMBED_DIM) if f.kind == "sparse" else DenseFeature(f.name)
          for f in features]
    task_types = ["classification"] * n_task
    towers = [{"dims": list(TOWER_DIMS)} for _ in range(n_task)]
    if name == "shared_bottom":
        return SharedBottom(rh, task_types, bottom_params={"dims": list(BOTTOM_DIMS)},
                            tower_params_list=towers)
    if name == "mmoe":
        return MMOE(rh, task_types, MMOE_EXPERTS, expert_params={"dims": list(MMOE_EXPERT_DIMS)},
                    tower_params_list=towers)
    if name == "ple":
        return PLE(rh, task_types, n_level=PLE_LEVELS, n_expert_specific=PLE_SPECIFIC,
                   n_expert_shared=PLE_SHARED, expert_params={"dims": list(PLE_EXPERT_DIMS)},
                   tower_params_list=towers)
    if name in SINGLE_TASK_LABEL:

        class SingleTaskMLP(nn.Module):
            """rechub's ranking-model layout without the wide/FM part: EmbeddingLayer -> MLP -> sigmoid."""

            def __init__(self) -> None:
                super().__init__()
                self.features = rh
                self.embedding = EmbeddingLayer(rh)
                self.mlp = MLP(sum(f.embed_dim for f in rh), output_layer=True, dims=list(SINGLE_DIMS))
                self.predict_layer = PredictionLayer("classification")

            def forward(self, x: dict[str, Any]) -> Any:  # -> (B, 1) probabilities
                return self.predict_layer(self.mlp(self.embedding(x, self.features, squeeze_dim=True)))

        return SingleTaskMLP()
    raise ValueError(f"unknown model {name!r}")


def _tensors(split: SplitArrays, tasks: Sequence[str]) -> tuple[dict[str, Any], Any]:
    import torch

    x = {k: torch.from_numpy(v) for k, v in split.x.items()}
    y = torch.from_numpy(np.stack([split.y[t] for t in tasks], axis=1))
    return x, y


def _train_loader(x: dict[str, Any], y: Any, batch_size: int, seed: int) -> Any:
    """A plain DataLoader yielding ``(dict feature -> tensor, labels (B, n_task))`` like rechub's
    DataGenerator, but sliced a whole batch at a time (rechub's per-row TorchDataset + collate is
    the slowest part of a CPU epoch)."""
    import torch
    from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

    class Rows(Dataset):
        def __len__(self) -> int:
            return len(y)

        def __getitem__(self, idx: list[int]) -> tuple[dict[str, Any], Any]:
            i = torch.as_tensor(idx)
            return {k: v[i] for k, v in x.items()}, y[i]

    ds = Rows()
    gen = torch.Generator().manual_seed(seed)
    # BatchNorm cannot train on a batch of one row: drop a last batch of exactly one.
    sampler = BatchSampler(RandomSampler(ds, generator=gen), batch_size, drop_last=len(ds) % batch_size == 1)
    return DataLoader(ds, sampler=sampler, batch_size=None)


def predict(model: Any, x: dict[str, Any]) -> np.ndarray:
    import torch

    model.eval()
    n = len(next(iter(x.values())))
    out = []
    with torch.no_grad():
        for s in range(0, n, EVAL_BATCH):
            out.append(model({k: v[s:s + EVAL_BATCH] for k, v in x.items()}).double().numpy())
    return np.concatenate(out, axis=0)


def aucs(y: Any, probs: np.ndarray, tasks: Sequence[str]) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    yn = y.numpy()
    return {t: float(roc_auc_score(yn[:, i], probs[:, i])) for i, t in enumerate(tasks)}


def train_one(name: str, tasks: Sequence[str], features: Sequence[Feature], data: dict[str, SplitArrays],
              args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Train one model with early stopping on the validation AUC sum; test with the best weights."""
    from torch_rechub.basic.callback import EarlyStopper
    from torch_rechub.trainers import MTLTrainer

    seed_everything(args.seed)  # every model starts from the same seed, whatever ran before it
    model = build_model(name, features, len(tasks))
    trainer = MTLTrainer(model, task_types=["classification"] * len(tasks),
                         optimizer_params={"lr": args.lr, "weight_decay": args.weight_decay},
                         n_epoch=args.epochs, earlystop_patience=args.patience, device="cpu")
    stopper = EarlyStopper(patience=args.patience, mode="max")
    xt, yt = _tensors(data["train"], tasks)
    xv, yv = _tensors(data["valid"], tasks)
    loader = _train_loader(xt, yt, args.batch_size, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[rechub {name}] tasks {list(tasks)}, {n_params:,} parameters, {data['train'].rows} train rows")
    history: list[dict[str, Any]] = []
    best_epoch, t0 = 0, time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        te = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # train_one_epoch prints its losses
            losses = trainer.train_one_epoch(loader)
        valid = aucs(yv, predict(model, xv), tasks)
        score = sum(valid.values())
        improved = score > stopper.best_auc
        stop = stopper.stop_training(score, model.state_dict())
        if improved:
            best_epoch = epoch
        history.append({"epoch": epoch, "train_loss": dict(zip(tasks, map(float, losses))),
                        "valid_auc": valid})
        log(f"[rechub {name}] epoch {epoch}/{args.epochs} loss "
            + " ".join(f"{t}={v:.4f}" for t, v in zip(tasks, losses))
            + " | valid auc " + " ".join(f"{t}={v:.4f}" for t, v in valid.items())
            + f" sum={score:.4f}{' *' if improved else ''} (best epoch {best_epoch})"
            + f" {time.perf_counter() - te:.1f}s")
        if stop:
            break
    train_s = time.perf_counter() - t0
    model.load_state_dict(stopper.best_weights)
    valid = aucs(yv, predict(model, xv), tasks)
    xs, ys = _tensors(data["test"], tasks)
    probs = predict(model, xs)
    test = aucs(ys, probs, tasks)
    log(f"[rechub {name}] best epoch {best_epoch}: test auc "
        + " ".join(f"{t}={v:.4f}" for t, v in test.items()) + f" ({train_s:.0f}s)")
    result = {
        "tasks": {t: {"test_auc": test[t], "valid_auc": valid[t]} for t in tasks},
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "train_s": round(train_s, 2),
        "params": n_params,
        "history": history,
    }
    return result, {t: probs[:, i] for i, t in enumerate(tasks)}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # rechub's trainer wraps every epoch in a tqdm bar; this tqdm reads TQDM_* once, at import.
    os.environ.setdefault("TQDM_DISABLE", "1")
    import importlib.metadata as md

    import torch

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    schema = load_schema(args.data)
    features = select_features(schema, args.exclude)
    mtl = [m for m in args.models if m not in SINGLE_TASK_LABEL]
    labels = list(dict.fromkeys([*(args.tasks if mtl else []),
                                 *(SINGLE_TASK_LABEL[m] for m in args.models if m in SINGLE_TASK_LABEL)]))
    check_labels(schema, labels)
    data = read_data(args.data, schema, features, labels)
    log(f"[rechub] {args.data}: rows " + ", ".join(f"{s}={d.rows}" for s, d in data.items())
        + f"; {len(features)} features (excluded {args.exclude or 'none'}); models {args.models}")
    out: dict[str, Any] = {
        "library": "torch-rechub",
        "version": md.version("torch-rechub"),
        "torch": torch.__version__,
        "seed": args.seed,
        "data": str(Path(args.data).resolve()),
        "exclude": args.exclude,
        "features": [f.name for f in features],
        "input_dim": sum(EMBED_DIM if f.kind == "sparse" else 1 for f in features),
        "rows": {s: d.rows for s, d in data.items()},
        "multi_task_tasks": list(args.tasks),
        "hparams": {
            "embed_dim": EMBED_DIM, "batch_size": args.batch_size, "optimizer": "Adam", "lr": args.lr,
            "weight_decay": args.weight_decay, "epochs": args.epochs, "patience": args.patience,
            "early_stop": "sum of validation AUCs of the model's tasks, best weights restored",
            "loss": "rechub MTLTrainer: mean over tasks of BCE",
            "mmoe": {"experts": MMOE_EXPERTS, "expert": list(MMOE_EXPERT_DIMS), "tower": list(TOWER_DIMS)},
            "ple": {"levels": PLE_LEVELS, "specific": PLE_SPECIFIC, "shared": PLE_SHARED,
                    "expert": list(PLE_EXPERT_DIMS), "tower": list(TOWER_DIMS)},
            "shared_bottom": {"bottom": list(BOTTOM_DIMS), "tower": list(TOWER_DIMS)},
            "single_task_mlp": list(SINGLE_DIMS),
            "threads": args.threads,
        },
        "models": {},
        "complete": False,
    }
    for name in args.models:
        tasks = model_tasks(name, args.tasks)
        result, probs = train_one(name, tasks, features, data, args)
        if args.predictions is not None:
            path = Path(args.predictions) / f"{name}.parquet"
            write_predictions(path, probs)
            result["predictions"] = str(path)
        out["models"][name] = result
        write_json_atomic(args.out, out)  # partial results survive an interrupted run
    out["complete"] = True
    out["wall_s"] = round(time.perf_counter() - t_start, 1)
    write_json_atomic(args.out, out)
    for name, r in out["models"].items():
        print(f"{name:18s} " + "  ".join(f"{t} {v['test_auc']:.4f}" for t, v in r["tasks"].items())
              + f"  (best epoch {r['best_epoch']}/{r['epochs_run']}, {r['train_s']:.0f}s)")
    print(f"wrote {args.out} ({out['wall_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
