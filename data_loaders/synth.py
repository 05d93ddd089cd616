"""Synthetic Ali-CCP shards from a planted model (``mptrec data synth``).

Same columns, types and field names as converted Ali-CCP, with the real vocabulary sizes
(:data:`ALICCP_VOCAB_SIZES`; the list fields and 210 use :data:`ALICCP_ASSUMED_VOCAB_SIZES`).

The planted model (all of it drawn from ``seed``):

* users (field 101) and items (205) have Zipf-like frequencies; a user fixes the profile fields
  121-129 and the user's favourite entities in the behaviour lists (``*_14``); an item fixes its
  category 206, shop 207 and brand 216; 210 lists the category's intention node plus random
  ones; 508 is a (121, category) cross, 509/702/853 hashed user crosses, often missing (0);
* click: ``sigmoid(c0 + field effects of 121-129, 206, 216, 207, 508 + small user and item
  effects + <user factors of 121/122/125, category factors> + scenario effect of 301)``;
* purchase (only after a click): ``sigmoid(q0 + 0.6 * shared part + own effects of 207, 124,
  216 and a second category interaction)``;
* field 301 in {1, 2, 3}: ``P(301 == 2) = sigmoid(t0 - 0.5 * standardised shared part + own
  effects of 122, 129, 206 and 207)``, so the T3 label ``301 != 2`` shares signal with
  click/purchase but also needs its own;
* ``c0``, ``q0``, ``t0`` are calibrated so click, purchase-given-click and 301==2 rates match
  the options. The signal runs through moderate-vocabulary fields so a small model can learn it.

Rows are generated in blocks of 65,536 seeded by ``(seed, block)``, so the data do not depend
on the shard count; splits are contiguous row ranges. ``schema.json["bayes_auc"]`` holds the
expected AUC of the planted probabilities per label (exact, by sorting), on the first 4M rows.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
from tqdm import tqdm

from mptrec.data_loaders.aliccp import aliccp_arrow_schema, aliccp_schema, list_array
from mptrec.data_loaders.layout import DEFAULT_ROW_GROUP_SIZE, split_bounds, write_schema
from mptrec.data_loaders.schema import (
    ALICCP_ASSUMED_VOCAB_SIZES,
    ALICCP_FIELDS,
    ALICCP_MULTI_FIELDS,
    ALICCP_VOCAB_SIZES,
    DataError,
)
from mptrec.data_loaders.shard_writer import SplitWriter, staged_out_dir

BLOCK = 65_536
AUC_ROWS = 4_000_000
PROFILE = ("121", "122", "124", "125", "126", "127", "128", "129")
LISTS = {"109_14": "206", "110_14": "207", "127_14": "216", "150_14": "210"}  # list field -> entity field
ZIPF_A = {"101": 0.9, "205": 1.0, "206": 1.1, "207": 1.0, "216": 1.05, "210": 1.0}
#: Prior scales (std of the N(0, s^2) per-id effects) of the planted logits, in draw order.
#: ``mptrec.bench.planted_reference`` fits this form with these priors.
CLICK_SCALES = {"121": 0.45, "122": 0.35, "124": 0.2, "125": 0.3, "126": 0.2, "127": 0.2, "128": 0.15,
                "129": 0.2, "206": 0.6, "216": 0.3, "207": 0.2, "508": 0.45, "101": 0.25, "205": 0.25}
BUY_SCALES = {"207": 0.5, "124": 0.4, "216": 0.4}
T3_SCALES = {"122": 0.6, "129": 0.5, "206": 0.6, "207": 0.4, "125": 0.8}
#: user-profile fields whose k=4 factors meet the category's (click and purchase interactions)
USER_FACTOR_FIELDS = ("121", "122", "125")
FACTOR_SCALE = 0.45
F = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


def auc(scores: F, pos: F, neg: F, self_pairs: bool = False) -> float:
    """Exact (weighted) ROC AUC by sorting; ties count one half.

    Args:
        scores: one score per row.
        pos: positive weight per row (the 0/1 label, or the probability of 1).
        neg: negative weight per row (``1 - label`` or ``1 - p``).
        self_pairs: drop the pairs of a row with itself (when ``pos``/``neg`` are probabilities).

    Returns:
        The AUC (nan when there are no positive or no negative weights).
    """
    order = np.argsort(scores, kind="mergesort")
    s, wp, wn = scores[order], pos[order], neg[order]
    starts = np.concatenate([[0], np.flatnonzero(np.diff(s)) + 1])
    gp, gn = np.add.reduceat(wp, starts), np.add.reduceat(wn, starts)
    num = float(np.sum(gp * (np.cumsum(gn) - gn + 0.5 * gn)))
    den = float(gp.sum() * gn.sum())
    if self_pairs:
        own = float(np.sum(wp * wn))
        num, den = num - 0.5 * own, den - own
    return num / den if den > 0 else float("nan")


def _sigmoid(x: F) -> F:
    return np.asarray(1.0 / (1.0 + np.exp(-x)))


def _hash(a: I64, b: I64, size: int) -> I64:
    """Ids in [1, size) from a hashed pair (uint64 arithmetic wraps)."""
    h = a.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) ^ b.astype(np.uint64) * np.uint64(
        0xC2B2AE3D27D4EB4F
    )
    h ^= h >> np.uint64(29)
    return (h % np.uint64(size - 1)).astype(np.int64) + 1


class PlantedModel:
    """The planted world: entity tables, effects and calibrated intercepts (see module doc)."""

    def __init__(self, seed: int, click_rate: float, purchase_rate: float, scenario2_rate: float) -> None:
        for name, r in (
            ("click_rate", click_rate),
            ("purchase_rate", purchase_rate),
            ("scenario2_rate", scenario2_rate),
        ):
            if not 0.0 < r < 1.0:
                raise DataError(f"--{name.replace('_', '-')} must be in (0, 1), got {r}")
        rng = np.random.default_rng([seed, 0])
        self.vocab = {**ALICCP_VOCAB_SIZES, **ALICCP_ASSUMED_VOCAB_SIZES}
        self.cdf: dict[str, F] = {}
        self.perm: dict[str, I64] = {}
        for f in ("101", "205", "206", "207", "216", "210", *PROFILE):
            v = self.vocab[f] - 1
            w = (np.arange(v) + 2.0) ** -ZIPF_A.get(f, 0.7)
            self.cdf[f] = np.cumsum(w) / w.sum()
            self.perm[f] = rng.permutation(v).astype(np.int64) + 1
        nu, ni = self.vocab["101"], self.vocab["205"]
        self.profile = {f: self._draw(f, nu, rng) for f in PROFILE}
        self.item = {f: self._draw(f, ni, rng) for f in ("206", "207", "216")}
        self.favourite = {f: self._draw(e, nu, rng) for f, e in LISTS.items()}
        self.node_of_cat = self._draw("210", self.vocab["206"], rng)

        def eff(f: str, scale: float) -> F:
            return rng.normal(0.0, scale, self.vocab[f])

        self.click_eff = {f: eff(f, scale) for f, scale in CLICK_SCALES.items()}
        self.buy_eff = {f: eff(f, scale) for f, scale in BUY_SCALES.items()}
        self.t3_eff = {f: eff(f, scale) for f, scale in T3_SCALES.items()}
        self.scenario_click = np.array([0.0, -0.25, 0.0, 0.3])  # by 301 value
        k = 4
        self.user_factors = {f: rng.normal(0.0, FACTOR_SCALE, (self.vocab[f], k)) for f in USER_FACTOR_FIELDS}
        self.cat_factors = rng.normal(0.0, FACTOR_SCALE, (self.vocab["206"], k))
        self.cat_factors_buy = rng.normal(0.0, FACTOR_SCALE, (self.vocab["206"], k))
        self.c0 = self.q0 = self.t0 = 0.0
        self.shared_mean, self.shared_std = 0.0, 1.0
        self._calibrate(np.random.default_rng([seed, 2]), click_rate, purchase_rate, scenario2_rate)

    def _draw(self, f: str, n: int, rng: np.random.Generator) -> I64:
        rank = np.searchsorted(self.cdf[f], rng.random(n), side="right")
        return self.perm[f][np.minimum(rank, len(self.perm[f]) - 1)]

    def _calibrate(self, rng: np.random.Generator, click: float, buy: float, scen2: float) -> None:
        cols, parts = self.features(BLOCK, rng)
        self.shared_mean, self.shared_std = float(parts["shared"].mean()), float(parts["shared"].std()) or 1.0

        def solve(target: float, logit: F, weight: F | None = None) -> float:
            lo, hi = -30.0, 30.0
            for _ in range(60):
                mid = (lo + hi) / 2
                p = _sigmoid(logit + mid)
                rate = float(np.average(p, weights=weight))
                lo, hi = (mid, hi) if rate < target else (lo, mid)
            return (lo + hi) / 2

        self.t0 = solve(scen2, self._t3_logit(cols, parts))
        cols["301"] = self._scenario(cols, parts, rng)
        self.c0 = solve(click, self._click_logit(cols, parts))
        pc = _sigmoid(self.c0 + self._click_logit(cols, parts))
        self.q0 = solve(buy, self._buy_logit(cols, parts), weight=pc)

    def features(self, n: int, rng: np.random.Generator) -> tuple[dict[str, Any], dict[str, F]]:
        """Draw ``n`` rows of features (301 not yet) and the shared part of the logits."""
        u, item = self._draw("101", n, rng), self._draw("205", n, rng)
        cols: dict[str, Any] = {"101": u, "205": item}
        for f in PROFILE:
            cols[f] = self.profile[f][u]
        for f in ("206", "207", "216"):
            cols[f] = self.item[f][item]
        cat = cols["206"]
        cols["508"] = np.where(rng.random(n) < 0.9, _hash(cols["121"], cat, self.vocab["508"]), 0)
        for f, other, present in (("509", cols["207"], 0.5), ("702", cols["216"], 0.4), ("853", cat, 0.6)):
            cols[f] = np.where(rng.random(n) < present, _hash(u, other, self.vocab[f]), 0)
        n210 = rng.integers(1, 4, n)
        extra = self._draw("210", int(n210.sum()), rng)
        extra[np.cumsum(n210) - n210] = self.node_of_cat[cat]  # first node: the category's
        cols["210"] = (n210, extra)
        for f, entity in LISTS.items():
            lens = np.minimum(rng.poisson(2.0, n) + 1, 8)
            owner = np.repeat(u, lens)
            vals = np.where(
                rng.random(owner.size) < 0.5, self.favourite[f][owner], self._draw(entity, owner.size, rng)
            )
            cols[f] = (lens, (vals - 1) % (self.vocab[f] - 1) + 1)
        zu = sum(self.user_factors[f][cols[f]] for f in USER_FACTOR_FIELDS)
        e = self.click_eff
        shared = sum(e[f][cols[f]] for f in (*PROFILE, "206", "216", "207", "508", "101", "205"))
        shared = shared + np.einsum("ij,ij->i", zu, self.cat_factors[cat])
        return cols, {"shared": shared, "buy_inter": np.einsum("ij,ij->i", zu, self.cat_factors_buy[cat])}

    def _t3_logit(self, cols: Mapping[str, Any], parts: Mapping[str, F]) -> F:
        z = (parts["shared"] - self.shared_mean) / self.shared_std
        return np.asarray(-0.5 * z + sum(self.t3_eff[f][cols[f]] for f in ("122", "129", "206", "207")))

    def _scenario(self, cols: Mapping[str, Any], parts: Mapping[str, F], rng: np.random.Generator) -> I64:
        p2 = _sigmoid(self.t0 + self._t3_logit(cols, parts))
        is2 = rng.random(len(p2)) < p2
        three = rng.random(len(p2)) < _sigmoid(self.t3_eff["125"][cols["125"]])
        return np.where(is2, 2, np.where(three, 3, 1)).astype(np.int64)

    def _click_logit(self, cols: Mapping[str, Any], parts: Mapping[str, F]) -> F:
        return np.asarray(parts["shared"] + self.scenario_click[cols["301"]])

    def _buy_logit(self, cols: Mapping[str, Any], parts: Mapping[str, F]) -> F:
        own = sum(self.buy_eff[f][cols[f]] for f in ("207", "124", "216"))
        return np.asarray(0.6 * parts["shared"] + own + parts["buy_inter"])

    def input_probs(self, cols: Mapping[str, Any], parts: Mapping[str, F]) -> dict[str, F]:
        """The planted probabilities as seen without the user id 101 and field 301 (not inputs).

        The user's own click effect (``click_eff["101"]``, N(0, 0.25^2) per user) is integrated
        out with the probit approximation ``E[sigmoid(a + s Z)] ~ sigmoid(a / sqrt(1 + pi s^2 / 8))``
        and 301 is summed out with its conditional probabilities. The hashed user crosses
        (509/702/853) and the behaviour lists still reveal part of the user, so a model can do
        somewhat better than these probabilities: their AUC is a lower bound of the best AUC
        reachable from the inputs, and ``bayes_auc`` (every planted effect) the upper bound.
        """
        var_user = 0.25 ** 2
        e_user = self.click_eff["101"][cols["101"]]
        shared = parts["shared"] - e_user

        def smooth(logit: F, scale: float) -> F:
            return _sigmoid(logit / np.sqrt(1.0 + np.pi * scale ** 2 * var_user / 8.0))

        t3 = -0.5 * (shared - self.shared_mean) / self.shared_std + sum(
            self.t3_eff[f][cols[f]] for f in ("122", "129", "206", "207"))
        p2 = smooth(self.t0 + t3, 0.5 / self.shared_std)
        p3 = (1.0 - p2) * _sigmoid(self.t3_eff["125"][cols["125"]])
        p_value = {1: 1.0 - p2 - p3, 2: p2, 3: p3}
        click = sum(pv * smooth(self.c0 + shared + self.scenario_click[v], 1.0) for v, pv in p_value.items())
        own = sum(self.buy_eff[f][cols[f]] for f in ("207", "124", "216"))
        q = smooth(self.q0 + 0.6 * shared + own + parts["buy_inter"], 0.6)
        return {"click": np.asarray(click), "purchase": np.asarray(click * q), "301": 1.0 - p2}

    def block(self, seed: int, index: int, n: int) -> tuple[dict[str, Any], dict[str, F]]:
        """Rows of block ``index``: columns (labels included) and planted probabilities."""
        rng = np.random.default_rng([seed, 1, index])
        cols, parts = self.features(n, rng)
        p_not2 = 1.0 - _sigmoid(self.t0 + self._t3_logit(cols, parts))
        cols["301"] = self._scenario(cols, parts, rng)
        p_click = _sigmoid(self.c0 + self._click_logit(cols, parts))
        q = _sigmoid(self.q0 + self._buy_logit(cols, parts))
        click = rng.random(n) < p_click
        cols["click"] = click.astype(np.int8)
        cols["purchase"] = (click & (rng.random(n) < q)).astype(np.int8)
        seen = {f"{k}@inputs": v for k, v in self.input_probs(cols, parts).items()}
        return cols, {"click": p_click, "purchase": p_click * q, "301": p_not2, **seen}


def _table(cols: Mapping[str, Any], schema: pa.Schema) -> pa.Table:
    arrays = []
    for name in schema.names:
        c = cols[name]
        arrays.append(list_array(*c) if isinstance(c, tuple) else pa.array(c))
    return pa.Table.from_arrays(arrays, schema=schema)


def generate_aliccp(
    out_dir: str | os.PathLike[str],
    *,
    rows: int,
    shards: int,
    seed: int,
    split: dict[str, float],
    click_rate: float = 0.04,
    purchase_rate: float = 0.005,
    scenario2_rate: float = 0.3,
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Generate synthetic Ali-CCP shards (see the module docstring).

    Args:
        out_dir: output shard folder.
        rows: total rows.
        shards: files per split.
        seed: everything is a function of it (and ``rows``/``split`` for the split ranges).
        split: split name -> fraction (contiguous row ranges in this order).
        click_rate: mean click probability.
        purchase_rate: mean purchase probability given a click.
        scenario2_rate: fraction of rows with field 301 == 2 (T3 label 0).
        row_group_size: rows per row group.
        overwrite: replace existing shards.

    Returns:
        The schema written (with ``bayes_auc``).
    """
    if rows <= 0:
        raise DataError(f"--rows must be positive, got {rows}")
    model = PlantedModel(seed, click_rate, purchase_rate, scenario2_rate)
    with staged_out_dir(out_dir, overwrite) as out:
        schema = aliccp_arrow_schema(ALICCP_MULTI_FIELDS)
        bounds = split_bounds(rows, split)
        writers = [
            SplitWriter(out, s, bounds[i + 1] - bounds[i], shards, schema, row_group_size)
            for i, s in enumerate(split)
        ]
        probs, labels, positives = _write_blocks(model, seed, rows, bounds, writers)
        splits_meta = {w.split: w.close() for w in writers}
        bayes, realized, seen = _planted_aucs(probs, labels)
        vocab = {**ALICCP_VOCAB_SIZES, **ALICCP_ASSUMED_VOCAB_SIZES}
        stats = _split_stats(split, bounds, positives)
        settings = {"seed": seed, "rows": rows, "click_rate": click_rate, "purchase_rate": purchase_rate,
                    "scenario2_rate": scenario2_rate, "split": split}
        result = aliccp_schema(
            {f: vocab[f] for f in ALICCP_FIELDS},
            ALICCP_MULTI_FIELDS,
            splits_meta,
            stats=stats,
            bayes_auc=bayes,
            bayes_auc_realized=realized,
            bayes_auc_inputs=seen,
            synth=settings,
            sources=[],
            notes=f"Synthetic Ali-CCP (planted model, see mptrec.data_loaders.synth). Real AITM "
            f"vocabulary sizes; assumed sizes for {sorted(ALICCP_ASSUMED_VOCAB_SIZES)}. bayes_auc: "
            f"expected AUC of the planted probabilities (label '301' means 301 != 2), on the first "
            f"{AUC_ROWS:,} rows; "
            "bayes_auc_realized: AUC of the planted probabilities against the drawn labels; "
            "bayes_auc_inputs: AUC against the drawn labels of the planted probabilities with the "
            "user's own effect (101) and field 301 integrated out, as a model without those inputs "
            "sees them (a lower bound of the best reachable AUC; bayes_auc is the upper bound).",
        )
        result["labels"]["301"] = {"values": [1, 2, 3]}
        write_schema(out, result)
        return result


