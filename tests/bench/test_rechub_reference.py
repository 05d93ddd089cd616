"""bench/rechub_reference.py (and its data half bench/rechub_data.py) without torch-rechub: arguments,
schema, Parquet to arrays, outputs; run as a script, it finds the data half next to it.

CI has no rechub venv; the training half (torch_rechub imported inside functions) is verified by
running the script with runs/.rechub-venv (scripts/rechub_env.sh).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mptrec.bench import rechub_reference as rr

SCRIPT = Path(rr.__file__)
DENSE = ["age", "wage"]
SPARSE = {"class_worker": 5, "education": 4, "sex": 3}
LABELS = ["income", "marital", "education_label"]


def _shard(rng: np.random.Generator, n: int, start: int) -> pa.Table:
    cols: dict[str, pa.Array] = {}
    for name in DENSE:
        cols[name] = pa.array(rng.random(n, dtype=np.float32))
    for name, vocab in SPARSE.items():
        cols[name] = pa.array(rng.integers(0, vocab, n), type=pa.int64())
    cols["income"] = pa.array((np.arange(start, start + n) % 2).astype(np.int8))  # encodes the row order
    cols["marital"] = pa.array(rng.integers(0, 2, n).astype(np.int8))
    cols["education_label"] = pa.array(rng.integers(0, 2, n).astype(np.int8))
    return pa.table(cols)


def _census_like(root: Path) -> Path:
    """A tiny folder shaped like `mptrec data convert --format census` output (two test shards)."""
    rng = np.random.default_rng(0)
    feats = [{"name": n, "column": n, "kind": "dense"} for n in DENSE]
    feats += [{"name": n, "column": n, "kind": "sparse", "num_embeddings": v, "multivalent": False}
              for n, v in SPARSE.items()]
    rows = {"train": [20], "valid": [8], "test": [5, 7]}
    splits = {}
    for split, sizes in rows.items():
        (root / split).mkdir(parents=True)
        files, start = [], 0
        for i, n in enumerate(sizes):
            rel = f"{split}/part-{i:05d}.parquet"
            pq.write_table(_shard(rng, n, start), root / rel)
            files.append(rel)
            start += n
        splits[split] = {"files": files, "rows": sizes}
    labels = {name: {"values": [0, 1]} for name in LABELS}
    labels["education"] = {"values": list(range(4))}
    schema = {"dataset": "census", "version": 1, "features": feats, "labels": labels, "splits": splits}
    (root / "schema.json").write_text(json.dumps(schema))
    (root / "vocab.json").write_text("{}")
    return root


def test_parser_defaults_and_lists() -> None:
    a = rr.parse_args(["--data", "d", "--seed", "7", "--out", "o.json"])
    assert a.models == list(rr.MODELS)
    assert a.tasks == ["income", "marital"]
    assert a.exclude == []
    assert (a.epochs, a.patience, a.batch_size, a.lr, a.weight_decay) == (30, 5, 256, 1e-3, 1e-4)
    assert a.predictions is None and a.threads == 1
    b = rr.parse_args(["--data", "d", "--seed", "7", "--out", "o.json", "--models", "mmoe,ple",
                       "single_income", "--exclude", "education", "--epochs", "2", "--batch-size", "64"])
    assert b.models == ["mmoe", "ple", "single_income"]
    assert b.exclude == ["education"]
    assert (b.epochs, b.batch_size) == (2, 64)


@pytest.mark.parametrize("bad", [["--models", "mmoe,dcn"], ["--models", "mmoe", "mmoe"], ["--epochs", "0"]])
def test_parser_rejects(bad: list[str]) -> None:
    with pytest.raises(SystemExit):
        rr.parse_args(["--data", "d", "--seed", "1", "--out", "o.json", *bad])


def test_features_and_labels(tmp_path: Path) -> None:
    schema = rr.load_schema(_census_like(tmp_path))
    feats = rr.select_features(schema, ["education"])
    assert [f.name for f in feats] == ["age", "wage", "class_worker", "sex"]
    assert [f.vocab for f in feats] == [None, None, 5, 3]
    with pytest.raises(ValueError, match="unknown feature"):
        rr.select_features(schema, ["educaton"])
    rr.check_labels(schema, LABELS)
    with pytest.raises(ValueError, match="not binary"):
        rr.check_labels(schema, ["education"])
    with pytest.raises(ValueError, match="not in schema"):
        rr.check_labels(schema, ["clicks"])
    assert rr.model_tasks("single_education", ["income", "marital"]) == ["education_label"]
    assert rr.model_tasks("ple", ["income", "marital"]) == ["income", "marital"]


def test_read_split_arrays_in_file_order(tmp_path: Path) -> None:
    root = _census_like(tmp_path)
    schema = rr.load_schema(root)
    feats = rr.select_features(schema, ["education"])
    data = rr.read_data(root, schema, feats, ["income", "education_label"])
    assert {s: d.rows for s, d in data.items()} == {"train": 20, "valid": 8, "test": 12}
    test = data["test"]
    assert set(test.x) == {"age", "wage", "class_worker", "sex"}
    assert test.x["age"].dtype == np.float32 and test.x["sex"].dtype == np.int64
    assert test.x["age"].flags.writeable
    assert test.y["income"].dtype == np.float32
    np.testing.assert_array_equal(test.y["income"], np.arange(12) % 2)  # shard 0 then shard 1
    first = pq.read_table(root / "test/part-00000.parquet")
    np.testing.assert_array_equal(test.x["sex"][:5], first.column("sex").to_numpy())


def test_read_split_rejects_out_of_vocab_ids(tmp_path: Path) -> None:
    root = _census_like(tmp_path)
    schema = rr.load_schema(root)
    for f in schema["features"]:
        if f["name"] == "class_worker":
            f["num_embeddings"] = 2
    with pytest.raises(ValueError, match="outside its vocabulary"):
        rr.read_split(root, schema, "train", rr.select_features(schema), ["income"])


def test_outputs_are_written_atomically(tmp_path: Path) -> None:
    out = tmp_path / "o" / "r.json"
    rr.write_json_atomic(out, {"a": 1})
    assert json.loads(out.read_text()) == {"a": 1}
    pred = tmp_path / "p" / "mmoe.parquet"
    rr.write_predictions(pred, {"income": np.array([0.1, 0.9]), "marital": np.array([0.5, 0.2])})
    t = pq.read_table(pred)
    assert t.column_names == ["row", "income", "marital"]
    assert t.column("row").to_pylist() == [0, 1]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["mmoe.parquet", "o", "p", "r.json"]  # no temp left


def _module_level_imports(path: Path) -> list[str]:
    """Modules a file imports outside its functions (module-level ``if``/``try`` blocks included)."""
    found: list[str] = []
    nodes: list[ast.stmt] = list(ast.parse(path.read_text()).body)
    while nodes:
        node = nodes.pop()
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append("." * node.level + (node.module or ""))
        elif isinstance(node, ast.If | ast.Try):
            nodes += [*node.body, *node.orelse, *(s for h in getattr(node, "handlers", []) for s in h.body)]
    return found


def test_module_level_imports_need_no_torch_rechub() -> None:
    heavy = {"torch_rechub", "torch", "torchrec", "mptrec", "sklearn"}
    for path in (SCRIPT, SCRIPT.with_name("rechub_data.py")):
        top = _module_level_imports(path)
        assert top and not [n for n in top if n.split(".")[0] in heavy], (path.name, top)


def test_runs_as_a_script_importing_its_data_half_as_a_sibling(tmp_path: Path) -> None:
    """As the rechub venv runs it (``python bench/rechub_reference.py``): no package, the data half
    found next to the script; ``--help`` exits before torch is imported."""
    done = subprocess.run([sys.executable, str(SCRIPT), "--help"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--data" in done.stdout and "--predictions" in done.stdout
