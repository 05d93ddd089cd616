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

The data half (argument parsing, schema, Parquet to arrays, atomic writes) is
``bench/rechub_data.py``: numpy and pyarrow only, so tests can import it without torch-rechub, and
re-exported here. The rechub venv has no ``mptrec``: run as a script, this file imports its folder
as the package ``bench`` (PEP 366: ``__package__`` set, the repository root appended to
``sys.path``), so the one relative import finds the data half either way. torch and torch_rechub
are imported inside the functions that train.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

if not __package__:  # run as a script (the rechub venv has no mptrec): bench/ is the package (PEP 366)
    sys.path.append(str(Path(__file__).resolve().parents[1]))
    __package__ = "bench"

from .rechub_data import (
    DEFAULT_TASKS,
    MODELS,
    SINGLE_TASK_LABEL,
    SPLITS,
    Feature,
    SplitArrays,
    build_parser,
    check_labels,
    load_schema,
    log,
    parse_args,
    read_data,
    read_split,
    select_features,
    split_files,
    write_json_atomic,
    write_predictions,
)

__all__ = [
    "DEFAULT_TASKS", "MODELS", "SINGLE_TASK_LABEL", "SPLITS", "Feature", "SplitArrays", "aucs", "build_model",
    "build_parser", "check_labels", "load_schema", "log", "main", "model_tasks", "parse_args", "predict",
    "read_data", "read_split", "select_features", "seed_everything", "split_files", "train_one",
    "write_json_atomic", "write_predictions",
]

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
