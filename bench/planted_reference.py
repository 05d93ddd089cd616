"""The learnability ceiling on generated Ali-CCP: the planted model's own form, fitted on the train split.

``python -m mptrec.bench.planted_reference --data SHARDS --out result.json`` fits, by maximum a
posteriori on the train split, a model that knows everything about the generator
(:mod:`mptrec.data_loaders.synth`) except the values of its effects:

* which input fields carry signal, and that each acts as one additive per-id effect with the
  generator's N(0, s^2) prior (s from ``CLICK_SCALES`` / ``BUY_SCALES`` / ``T3_SCALES``, the L2
  weight of each table is ``1 / (2 s^2)``);
* the rank-4 user-profile x category interactions (``USER_FACTOR_FIELDS``, ``FACTOR_SCALE``);
* that purchase is modelled given a click with the click logit's shared part as an input, and the
  T3 label (301 != 2) with it too (their weights, 0.6 and -0.5 / std, are learned).

The user id 101 and field 301 are not inputs (as for every model in the harness), so their
effects are left out. What this learner reaches at N training rows is what the data allow a
perfectly specified model; the gap between the planted Bayes AUC and it is the part of the gap
that no model can close at that size. It is a reference, not part of the package's API.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import nn

from mptrec.bench.harness import write_atomic
from mptrec.bench.stats import auc
from mptrec.data_loaders.synth import (
    BUY_SCALES,
    CLICK_SCALES,
    FACTOR_SCALE,
    T3_SCALES,
    USER_FACTOR_FIELDS,
)

#: the click effects a model can see (the user's own effect, field 101, is not an input)
CLICK = {f: s for f, s in CLICK_SCALES.items() if f != "101"}
#: the T3 logit's own effects (125 only splits 301 == 1 from 301 == 3, not 2 from the rest)
T3 = {f: s for f, s in T3_SCALES.items() if f != "125"}
COLUMNS = tuple(sorted({*CLICK, *BUY_SCALES, *T3, *USER_FACTOR_FIELDS, "206"}))
TASKS = (("ctr", "click"), ("cvr", "purchase"), ("scenario", "301"))

Split = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]


def load_split(data: Path, schema: dict[str, Any], split: str) -> Split:
    """Id columns and the three labels of one split (``301`` as the T3 label ``301 != 2``)."""
    files = [str(data / f) for f in schema["splits"][split]["files"]]
    table = pq.ParquetDataset(files).read(columns=[*COLUMNS, "click", "purchase", "301"])
    ids = {c: torch.from_numpy(table.column(c).to_numpy().astype(np.int64)) for c in COLUMNS}
    labels = {"click": table.column("click").to_numpy().astype(np.float32),
              "purchase": table.column("purchase").to_numpy().astype(np.float32),
              "301": (table.column("301").to_numpy() != 2).astype(np.float32)}
    return ids, {k: torch.from_numpy(v) for k, v in labels.items()}


class PlantedForm(nn.Module):
    """The generator's logits with free effects: ``(click, purchase | click, 301 == 2)`` logits.

    Args:
        vocab: field -> number of ids.

    Shapes:
        ``forward(ids)`` with ``ids[f]`` (B,) -> three (B,) logits.
    """

    def __init__(self, vocab: dict[str, int]) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(3))
        self.weight_q = nn.Parameter(torch.tensor(0.6))
        self.weight_t = nn.Parameter(torch.tensor(-0.5))

        def tables(scales: dict[str, float]) -> nn.ParameterDict:
            return nn.ParameterDict({f: nn.Parameter(torch.zeros(vocab[f])) for f in scales})

        self.click, self.buy, self.t3 = tables(CLICK), tables(BUY_SCALES), tables(T3)
        self.user = nn.ParameterDict({f: nn.Parameter(0.01 * torch.randn(vocab[f], 4))
                                      for f in USER_FACTOR_FIELDS})
        self.cat = nn.Parameter(0.01 * torch.randn(vocab["206"], 4))
        self.cat_buy = nn.Parameter(0.01 * torch.randn(vocab["206"], 4))

    def forward(self, ids: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Click logit, purchase-given-click logit, and the logit of ``301 == 2``."""
        zu = sum((self.user[f][ids[f]] for f in USER_FACTOR_FIELDS), torch.zeros(()))
        shared = sum((self.click[f][ids[f]] for f in CLICK), torch.zeros(()))
        shared = shared + (zu * self.cat[ids["206"]]).sum(1)
        buy = sum((self.buy[f][ids[f]] for f in BUY_SCALES), torch.zeros(()))
        t3 = sum((self.t3[f][ids[f]] for f in T3), torch.zeros(()))
        return (self.bias[0] + shared,
                self.bias[1] + self.weight_q * shared + buy + (zu * self.cat_buy[ids["206"]]).sum(1),
                self.bias[2] + self.weight_t * shared + t3)

    def neg_log_prior(self) -> torch.Tensor:
        """``sum ||table||^2 / (2 s^2)`` over every effect table with its planted scale ``s``."""
        total = torch.zeros(())
        for tables, scales in ((self.click, CLICK), (self.buy, BUY_SCALES), (self.t3, T3)):
            for f, s in scales.items():
                total = total + tables[f].pow(2).sum() / (2 * s * s)
        factors = [*self.user.values(), self.cat, self.cat_buy]
        return total + sum((p.pow(2).sum() for p in factors), torch.zeros(())) / (2 * FACTOR_SCALE ** 2)