def _planted_aucs(
    probs: Mapping[str, list[F]], labels: Mapping[str, list[npt.NDArray[np.int8]]]
) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """The AUCs of schema.json, per label, rounded to 6 digits.

    Returns:
        ``bayes_auc`` (expected AUC of the planted probabilities), ``bayes_auc_realized`` (their
        AUC against the drawn labels) and ``bayes_auc_inputs`` (that of the ``@inputs``
        probabilities against the drawn labels).
    """
    bayes, realized, seen = {}, {}, {}
    for k in probs:
        p_all = np.concatenate(probs[k]).astype(np.float64)
        y_all = np.concatenate(labels[k]).astype(np.float64)
        if k.endswith("@inputs"):
            seen[k.removesuffix("@inputs")] = round(auc(p_all, y_all, 1.0 - y_all), 6)
            continue
        bayes[k] = round(auc(p_all, p_all, 1.0 - p_all, self_pairs=True), 6)
        realized[k] = round(auc(p_all, y_all, 1.0 - y_all), 6)
    return bayes, realized, seen


def _split_stats(
    split: Mapping[str, float], bounds: list[int], positives: npt.NDArray[np.int64]
) -> dict[str, dict[str, int]]:
    """schema.json ``stats``: rows and positives (click, purchase, 301 != 2) per split."""
    return {
        s: {
            "rows": bounds[i + 1] - bounds[i],
            "click_positives": int(positives[i, 0]),
            "purchase_positives": int(positives[i, 1]),
            "301_not_2": int(positives[i, 2]),
        }
        for i, s in enumerate(split)
    }


