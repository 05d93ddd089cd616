"""Dependency direction: launch -> pipeline -> {models, data_loaders}; nothing imports launch."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DISTRIBUTED = ("torch.distributed", "torchrec.distributed")


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{a.name}" for a in node.names]
    return names


def _files(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.py"))


@pytest.mark.parametrize("folder", ["models", "data_loaders"])
def test_single_device_packages_never_import_distribution_or_pipeline(folder: str) -> None:
    assert _files(folder)
    bad = []
    for f in _files(folder):
        for name in _imports(f):
            if name.startswith(DISTRIBUTED) or name.startswith(("mptrec.pipeline", "mptrec.launch")):
                bad.append(f"{f.relative_to(REPO)}: {name}")
            other = "mptrec.data_loaders" if folder == "models" else "mptrec.models"
            if name.startswith(other):
                bad.append(f"{f.relative_to(REPO)}: {name}")
            if name.split(".")[0] in {"models", "pipeline", "data_loaders", "launch"}:
                bad.append(f"{f.relative_to(REPO)}: bare import {name}")
    assert not bad, bad


@pytest.mark.parametrize("folder", ["models", "data_loaders"])
def test_single_device_packages_never_read_environment(folder: str) -> None:
    bad = [str(f) for f in _files(folder) if "os.environ" in f.read_text() or "getenv" in f.read_text()]
    assert not bad, bad


def test_nothing_imports_launch() -> None:
    bad = []
    for folder in ["models", "data_loaders", "pipeline", "bench"]:
        for f in _files(folder):
            bad += [f"{f}: {n}" for n in _imports(f) if n.startswith("mptrec.launch")]
    assert not bad, bad


def test_no_bare_top_level_imports_anywhere() -> None:
    bad = []
    for folder in ["models", "data_loaders", "pipeline", "launch", "bench", "tests"]:
        for f in _files(folder):
            bad += [f"{f}: {n}" for n in _imports(f)
                    if n.split(".")[0] in {"models", "pipeline", "data_loaders", "launch", "bench"}]
    assert not bad, bad


def test_bare_models_is_not_importable() -> None:
    import importlib.util
    import sys

    saved = list(sys.path)
    try:
        sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO]
        assert importlib.util.find_spec("models") is None
    finally:
        sys.path[:] = saved
