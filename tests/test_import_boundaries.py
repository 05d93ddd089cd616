"""Dependency direction, checked on the source (imports, including those inside functions).

Packages: launch -> pipeline -> {models, data_loaders}; nothing imports launch.

Inside ``pipeline/`` (README, Architecture): the core (``pipeline/*.py``: config, strict loading,
collectives, build, sharding, checkpoint, run folder) imports no stage; ``eval/`` imports the
core; ``train/`` the core and eval (validation); ``tasks/`` the core, eval and train (the metrics
log, the loop's result); ``serve/`` the core, eval and tasks. Job modules (what a ``mptrec``
command runs) are imported by no pipeline module; ``eval/evaluate_run.py`` (``mptrec eval``) is
the one job above its layer: it scores the union of a run's tasks (``tasks/union.py``). The
serving path ``serve/artifact.py`` + ``serve/shard_inputs.py`` + ``serve/predict.py`` imports no
training code at all.

Modules started by name (``python -m MODULE``, torchrun's ``-m MODULE``, torchx's ``m=``) are
dependencies the imports do not show: each must exist, run under ``__main__``, and respect the
same direction; every ``mptrec.*`` dotted name in a string or a docstring must name a module (or
an attribute of one) that exists.
"""

from __future__ import annotations

import ast
import configparser
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DISTRIBUTED = ("torch.distributed", "torchrec.distributed")
SOURCE = ["mptrec_pkg", "models", "data_loaders", "pipeline", "launch", "bench"]

# pipeline subpackage -> the pipeline groups it may import ("core" = the modules at pipeline/ top)
ALLOWED = {
    "core": {"core"},
    "eval": {"core", "eval"},
    "train": {"core", "eval", "train"},
    "tasks": {"core", "eval", "train", "tasks"},
    "serve": {"core", "eval", "tasks", "serve"},
}
# module -> extra groups it may import, with the reason
EXTRA = {"mptrec.pipeline.eval.evaluate_run": {"tasks"}}  # `mptrec eval` scores the union of tasks
# what `mptrec` commands run; only launch/, bench/ and tests import them
JOBS = {
    "mptrec.pipeline.train.pretrain",
    "mptrec.pipeline.tasks.prompt_tuning",
    "mptrec.pipeline.tasks.full_retrain",
    "mptrec.pipeline.eval.evaluate_run",
    "mptrec.pipeline.serve.export",
    "mptrec.pipeline.serve.predict",
}
# the torch-only serving path: these mptrec modules and nothing else of mptrec
SERVING_PATH = {"mptrec.pipeline.serve.artifact", "mptrec.pipeline.serve.shard_inputs",
                "mptrec.pipeline.serve.predict"}
# the only modules that may import torchrec.distributed
TORCHREC_DISTRIBUTED = {"mptrec.pipeline.sharding", "mptrec.pipeline.train.loop"}  # loop: the train pipeline


def _package_dirs() -> dict[str, Path]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    pairs = [line.split("=") for line in cfg["options"]["package_dir"].strip().splitlines()]
    return {name.strip(): REPO / folder.strip() for name, folder in pairs}


PACKAGE_DIRS = _package_dirs()


def _module_name(path: Path) -> str:
    for name, folder in sorted(PACKAGE_DIRS.items(), key=lambda kv: -len(str(kv[1]))):
        if path.is_relative_to(folder):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            return ".".join([name, *parts])
    raise ValueError(path)


def _module_file(name: str) -> Path | None:
    """The file of module ``name`` (a package's ``__init__.py``), or None."""
    for pkg, folder in sorted(PACKAGE_DIRS.items(), key=lambda kv: -len(kv[0])):
        if name == pkg or name.startswith(pkg + "."):
            rest = name[len(pkg):].lstrip(".").split(".") if name != pkg else []
            base = folder.joinpath(*rest) if rest else folder
            for candidate in (base.with_suffix(".py") if rest else None, base / "__init__.py"):
                if candidate is not None and candidate.is_file():
                    return candidate
            return None
    return None


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


