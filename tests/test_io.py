"""mptrec.io: atomic single-file writes (old file intact and no temporary file on failure)."""

from __future__ import annotations

import doctest
import json
import math
from pathlib import Path
from typing import Any

import pytest

import mptrec.io as mio


def test_docstring_examples_run() -> None:
    result = doctest.testmod(mio)
    assert result.attempted >= 8 and result.failed == 0


def test_writes_create_the_folder_and_replace(tmp_path: Path) -> None:
    p = tmp_path / "a" / "b" / "x.json"
    assert mio.atomic_write_json(p, {"k": 1}) == p
    assert json.loads(p.read_text()) == {"k": 1} and p.read_text().endswith("\n")
    mio.atomic_write_text(p, "text")
    assert p.read_text() == "text"
    mio.atomic_write_bytes(p, b"\x00")
    assert p.read_bytes() == b"\x00"
    assert sorted(f.name for f in p.parent.iterdir()) == ["x.json"]


def test_json_matches_json_dumps(tmp_path: Path) -> None:
    obj = {"b": [1, 2], "a": {"c": None}}
    cases: list[dict[str, Any]] = [{}, {"indent": None}, {"indent": 1, "sort_keys": True}]
    for kwargs in cases:
        p = mio.atomic_write_json(tmp_path / "o.json", obj, **kwargs)
        assert p.read_text() == json.dumps(obj, **{"indent": 2, **kwargs}) + "\n"


def test_failure_mid_write_keeps_the_old_file(tmp_path: Path) -> None:
    p = tmp_path / "keep.txt"
    p.write_text("old")

    seen: list[Path] = []

    def half_then_die(tmp: Path) -> None:
        seen.append(tmp)
        tmp.write_text("partial")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        mio.atomic_write(p, half_then_die)
    assert seen[0].parent == tmp_path and seen[0].name.startswith(".keep.txt.tmp")
    assert p.read_text() == "old"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["keep.txt"]


def test_unserialisable_json_writes_nothing(tmp_path: Path) -> None:
    p = tmp_path / "r.json"
    p.write_text("{}\n")
    with pytest.raises(ValueError):
        mio.atomic_write_json(p, {"x": math.nan}, allow_nan=False)
    with pytest.raises(TypeError):
        mio.atomic_write_json(p, {"x": object()})
    assert p.read_text() == "{}\n"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["r.json"]


def test_imports_only_the_standard_library() -> None:
    import ast
    import sys

    tree = ast.parse(Path(mio.__file__).read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert names <= set(sys.stdlib_module_names) | {"__future__"}, names