def _write_blocks(
    model: PlantedModel, seed: int, rows: int, bounds: list[int], writers: list[SplitWriter]
) -> tuple[dict[str, list[F]], dict[str, list[npt.NDArray[np.int8]]], npt.NDArray[np.int64]]:
    """Generate every block, route its rows to the split writers; keep probabilities for the AUCs."""
    schema = writers[0].schema
    keys = ("click", "purchase", "301")
    probs: dict[str, list[F]] = {k: [] for k in (*keys, *(f"{k}@inputs" for k in keys))}
    labels: dict[str, list[npt.NDArray[np.int8]]] = {k: [] for k in probs}
    positives = np.zeros((len(writers), 3), dtype=np.int64)
    with tqdm(total=rows, desc="synth aliccp", unit="rows", unit_scale=True) as bar:
        for b, start in enumerate(range(0, rows, BLOCK)):
            n = min(BLOCK, rows - start)
            cols, p = model.block(seed, b, n)
            table = _table(cols, schema)
            y = {
                "click": cols["click"],
                "purchase": cols["purchase"],
                "301": (cols["301"] != 2).astype(np.int8),
            }
            y.update({f"{k}@inputs": y[k] for k in keys})
            if start < AUC_ROWS:
                for k in probs:
                    probs[k].append(p[k][: AUC_ROWS - start])
                    labels[k].append(y[k][: AUC_ROWS - start])
            for i, writer in enumerate(writers):
                lo, hi = max(bounds[i], start) - start, min(bounds[i + 1], start + n) - start
                if hi > lo:
                    writer.write(table.slice(lo, hi - lo))
                    positives[i] += [int(y[k][lo:hi].sum()) for k in ("click", "purchase", "301")]
            bar.update(n)
    return probs, labels, positives