def _resolve(name: str) -> str | None:
    """The longest prefix of dotted ``name`` that is a module of the repository."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if _module_file(".".join(parts[:i])) is not None:
            return ".".join(parts[:i])
    return None


def _group(module: str) -> str | None:
    """``core``, ``eval``, ``train``, ``tasks`` or ``serve`` for a pipeline module, else None."""
    if not module.startswith("mptrec.pipeline."):
        return None
    sub = module.split(".")[2]
    return sub if sub in ALLOWED else "core"


def _pipeline_modules() -> list[tuple[Path, str]]:
    return [(f, _module_name(f)) for f in _files("pipeline") if f.name != "__init__.py"]


def _pipeline_violations(importer: str, imported: list[str]) -> list[str]:
    bad = []
    group = _group(importer)
    assert group is not None
    for name in imported:
        target = _resolve(name) if name.startswith("mptrec.") else None
        if target is None:
            if name.startswith("torchrec.distributed") and importer not in TORCHREC_DISTRIBUTED:
                bad.append(f"{importer}: {name} (only {sorted(TORCHREC_DISTRIBUTED)} may)")
            continue
        if importer in SERVING_PATH and target not in SERVING_PATH | {"mptrec.io", "mptrec.columns"}:
            bad.append(f"{importer}: {target} (the serving path imports no training code)")
        if target.startswith(("mptrec.launch", "mptrec.bench")):
            bad.append(f"{importer}: {target} (pipeline never imports launch or bench)")
        other = _group(target)
        if other is None or target in ("mptrec.pipeline",) or target == importer:
            continue
        if other not in ALLOWED[group] | EXTRA.get(importer, set()):
            bad.append(f"{importer} ({group}) -> {target} ({other})")
        if target in JOBS:
            bad.append(f"{importer} -> {target} (a job; only launch, bench and tests import jobs)")
    return bad


# ---- packages --------------------------------------------------------------------------------------


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


def test_setup_cfg_lists_every_package() -> None:
    """A non-editable install copies only the listed packages: every folder with an __init__.py."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    found = {_module_name(p.parent / "__init__.py") for folder in PACKAGE_DIRS.values()
             for p in folder.rglob("__init__.py") if "__pycache__" not in p.parts}
    assert listed == found, (sorted(found - listed), sorted(listed - found))


# ---- inside pipeline/ --------------------------------------------------------------------------------


def test_pipeline_has_stage_subpackages() -> None:
    subs = {p.parent.name for p in (REPO / "pipeline").glob("*/__init__.py")}
    assert subs == set(ALLOWED) - {"core"}, subs
    jobs = [j for j in JOBS | set(EXTRA) | SERVING_PATH | TORCHREC_DISTRIBUTED if _module_file(j) is None]
    assert not jobs, f"the rules name modules that do not exist: {jobs}"


def test_pipeline_layers_jobs_and_serving_path() -> None:
    bad = []
    for f, name in _pipeline_modules():
        bad += _pipeline_violations(name, _imports(f))
    assert not bad, bad


@pytest.mark.parametrize("importer, imported, why", [
    ("mptrec.pipeline.checkpoint", "mptrec.pipeline.train.loop", "core -> train"),
    ("mptrec.pipeline.eval.evaluate", "mptrec.pipeline.tasks.union", "eval -> tasks"),
    ("mptrec.pipeline.eval.auc", "mptrec.pipeline.train.pretrain", "eval -> a train job"),
    ("mptrec.pipeline.train.loop", "mptrec.pipeline.tasks.store", "train -> tasks"),
    ("mptrec.pipeline.tasks.union", "mptrec.pipeline.eval.evaluate_run", "a job"),
    ("mptrec.pipeline.tasks.union", "mptrec.pipeline.serve.export", "tasks -> serve"),
    ("mptrec.pipeline.serve.predict", "mptrec.pipeline.config", "serving path -> training code"),
    ("mptrec.pipeline.rundir", "mptrec.launch.relaunch", "pipeline -> launch"),
    ("mptrec.pipeline.build", "torchrec.distributed.types", "torchrec.distributed outside sharding"),
])
def test_the_rules_catch_a_wrong_import(importer: str, imported: str, why: str) -> None:
    assert _pipeline_violations(importer, [imported]), why


# ---- modules started by name, and dotted names in strings and docs ------------------------------------

_DASH_M_TEXT = re.compile(r"(?<![\w-])-m\s+(mptrec(?:\.\w+)+)")
_DOTTED = re.compile(r"(?<![\w.])mptrec(?:\.[A-Za-z_]\w*)+")


