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

Shards are read the way :class:`mptrec.data_loaders.dataset.ShardDataset` reads them: the split's
row groups in ``schema.json`` file order, dealt round-robin over the scoring processes, each
row's ``sample_id`` being its index within the split. Bad input raises :class:`ArtifactError`
whose one-line message names the file, the field and the value.
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

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "PROGRAM_FILE",
    "Artifact",
    "ArtifactError",
    "Manifest",
    "SparseInput",
    "Unit",
    "check_shards",
    "load_artifact",
    "parse_manifest",
    "read_manifest",
    "schema_digest",
    "split_units",
    "table_inputs",
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


def _field(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
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
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; {model_dir} is not an artifact written by `mptrec export`")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON: {e}") from e
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
    tasks = [str(_field(t, "name", str, where)) for t in _field(raw, "tasks", list, where)]
    feats = _field(raw, "features", dict, where)
    dense = [str(_field(f, "column", str, where)) for f in _field(feats, "dense", list, where)]
    sparse = []
    for f in _field(feats, "sparse", list, where):
        sparse.append(SparseInput(
            name=_field(f, "name", str, where), column=_field(f, "column", str, where),
            num_embeddings=int(_field(f, "num_embeddings", int, where)),
            embedding_dim=int(_field(f, "embedding_dim", int, where)),
            multivalent=bool(_field(f, "multivalent", bool, where)),
            pooling=_field(f, "pooling", str, where)))
    oov = _field(raw, "oov_policy", str, where)
    if oov not in _OOV:
        raise ArtifactError(f"{path}: field 'oov_policy' is {oov!r}, expected one of {list(_OOV)}")
    vocab = raw.get("vocab_sha256")
    if vocab is not None and not isinstance(vocab, str):
        raise ArtifactError(f"{path}: field 'vocab_sha256' is {vocab!r}, expected a string or null")
    return Manifest(path=path, tasks=tasks, dense=dense, sparse=sparse, oov_policy=oov,
                    schema_features=list(_field(raw, "schema_features", list, where)),
                    schema_sha256=str(_field(raw, "schema_sha256", str, where)), vocab_sha256=vocab, raw=raw)


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
# Shards
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """One row group to score: shard file, row group, ``sample_id`` of its first row, rows."""

    file: Path
    row_group: int
    first_row: int
    rows: int


def _read_schema(data_dir: Path) -> dict[str, Any]:
    path = data_dir / "schema.json"
    if not data_dir.is_dir():
        raise ArtifactError(f"{data_dir}: no such shard folder")
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; {data_dir} is not a shard folder written by `mptrec data`")
    try:
        schema = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(schema, dict):
        raise ArtifactError(f"{path}: the top level is not an object")
    _field(schema, "features", list, str(path))
    _field(schema, "splits", dict, str(path))
    return schema