def neg_log_likelihood(model: PlantedForm, ids: dict[str, torch.Tensor],
                       y: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed log-loss of click, purchase given click, and 301 != 2."""
    click, buy, is2 = model(ids)
    clicked = y["click"] > 0
    return (F.binary_cross_entropy_with_logits(click, y["click"], reduction="sum")
            + F.binary_cross_entropy_with_logits(buy[clicked], y["purchase"][clicked], reduction="sum")
            + F.binary_cross_entropy_with_logits(-is2, y["301"], reduction="sum"))


def scores(model: PlantedForm, ids: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Per task: the score whose AUC is reported (purchase = P(click) P(buy | click))."""
    with torch.no_grad():
        click, buy, is2 = model(ids)
        p = torch.sigmoid(click)
        return {"ctr": p.numpy(), "cvr": (p * torch.sigmoid(buy)).numpy(), "scenario": (-is2).numpy()}


def aucs(model: PlantedForm, split: Split) -> dict[str, float]:
    """Exact AUC per task."""
    s = scores(model, split[0])
    return {t: round(float(auc(split[1][label].numpy(), s[t])), 5) for t, label in TASKS}


def fit(data: Path, *, epochs: int = 40, lr: float = 0.02, batch_size: int = 65536, patience: int = 3,
        seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """MAP fit on the train split with early stopping on the summed validation AUC; test AUCs."""
    torch.manual_seed(seed)
    schema = json.loads((data / "schema.json").read_text())
    vocab = {f["name"]: int(f["num_embeddings"]) for f in schema["features"] if f["kind"] == "sparse"}
    train, valid, test = (load_split(data, schema, s) for s in ("train", "valid", "test"))
    n = len(train[1]["click"])
    model = PlantedForm(vocab)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    curve, bad, t0 = [], 0, time.perf_counter()
    for epoch in range(epochs):
        for sel in torch.randperm(n).split(batch_size):
            ids = {k: v[sel] for k, v in train[0].items()}
            y = {k: v[sel] for k, v in train[1].items()}
            loss = (neg_log_likelihood(model, ids, y) + model.neg_log_prior() * len(sel) / n) / len(sel)
            opt.zero_grad()
            loss.backward()
            opt.step()
        v = aucs(model, valid)
        curve.append({"epoch": epoch + 1, "valid": v})
        if progress:
            print(f"epoch {epoch + 1}: valid AUC {v} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr,
                  flush=True)
        if best is None or sum(v.values()) > best[0]:
            best, bad = (sum(v.values()), {k: t.clone() for k, t in model.state_dict().items()}), 0
        else:
            bad += 1
            if bad >= patience:
                break
    assert best is not None
    model.load_state_dict(best[1])
    return {"train_rows": n, "epochs": len(curve), "wall_s": round(time.perf_counter() - t0, 1),
            "valid": aucs(model, valid), "test": aucs(model, test), "curve": curve,
            "bayes_auc": schema.get("bayes_auc"), "bayes_auc_inputs": schema.get("bayes_auc_inputs")}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mptrec.bench.planted_reference``."""
    p = argparse.ArgumentParser(prog="python -m mptrec.bench.planted_reference", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path,
                   help="shards from `mptrec data synth --dataset aliccp`")
    p.add_argument("--out", required=True, type=Path, help="result JSON (written atomically)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    schema = args.data / "schema.json"
    if not schema.exists():
        print(f"error: {schema}: no such file (generate shards with `mptrec data synth`)", file=sys.stderr)
        return 1
    if "bayes_auc" not in json.loads(schema.read_text()):
        print(f"error: {schema}: not generated data (no bayes_auc); the planted form exists only for "
              "`mptrec data synth --dataset aliccp` shards", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    result = fit(args.data, epochs=args.epochs, lr=args.lr)
    write_atomic(args.out, json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("train_rows", "epochs", "test")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
