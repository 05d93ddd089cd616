"""Read and run a serving artifact written by ``mptrec export``: torch, numpy and pyarrow only.

This module imports nothing of the training code (no ``mptrec.models``, no other
``mptrec.pipeline`` module, no TorchRec, no process group), so a scoring job needs only torch
and pyarrow. ``tests/pipeline/serve/test_export.py`` checks that loading and scoring leave
``torchrec`` and the training modules out of ``sys.modules``.

Artifact layout (``DIR/``)::

    model.pt2       torch.export program (``torch.export.save``): the unsharded backbone, its
                    embedding tables (fp32, or row-wise int8 / fp16 with ``--quantize``) and
                    every exported task's head
    manifest.json   written last: format and version, tasks, feature spec, schema/vocabulary
                    hashes, base checkpoint hash, library versions (see ``mptrec.pipeline.serve.export``)

The program's signature (inputs in the manifest's ``features.sparse`` order)::

    program(dense (B, D_dense) float32,
            values  [ (N_f,) int64 ids of sparse feature f, for every f ],
            lengths [ (B,)   int64 ids per row of feature f, for every f ])
        -> {task: (B,) float32 logits}            (probability = sigmoid(logit))

It is the KeyedJaggedTensor's values and lengths cut per key. Single-valued features have
``N_f == B`` and lengths of ones (the program reads their ids directly).

Shards become the program's inputs in :mod:`mptrec.pipeline.serve.shard_inputs`. Bad input
raises :class:`ArtifactError` whose one-line message names the file, the field and the value.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mptrec.io import read_json

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "PROGRAM_FILE",
    "Artifact",
    "ArtifactError",
    "Manifest",
    "SparseInput",
    "load_artifact",
    "parse_manifest",
    "read_manifest",
    "require_field",
    "schema_digest",
    "vocab_digest",
]

FORMAT = "mptrec-serving"
#: Bumped whenever the program's signature or the manifest's meaning changes.
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
PROGRAM_FILE = "model.pt2"
#: schema.json fields of an input feature that must match between the training data and the
#: shards scored (the id space is defined by them, together with the vocabulary file).
SCHEMA_KEYS = ("name", "column", "kind", "num_embeddings", "multivalent")
_OOV = ("error", "hash", "clip")


class ArtifactError(ValueError):
    """A bad artifact, a bad shard folder or a mismatch between them; one line naming file, field, value."""


# --------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SparseInput:
    """One sparse input of the program, as recorded in the manifest.

    Args:
        name: feature name.
        column: Parquet column.
        num_embeddings: table rows.
        embedding_dim: table width.
        multivalent: the column is ``list<int64>``.
        pooling: ``sum`` or ``mean``.
    """

    name: str
    column: str
    num_embeddings: int
    embedding_dim: int
    multivalent: bool
    pooling: str


@dataclass(frozen=True)
class Manifest:
    """The parsed ``manifest.json`` (``raw`` keeps the whole object).

    Args:
        path: the manifest file.
        tasks: task names, in the program's output order.
        dense: dense input columns, in order.
        sparse: sparse inputs, in the program's input order.
        oov_policy: what to do with ids outside a table (the run's ``data.oov_policy``).
        schema_features: the training data's ``schema.json`` entries of the input features.
        schema_sha256: :func:`schema_digest` of those entries.
        vocab_sha256: SHA-256 of the training data's vocabulary file (None when it has none).
        raw: the manifest as read.
    """

    path: Path
    tasks: list[str]
    dense: list[str]
    sparse: list[SparseInput]
    oov_policy: str
    schema_features: list[dict[str, Any]]
    schema_sha256: str
    vocab_sha256: str | None
    raw: dict[str, Any]


def require_field(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """``obj[key]`` when it is a ``kind``, else an :class:`ArtifactError` naming ``where`` and the key."""
    value = obj.get(key)
    if not isinstance(value, kind):
        what = getattr(kind, "__name__", kind)
        raise ArtifactError(f"{where}: field {key!r} is {value!r}, expected a {what}")
    return value


def read_manifest(model_dir: str | os.PathLike[str]) -> Manifest:
    """Read and check ``DIR/manifest.json``.

    Raises:
        ArtifactError: no manifest, bad JSON, another format or format version, a missing field.
    """
    path = Path(model_dir) / MANIFEST_FILE
    if not Path(model_dir).is_dir():
        raise ArtifactError(f"{model_dir}: no such artifact folder (write one with `mptrec export`)")
    raw = read_json(path, ArtifactError,
                    f"{path}: missing; {model_dir} is not an artifact written by `mptrec export`")
    return parse_manifest(raw, path)


def parse_manifest(raw: Any, path: Path) -> Manifest:
    """Check a manifest object (read from ``path``) and parse it.

    Raises:
        ArtifactError: another format or format version, a missing or mistyped field.
    """
    if not isinstance(raw, dict):
        raise ArtifactError(f"{path}: the top level is not an object")
    where = str(path)
    if raw.get("format") != FORMAT:
        raise ArtifactError(f"{path}: field 'format' is {raw.get('format')!r}, expected {FORMAT!r}")
    if raw.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: field 'format_version' is {raw.get('format_version')!r}; this mptrec reads format "
            f"version {FORMAT_VERSION}: re-export the run with this version (`mptrec export`)"
        )
    tasks = [str(require_field(t, "name", str, where)) for t in require_field(raw, "tasks", list, where)]
    feats = require_field(raw, "features", dict, where)
    dense = [str(require_field(f, "column", str, where)) for f in require_field(feats, "dense", list, where)]
    sparse = []
    for f in require_field(feats, "sparse", list, where):
        sparse.append(SparseInput(
            name=require_field(f, "name", str, where), column=require_field(f, "column", str, where),
            num_embeddings=int(require_field(f, "num_embeddings", int, where)),
            embedding_dim=int(require_field(f, "embedding_dim", int, where)),
            multivalent=bool(require_field(f, "multivalent", bool, where)),
            pooling=require_field(f, "pooling", str, where)))
    oov = require_field(raw, "oov_policy", str, where)
    if oov not in _OOV:
        raise ArtifactError(f"{path}: field 'oov_policy' is {oov!r}, expected one of {list(_OOV)}")
    vocab = raw.get("vocab_sha256")
    if vocab is not None and not isinstance(vocab, str):
        raise ArtifactError(f"{path}: field 'vocab_sha256' is {vocab!r}, expected a string or null")
    return Manifest(path=path, tasks=tasks, dense=dense, sparse=sparse, oov_policy=oov,
                    schema_features=list(require_field(raw, "schema_features", list, where)),
                    schema_sha256=str(require_field(raw, "schema_sha256", str, where)), vocab_sha256=vocab,
                    raw=raw)


def schema_digest(entries: Sequence[Mapping[str, Any]]) -> str:
    """SHA-256 of the input features' ``schema.json`` entries (keys :data:`SCHEMA_KEYS`), in order."""
    rows = [{k: e.get(k) for k in SCHEMA_KEYS} for e in entries]
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


def vocab_digest(data_dir: str | os.PathLike[str], schema: Mapping[str, Any]) -> str | None:
    """SHA-256 of the shards' vocabulary file (``schema.json`` key ``vocab_file``), or None.

    Raises:
        ArtifactError: the schema names a vocabulary file that does not exist.
    """
    name = schema.get("vocab_file")
    if not name:
        return None
    path = Path(data_dir) / str(name)
    if not path.is_file():
        raise ArtifactError(f"{Path(data_dir) / 'schema.json'}: field 'vocab_file' names {path}, "
                            "which does not exist")
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------
# The program
# --------------------------------------------------------------------------------------------


@dataclass
class Artifact:
    """A loaded artifact: the manifest and the callable program.

    Args:
        manifest: the parsed manifest.
        program: the exported program's module (``torch.export.load(...).module()``).
    """

    manifest: Manifest
    program: Callable[..., Any]

    def logits(self, dense: torch.Tensor, values: Sequence[torch.Tensor],
               lengths: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run the program (under ``torch.inference_mode``): task -> (B,) float32 logits."""
        with torch.inference_mode():
            out = self.program(dense, list(values), list(lengths))
        missing = [t for t in self.manifest.tasks if t not in out]
        if missing:
            raise ArtifactError(f"{self.manifest.path}: the program returned no logits for task(s) {missing}")
        return {t: out[t] for t in self.manifest.tasks}


def load_artifact(model_dir: str | os.PathLike[str]) -> Artifact:
    """Load an artifact written by ``mptrec export`` (torch only; no process group).

    Raises:
        ArtifactError: see :func:`read_manifest`; a missing or unreadable program file, or one
            whose content differs from the manifest's hash.
    """
    manifest = read_manifest(model_dir)
    program = Path(model_dir) / str(manifest.raw.get("program", {}).get("file", PROGRAM_FILE))
    if not program.is_file():
        raise ArtifactError(f"{program}: missing (the manifest {manifest.path} names it)")
    want = manifest.raw.get("program", {}).get("sha256")
    h = hashlib.sha256()
    with program.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    if want != h.hexdigest():
        raise ArtifactError(f"{program}: sha256 {h.hexdigest()[:12]}... differs from the manifest's field "
                            f"'program.sha256' {str(want)[:12]}... (a partial copy or another export)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.load(str(program))
    except Exception as e:  # noqa: BLE001 - any deserialisation failure is a bad artifact
        raise ArtifactError(f"{program}: cannot load the exported program: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from e
    return Artifact(manifest=manifest, program=ep.module())