def check_shards(manifest: Manifest, data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Check that the shards' ``schema.json`` declares the model's inputs as the training data did.

    Args:
        manifest: the artifact's manifest.
        data_dir: the shard folder (with ``schema.json``).

    Returns:
        The shards' schema.

    Raises:
        ArtifactError: naming ``schema.json``, the feature, the field and both values.
    """
    root = Path(data_dir)
    schema = _read_schema(root)
    path = root / "schema.json"
    declared = {f.get("name"): f for f in schema["features"] if isinstance(f, dict)}
    for want in manifest.schema_features:
        name = want.get("name")
        have = declared.get(name)
        if have is None:
            raise ArtifactError(f"{path}: feature {name!r}, an input of the model, is not declared "
                                f"(model manifest {manifest.path})")
        have = {"column": name, "multivalent": False, **have}
        for key in SCHEMA_KEYS:
            if have.get(key) != want.get(key):
                raise ArtifactError(f"{path}: feature {name!r} field {key!r} is {have.get(key)!r}, the model "
                                    f"was trained with {want.get(key)!r} ({manifest.path})")
    vocab = vocab_digest(root, schema)
    if vocab != manifest.vocab_sha256:
        raise ArtifactError(f"{path}: vocabulary file sha256 {str(vocab)[:12]}... differs from the training "
                            f"data's {str(manifest.vocab_sha256)[:12]}... ({manifest.path}): the ids mean "
                            "other values")
    return schema


def _type_ok(t: pa.DataType, kind: str) -> bool:
    if kind == "multi":
        return (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_integer(t.value_type)
    if kind == "dense":
        return bool(pa.types.is_floating(t))
    return bool(pa.types.is_integer(t))


def input_columns(manifest: Manifest) -> dict[str, str]:
    """Column -> expected kind (``dense``, ``int`` or ``multi``) of the program's inputs."""
    out = {c: "dense" for c in manifest.dense}
    out.update({f.column: "multi" if f.multivalent else "int" for f in manifest.sparse})
    return out


def split_units(manifest: Manifest, data_dir: str | os.PathLike[str], split: str,
                schema: Mapping[str, Any]) -> list[Unit]:
    """Every row group of ``split`` (file order), each shard's footer checked against the manifest.

    Raises:
        ArtifactError: no such split, a missing or unreadable shard, a row count that differs
            from ``schema.json``, a missing column or one of the wrong type.
    """
    root = Path(data_dir)
    splits = schema["splits"]
    if split not in splits:
        raise ArtifactError(f"{root / 'schema.json'}: no split {split!r} (splits: {sorted(splits)})")
    spec = splits[split]
    files, rows = spec.get("files", []), spec.get("rows", [])
    if not isinstance(files, list) or not isinstance(rows, list) or len(files) != len(rows):
        raise ArtifactError(f"{root / 'schema.json'}: split {split!r} needs lists 'files' and 'rows' "
                            "of one length")
    wanted = input_columns(manifest)
    units: list[Unit] = []
    first = 0
    for name, expected in zip(files, rows):
        path = root / str(name)
        try:
            meta = pq.ParquetFile(path).metadata
            arrow_schema = meta.schema.to_arrow_schema()
        except (OSError, pa.ArrowException) as e:
            raise ArtifactError(f"{path}: missing or unreadable Parquet shard: {e}") from e
        if meta.num_rows != int(expected):
            raise ArtifactError(f"{path}: holds {meta.num_rows} rows, schema.json says {expected}")
        for col, kind in wanted.items():
            if col not in arrow_schema.names:
                raise ArtifactError(f"{path}: column {col!r}, an input of the model, is missing")
            t = arrow_schema.field(col).type
            if not _type_ok(t, kind):
                want = {"multi": "list<int64>", "dense": "float", "int": "int64"}[kind]
                raise ArtifactError(f"{path}: column {col!r} has type {t}, the model expects {want}")
        row = first
        for rg in range(meta.num_row_groups):
            n = meta.row_group(rg).num_rows
            if n:
                units.append(Unit(path, rg, row, n))
            row += n
        first += int(expected)
    return units


def _numpy(col: pa.ChunkedArray | pa.Array) -> npt.NDArray[Any]:
    return np.asarray(col.to_numpy(zero_copy_only=False) if isinstance(col, pa.Array) else col.to_numpy())


def _fix_ids(ids: npt.NDArray[np.int64], f: SparseInput, policy: str, where: str) -> npt.NDArray[np.int64]:
    if ids.size == 0:
        return ids
    lo, hi = int(ids.min()), int(ids.max())
    if lo >= 0 and hi < f.num_embeddings:
        return ids
    if policy == "hash":
        return np.mod(ids, f.num_embeddings)
    if policy == "clip":
        return np.clip(ids, 0, f.num_embeddings - 1)
    bad = hi if hi >= f.num_embeddings else lo
    raise ArtifactError(f"{where}: column {f.column!r}: id {bad} outside [0, {f.num_embeddings}) "
                        f"(the run's oov_policy is 'error')")


def table_inputs(manifest: Manifest, table: Any, where: str) -> tuple[torch.Tensor, list[torch.Tensor],
                                                                          list[torch.Tensor]]:
    """The program's inputs for the rows of ``table`` (a ``pyarrow.Table`` or ``RecordBatch``).

    Args:
        manifest: the artifact's manifest.
        table: the rows (at least the input columns).
        where: location for messages (file and row group).

    Returns:
        ``(dense (B, D_dense), values per sparse feature, lengths per sparse feature)``.

    Raises:
        ArtifactError: a null, a NaN/inf in a dense column, an id out of range under ``error``.
    """
    n = table.num_rows
    dense = np.empty((n, len(manifest.dense)), dtype=np.float32)
    for j, c in enumerate(manifest.dense):
        col = table.column(c)
        if col.null_count:
            raise ArtifactError(f"{where}: column {c!r}: {col.null_count} null value(s)")
        dense[:, j] = _numpy(col)
    if not np.isfinite(dense).all():
        i, j = np.argwhere(~np.isfinite(dense))[0]
        raise ArtifactError(f"{where}: dense column {manifest.dense[j]!r}: {dense[i, j]} at row {i} "
                            "(NaN/inf)")
    values, lengths = [], []
    for f in manifest.sparse:
        col = table.column(f.column)
        if col.null_count:
            raise ArtifactError(f"{where}: column {f.column!r}: {col.null_count} null value(s)")
        if f.multivalent:
            lens = _numpy(pc.list_value_length(col)).astype(np.int64)
            col = pc.list_flatten(col)
        else:
            lens = np.ones(n, dtype=np.int64)
        ids = _fix_ids(_numpy(col).astype(np.int64, copy=False), f, manifest.oov_policy, where)
        values.append(torch.from_numpy(ids if ids.flags.writeable and ids.flags.c_contiguous else ids.copy()))
        lengths.append(torch.from_numpy(lens))
    return torch.from_numpy(dense), values, lengths


def read_unit(unit: Unit, columns: Sequence[str]) -> Any:
    """The rows of one row group (only ``columns``)."""
    try:
        pf = pq.ParquetFile(unit.file)
        return pf.read_row_group(unit.row_group, columns=list(columns), use_threads=False)
    except (OSError, pa.ArrowException) as e:
        raise ArtifactError(f"{unit.file} row group {unit.row_group}: cannot read: {e}") from e


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

    def score_table(self, table: Any, where: str = "table") -> dict[str, torch.Tensor]:
        """Logits of every task for the rows of an Arrow table (see :func:`table_inputs`)."""
        return self.logits(*table_inputs(self.manifest, table, where))


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