def _started_in_python(path: Path) -> list[str]:
    """Module strings after ``"-m"`` in list/tuple/call arguments, and ``m=`` of torchx's ``ddp``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    consts = {t.id: n.value.value for n in tree.body if isinstance(n, ast.Assign)
              for t in n.targets if isinstance(t, ast.Name) and isinstance(n.value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        items: list[ast.expr] = []
        if isinstance(node, ast.List | ast.Tuple):
            items = list(node.elts)
        elif isinstance(node, ast.Call):
            items = list(node.args)
            for kw in node.keywords:
                if kw.arg == "m":
                    v = kw.value
                    found.append(v.value if isinstance(v, ast.Constant) else consts.get(getattr(v, "id", "")))
        for a, b in zip(items, items[1:]):
            if isinstance(a, ast.Constant) and a.value == "-m" and isinstance(b, ast.Constant):
                found.append(b.value)
    return [m for m in found if isinstance(m, str) and m.startswith("mptrec")]


def _text_files() -> list[Path]:
    files = [f for folder in [*SOURCE, "tests", "scripts"] for f in (REPO / folder).rglob("*")
             if f.is_file() and f.suffix in {".py", ".sh", ".md"} and "__pycache__" not in f.parts]
    return [*files, REPO / "Makefile", REPO / "README.md"]


def _started_by_name() -> list[tuple[Path, str]]:
    out = []
    for f in _text_files():
        text = f.read_text()
        out += [(f, m) for m in _DASH_M_TEXT.findall(text)]
        if f.suffix == ".py":
            out += [(f, m) for m in _started_in_python(f)]
    return out


def test_started_modules_exist_run_as_main_and_respect_the_boundaries() -> None:
    started = _started_by_name()
    names = {m for _, m in started}
    assert {"mptrec.launch.cli", "mptrec.bench.accuracy"} <= names, names  # the scan finds them
    bad = []
    for f, module in started:
        where = f"{f.relative_to(REPO)}: -m {module}"
        path = _module_file(module)
        if path is None:
            bad.append(f"{where}: no such module")
            continue
        if 'if __name__ == "__main__":' not in path.read_text():
            bad.append(f"{where}: it has no `if __name__ == \"__main__\":`")
        top = f.relative_to(REPO).parts[0]
        if top in ("models", "data_loaders", "mptrec_pkg"):
            bad.append(f"{where}: single-device code starts no process")
        elif top == "pipeline":
            bad.append(f"{where}: pipeline starts no module by name (launch/relaunch.py does)")
        elif top == "bench" and not (module.startswith("mptrec.bench.") or module == "mptrec.launch.cli"):
            bad.append(f"{where}: bench starts bench modules or the mptrec CLI only")
    assert not bad, bad


def _defines(path: Path, name: str) -> bool:
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and node.name == name:
            return True
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return True
        if isinstance(node, ast.ImportFrom | ast.Import):
            if any((a.asname or a.name.split(".")[0]) == name for a in node.names):
                return True
    return False


def test_dotted_mptrec_names_in_strings_and_docs_exist() -> None:
    """``mptrec.pipeline.x.y`` in a string, docstring, comment or the README names something real.

    A name is a module, or a module and one attribute defined at its top level (a trailing
    method or field of that attribute is allowed). A moved module leaves no stale name behind.
    """
    bad, checked = [], 0
    for f in _text_files():
        for dotted in set(_DOTTED.findall(f.read_text())):
            checked += 1
            dotted = dotted.rstrip(".")
            if dotted in ("mptrec",) or dotted.endswith(("_", ".cmd")):
                continue
            module = _resolve(dotted)
            if module is None:
                bad.append(f"{f.relative_to(REPO)}: {dotted}")
                continue
            rest = dotted[len(module):].lstrip(".").split(".") if dotted != module else []
            path = _module_file(module)
            assert path is not None
            if rest and not (path.name != "__init__.py" and len(rest) <= 2 and _defines(path, rest[0])) \
                    and not (path.name == "__init__.py" and len(rest) <= 2):
                bad.append(f"{f.relative_to(REPO)}: {dotted} ({module} has no {rest[0]!r})")
    assert checked > 300, checked  # the scan sees the tree
    assert not bad, sorted(bad)
