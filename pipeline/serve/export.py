"""``mptrec export``: one unsharded inference program holding the backbone and every trained task.

What is exported: the stage-1 backbone rebuilt from ``RUN/config.json`` with its embedding tables
materialised on the CPU and loaded from the run's DCP checkpoint (saved by any number of
processes: DCP gathers the shards, :func:`mptrec.pipeline.checkpoint.load_backbone`), plus the
head of every prompt-tuned task the task store lists as ``trained`` (the union; each head checked
against the checkpoint's hash as ``mptrec eval`` does). The program is written with
``torch.export`` and read back by :mod:`mptrec.pipeline.serve.artifact` with torch alone.

Decision: torch.export, with a plain-tensor signature (not the KeyedJaggedTensor one, not
TorchScript). Evidence, measured here (torch 2.13.0, torchrec 1.8.0, the demo run):

- ``torch.export.export(backbone, (dense, kjt))`` on the unsharded model *does* work, strict and
  non-strict, and with ``dynamic_shapes`` on the KJT's ``values``/``lengths`` leaves it accepts
  other batch sizes (without them: ``Guard failed: dense.size()[0] == 2000``). So TorchScript
  was not needed.
- But such a program takes a ``KeyedJaggedTensor``: the caller needs TorchRec to build one, and
  ``torch.export.load`` of it without TorchRec imported fails to unpickle the saved example
  inputs (``Unsupported global: torchrec.sparse.jagged_tensor.KeyedJaggedTensor``; torch then
  falls back to ``weights_only=False``, i.e. imports TorchRec).
- And the unsharded ``EmbeddingBagCollection`` does not reproduce the trained model's numbers:
  it mean-pools list fields as ``sum / L`` (``aten.embedding_bag`` mode ``mean``) while the
  FBGEMM kernels that ``mptrec eval`` runs compute ``sum * (1 / L)``; pooled values differ by up
  to 2.4e-7, logits by up to 9.5e-7 on 2,000 demo rows.

So the exported module (:class:`~mptrec.pipeline.serve.serving_module.ServingModule`) replaces the
EBC by :class:`~mptrec.pipeline.serve.serving_module.PooledTables`:
per-feature ``values``/``lengths`` tensors (the KJT cut per key, in the manifest's order),
``F.embedding`` for single-valued features, ``F.embedding_bag(mode="sum")`` times ``1 / L``
for list features. The dense arch is the backbone's own code and sees the features in declared
order (``embed()`` concatenates ``to_dict()`` in ``sparse_features`` order, never the plan's).
The fp32 logits equal ``mptrec eval --dump-predictions`` bit for bit
(``tests/pipeline/serve/test_export.py``), and the program holds only ATen ops.

Quantised tables (``--quantize``): ``int8``, row-wise uint8 codes with an fp16 scale and bias
per row (``x = q * scale + bias``, FBGEMM's 8-bit row-wise layout), or ``fp16`` rows; rows are
de-quantised after the lookup, pooling runs in fp32. The export scores the run's validation
split with the fp32 and the quantised module and records the AUC change and the size reduction
in the manifest (``quantization``).

Writes are atomic: everything goes to a temporary sibling folder, the manifest last, then one
rename; a failed export leaves no ``DIR`` (and an existing one untouched).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import nn

from mptrec.data_loaders.schema import FeatureSpec
from mptrec.io import atomic_write_json
from mptrec.models.base import NewTaskHead
from mptrec.pipeline.config import RunConfig, TaskSpec
from mptrec.pipeline.serve import artifact as art
from mptrec.pipeline.serve import shard_inputs
from mptrec.pipeline.serve.serving_module import QUANTIZE, PooledTables, ServingModule

if TYPE_CHECKING:
    from mptrec.pipeline.tasks.union import HeadSpec

__all__ = [
    "ExportError",
    "build_serving_module",
    "export_run",
]

#: Rows of the validation split scored to report the quantised AUC change (0: all).
QUANT_EVAL_ROWS = 200_000


class ExportError(ValueError):
    """A bad export request (unknown task, existing output folder, ...); the message names it."""


# --------------------------------------------------------------------------------------------
# Building it from a run
# --------------------------------------------------------------------------------------------


@dataclass
class ServingBuild:
    """A :class:`ServingModule` and what the manifest says about it."""

    module: ServingModule
    run_cfg: RunConfig
    features: list[FeatureSpec]
    tasks: list[dict[str, Any]]
    checkpoint: Path
    checkpoint_sha256: str
    meta: dict[str, Any]
    schema: dict[str, Any]


def _task_entries(run: Path, cfg: RunConfig, specs: Sequence[TaskSpec], store: Mapping[str, Any],
                  heads: Mapping[str, HeadSpec], sha: str) -> list[dict[str, Any]]:
    entries = []
    for t in [*cfg.tasks, *specs]:
        reg = store["tasks"].get(t.name, {})
        role = "prompt_tuned" if t.name in heads else "pretrained"
        tuned = role == "prompt_tuned"
        entry: dict[str, Any] = {
            "name": t.name, "role": role, "method": heads[t.name].method if tuned else cfg.model.name,
            "label": {"column": t.label, "positive_values": list(t.positive_values)},
            "base_checkpoint_sha256": reg.get("base_checkpoint_sha256", sha) if tuned else sha,
        }
        if role == "prompt_tuned":
            entry["tower_hidden"] = list(heads[t.name].tower_hidden)
            if heads[t.name].offset_max_rows:
                entry["offset_max_rows"] = heads[t.name].offset_max_rows
            head_file = run / str(reg.get("artifact", ""))
            entry["head_sha256"] = hashlib.sha256(head_file.read_bytes()).hexdigest()
            entry["metrics"] = reg.get("metrics", {})
        entries.append(entry)
    return entries


def build_serving_module(run_dir: str | os.PathLike[str], checkpoint: str = "best",
                         tasks: Sequence[str] | None = None, quantize: str | None = None) -> ServingBuild:
    """Rebuild a run's model unsharded on the CPU, load its checkpoint and heads, wrap it.

    Runs in one process without a process group (DCP reads every shard of every rank's file).

    Args:
        run_dir: the stage-1 run folder.
        checkpoint: ``best``, ``last``, ``step-N`` or a checkpoint folder.
        tasks: export only these tasks (default: every stage-1 task and every trained head).
        quantize: None, ``int8`` or ``fp16`` tables.

    Returns:
        The :class:`ServingBuild`.

    Raises:
        RunDirError: no run, no such checkpoint, a head trained on another checkpoint.
        ExportError: an unknown or untrained task in ``tasks``.
    """
    from mptrec.data_loaders.layout import read_schema
    from mptrec.pipeline.build import build_from_config, table_name
    from mptrec.pipeline.checkpoint import load_backbone
    from mptrec.pipeline.rundir import hash_checkpoint, load_run_config, resolve_run_checkpoint
    from mptrec.pipeline.tasks.store import load_task_store
    from mptrec.pipeline.tasks.union import served_heads  # the heads `mptrec eval` serves, same checks

    run = Path(run_dir)
    cfg = load_run_config(run)
    ckpt = resolve_run_checkpoint(run, checkpoint)
    store = load_task_store(run, checkpoint=checkpoint)
    heads, states, specs = served_heads(run, ckpt)
    available = [*cfg.task_names, *heads]
    if tasks:
        for t in tasks:
            if t not in available:
                status = store["tasks"].get(t, {}).get("status")
                why = (f"it is registered but not trained (status {status!r}); run `mptrec prompt-tune`"
                       if status else "it is not a task of the run")
                raise ExportError(f"task {t!r}: {why} (exportable tasks of {run}: {available})")
    chosen = [t for t in available if not tasks or t in tasks]  # the run's order, stage-1 tasks first
    schema = read_schema(cfg.data.path)
    backbone, features = build_from_config(cfg, schema, ebc_device="cpu")
    new: dict[str, NewTaskHead] = {}
    for name, spec in heads.items():
        if name not in chosen:
            continue
        head = spec.build(backbone, name)
        head.load_state_dict(states[name], strict=True)
        new[name] = head
    meta = load_backbone(run, ckpt, backbone, model_name=cfg.model.name, features=features)
    sparse = [f for f in features if f.kind == "sparse"]
    weights = {f.name: backbone.ebc.embedding_bags[table_name(f.name)].weight.detach() for f in sparse}
    module = ServingModule(backbone, new, PooledTables(sparse, weights, quantize), chosen)
    sha = hash_checkpoint(ckpt)
    entries = [e for e in _task_entries(run, cfg, specs, store, heads, sha) if e["name"] in chosen]
    return ServingBuild(module=module, run_cfg=cfg, features=features, tasks=entries, checkpoint=ckpt,
                        checkpoint_sha256=sha, meta=meta, schema=schema)


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def example_inputs(features: Sequence[FeatureSpec], dense_dim: int,
                   batch: int = 5) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Small inputs for tracing: every list feature gets its own id count, none equal to ``batch``."""
    sparse = [f for f in features if f.kind == "sparse"]
    values, lengths = [], []
    for i, f in enumerate(sparse):
        lens = torch.ones(batch, dtype=torch.long)
        if f.multivalent:
            lens[-1] = 3 + i  # N_f = batch + 2 + i
        values.append(torch.arange(int(lens.sum()), dtype=torch.long) % f.num_embeddings)
        lengths.append(lens)
    return torch.rand(batch, dense_dim), values, lengths


def _dynamic_shapes(features: Sequence[FeatureSpec]) -> tuple[Any, ...]:
    batch = torch.export.Dim("batch", min=1)
    sparse = [f for f in features if f.kind == "sparse"]
    values = [{0: torch.export.Dim(f"nnz_{i}", min=0)} if f.multivalent else {0: batch}
              for i, f in enumerate(sparse)]
    return ({0: batch}, values, [{0: batch} for _ in sparse])


def export_program(module: ServingModule, features: Sequence[FeatureSpec]) -> torch.export.ExportedProgram:
    """``torch.export`` the module with a dynamic batch size and dynamic id counts of list features."""
    args = example_inputs(features, module.backbone.dense_dim)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(module, args, dynamic_shapes=_dynamic_shapes(features), strict=False)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _schema_entries(schema: Mapping[str, Any], features: Sequence[FeatureSpec]) -> list[dict[str, Any]]:
    declared = {f["name"]: f for f in schema["features"]}
    out = []
    for f in features:
        entry = {"column": f.name, "multivalent": False, **declared[f.name]}
        out.append({k: entry.get(k) for k in art.SCHEMA_KEYS})
    return out


def _manifest(b: ServingBuild, run: Path, quantize: str | None, table_bytes: int) -> dict[str, Any]:
    from mptrec.pipeline.checkpoint import library_versions

    cfg = b.run_cfg
    entries = _schema_entries(b.schema, b.features)
    dense = [f for f in b.features if f.kind == "dense"]
    sparse = [f for f in b.features if f.kind == "sparse"]
    return {
        "format": art.FORMAT,
        "format_version": art.FORMAT_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "run": {"name": cfg.name, "dir": str(run.resolve()), "model": cfg.model.name,
                "checkpoint": str(b.checkpoint), "checkpoint_sha256": b.checkpoint_sha256,
                "step": b.meta.get("step"), "epoch": b.meta.get("epoch")},
        "tasks": b.tasks,
        "features": {
            "dense": [{"name": f.name, "column": f.column} for f in dense],
            "sparse": [{"name": f.name, "column": f.column, "num_embeddings": f.num_embeddings,
                        "embedding_dim": f.embedding_dim, "multivalent": f.multivalent, "pooling": f.pooling}
                       for f in sparse],
        },
        "input_dim": b.module.backbone.input_dim,
        "oov_policy": cfg.data.oov_policy,
        "schema_features": entries,
        "schema_sha256": art.schema_digest(entries),
        "vocab_sha256": art.vocab_digest(cfg.data.path, b.schema),
        "data": {"path": cfg.data.path, "dataset": b.schema.get("dataset")},
        "program": {"file": art.PROGRAM_FILE, "sha256": "", "bytes": 0, "exporter": "torch.export",
                    "signature": "program(dense (B, D_dense) float32, values [F x (N_f,) int64], "
                                 "lengths [F x (B,) int64]) -> {task: (B,) float32 logits}"},
        "tables": {"dtype": quantize or "float32", "bytes": table_bytes,
                   "rows": sum(f.num_embeddings for f in sparse)},
        "quantization": None,
        "versions": library_versions(),
    }


def _score_split(manifest: art.Manifest, modules: Sequence[nn.Module], data_dir: str, split: str,
                 tasks: Sequence[Mapping[str, Any]], max_rows: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Labels (n, T) and each module's logits (n, T) on the first ``max_rows`` rows of a split."""
    schema = shard_inputs.check_shards(manifest, data_dir)
    units = shard_inputs.split_units(manifest, data_dir, split, schema)
    cols = list(shard_inputs.input_columns(manifest)) + sorted({t["label"]["column"] for t in tasks})
    labels: list[np.ndarray] = []
    logits: list[list[np.ndarray]] = [[] for _ in modules]
    n = 0
    for u in units:
        if max_rows and n >= max_rows:
            break
        table = shard_inputs.read_unit(u, cols)
        inputs = shard_inputs.table_inputs(manifest, table, f"{u.file} row group {u.row_group}")
        y = []
        for t in tasks:
            raw = np.asarray(table.column(t["label"]["column"]).to_numpy())
            pos = t["label"]["positive_values"]
            y.append(np.isin(raw, pos) if pos else raw)
        labels.append(np.stack(y, axis=1).astype(np.float32))
        with torch.inference_mode():
            for j, m in enumerate(modules):
                out = m(*inputs)
                logits[j].append(torch.stack([out[t["name"]] for t in tasks], dim=1).numpy())
        n += table.num_rows
    return np.concatenate(labels), [np.concatenate(x) for x in logits]


def quantization_report(b: ServingBuild, fp32: ServingModule, manifest: art.Manifest, quantize: str,
                        split: str, max_rows: int = QUANT_EVAL_ROWS) -> dict[str, Any]:
    """AUC of every task with fp32 and quantised tables on a split, and the size reduction."""
    from mptrec.pipeline.eval.auc import binary_metrics

    y, (ref, quant) = _score_split(manifest, [fp32, b.module], b.run_cfg.data.path, split, b.tasks, max_rows)
    fp32_bytes = cast(PooledTables, fp32.backbone.ebc).table_bytes()
    q_bytes = cast(PooledTables, b.module.backbone.ebc).table_bytes()
    per_task = {}
    for i, t in enumerate(b.tasks):
        a = binary_metrics(ref[:, i], y[:, i])["auc"]
        q = binary_metrics(quant[:, i], y[:, i])["auc"]
        per_task[t["name"]] = {
            "auc_fp32": a, "auc": q, "auc_delta": None if a is None or q is None else q - a,
            "max_abs_logit_delta": float(np.abs(quant[:, i] - ref[:, i]).max()),
        }
    return {"dtype": quantize,
            "scheme": ("row-wise uint8 codes, fp16 scale and bias per row (x = q * scale + bias)"
                       if quantize == "int8" else "fp16 rows"),
            "table_bytes_fp32": fp32_bytes, "table_bytes": q_bytes,
            "size_reduction": 1.0 - q_bytes / fp32_bytes, "eval": {"split": split, "rows": int(y.shape[0]),
                                                                   "tasks": per_task}}


def _check_exported(program: torch.export.ExportedProgram, module: ServingModule,
                    features: Sequence[FeatureSpec]) -> None:
    """The exported program equals the eager module bit for bit on two batch sizes."""
    for batch in (5, 2):
        args = example_inputs(features, module.backbone.dense_dim, batch)
        with torch.inference_mode():
            want, got = module(*args), program.module()(*args)
        bad = [t for t in want if not torch.equal(want[t], got[t])]
        if bad:
            raise ExportError(f"the exported program differs from the eager module for task(s) {bad}")


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    if out.exists():
        if not overwrite:
            raise ExportError(f"{out} exists; pass --overwrite to replace it")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def export_run(run_dir: str | os.PathLike[str], out: str | os.PathLike[str], *, checkpoint: str = "best",
               tasks: Sequence[str] | None = None, quantize: str | None = None, overwrite: bool = False,
               quant_split: str | None = None) -> dict[str, Any]:
    """Export a run (backbone + every trained task) to ``out``: ``model.pt2`` and ``manifest.json``.

    Args:
        run_dir: the stage-1 run folder.
        out: the artifact folder to create.
        checkpoint: ``best``, ``last``, ``step-N`` or a checkpoint folder.
        tasks: export only these tasks (default: all trained ones).
        quantize: None (fp32 tables), ``int8`` or ``fp16``.
        overwrite: replace an existing ``out``.
        quant_split: split scored for the quantised AUC change (default: the run's validation
            split, else its test split).

    Returns:
        The manifest written.

    Raises:
        ExportError, RunDirError, CheckpointError, DataError: bad input; nothing is written.
    """
    run, dest = Path(run_dir), Path(out)
    if dest.exists() and not overwrite:
        raise ExportError(f"{dest} exists; pass --overwrite to replace it")
    if quantize not in (None, *QUANTIZE):
        raise ExportError(f"--quantize {quantize!r}: expected one of {list(QUANTIZE)}")
    b = build_serving_module(run, checkpoint, tasks, quantize)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        program = export_program(b.module, b.features)
        _check_exported(program, b.module, b.features)
        torch.export.save(program, str(tmp / art.PROGRAM_FILE))
        manifest = _manifest(b, run, quantize, cast(PooledTables, b.module.backbone.ebc).table_bytes())
        manifest["program"].update(sha256=_sha256(tmp / art.PROGRAM_FILE),
                                   bytes=(tmp / art.PROGRAM_FILE).stat().st_size)
        if quantize is not None:
            split = quant_split or b.run_cfg.data.valid_split or b.run_cfg.data.test_split
            fp32 = build_serving_module(run, checkpoint, tasks).module  # the reference: fp32 tables
            parsed = art.parse_manifest(manifest, tmp / art.MANIFEST_FILE)
            manifest["quantization"] = quantization_report(b, fp32, parsed, quantize, split)
        atomic_write_json(tmp / art.MANIFEST_FILE, manifest, indent=2, allow_nan=False)
        _publish(tmp, dest, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest
