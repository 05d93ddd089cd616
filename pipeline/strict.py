"""Strict loading of configs: mappings (TOML, JSON) into frozen dataclasses, with errors that name the key.

The generic half of :mod:`mptrec.pipeline.config` (which declares the run and new-task configs):
:func:`from_dict` converts a mapping into a dataclass type by its annotations and refuses an
unknown key, a missing key, a wrong type or an invalid value with a :class:`ConfigError` naming
the file, the dotted key and the value; :func:`to_dict` is the inverse; :func:`apply_overrides`
applies ``--set a.b=c`` overrides (TOML syntax for the value, bare words are strings);
:func:`read_toml` reads a TOML file and names a repeated key or table by line and dotted name.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Train:
    ...     lr: float = 0.1
    ...     epochs: int = 1
    >>> from_dict(Train, apply_overrides({"lr": 1}, ["epochs=2"], "x.toml"), source="x.toml")
    Train(lr=1.0, epochs=2)
    >>> from_dict(Train, {"epoch": 2}, source="x.toml")
    Traceback (most recent call last):
    ...
    mptrec.pipeline.strict.ConfigError: x.toml: unknown key 'epoch' (value 2); allowed keys here: epochs, lr
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

__all__ = [
    "ConfigError",
    "apply_overrides",
    "from_dict",
    "read_toml",
    "require_non_negative",
    "require_positive",
    "to_dict",
]


class ConfigError(ValueError):
    """A configuration problem; the message names the file, the dotted key and the value."""


T = TypeVar("T")


def require_positive(obj: object, *keys: str) -> None:
    """Raise ``ValueError`` naming the first attribute of ``obj`` among ``keys`` that is not > 0."""
    for k in keys:
        v = getattr(obj, k)
        if v <= 0:
            raise ValueError(f"{k} must be > 0, got {v!r}")


def require_non_negative(obj: object, *keys: str) -> None:
    """Raise ``ValueError`` naming the first attribute of ``obj`` among ``keys`` that is < 0."""
    for k in keys:
        v = getattr(obj, k)
        if v < 0:
            raise ValueError(f"{k} must be >= 0, got {v!r}")


def _where(source: str, key: str) -> str:
    return f"{source}: {key}" if key else source


def _convert(tp: Any, value: Any, key: str, source: str) -> Any:
    """Convert ``value`` to type ``tp`` or raise a ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in args:
            raise ConfigError(
                f"{_where(source, key)} = {value!r} is not one of {', '.join(map(repr, args))}"
            )
        return value
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if value is None and len(non_none) < len(args):
            return None
        errors = []
        for a in non_none:
            try:
                return _convert(a, value, key, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{_where(source, key)}: {errors}")
    if origin is tuple:
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            raise ConfigError(f"{_where(source, key)} = {value!r} must be a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{key}[{i}]", source) for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{_where(source, key)} = {value!r} must have {len(args)} items")
        return tuple(_convert(a, v, f"{key}[{i}]", source) for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{_where(source, key)} = {value!r} must be a table")
        return {
            _convert(args[0], k, f"{key}.{k}", source): _convert(args[1], v, f"{key}.{k}", source)
            for k, v in value.items()
        }
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source=source, prefix=key)  # type: ignore[arg-type]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{_where(source, key)} = {value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{_where(source, key)} = {value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{_where(source, key)} = {value!r} must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{_where(source, key)} = {value!r} must be a string")
        return value
    raise ConfigError(f"{_where(source, key)}: unsupported config type {tp!r}")


def from_dict(cls: type[T], data: Any, *, source: str = "<config>", prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, strictly.

    Args:
        cls: a (frozen) dataclass type.
        data: the mapping (from TOML or JSON).
        source: file name used in error messages.
        prefix: dotted key of ``data`` within the file, used in error messages.

    Returns:
        The dataclass instance.

    Raises:
        ConfigError: unknown key, missing key, wrong type or invalid value; the message names
            ``source``, the dotted key and the value.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{_where(source, prefix)} = {data!r} must be a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    dotted = (prefix + ".") if prefix else ""
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        raise ConfigError(
            f"{source}: unknown key '{dotted}{k}' (value {data[k]!r}); "
            f"allowed keys here: {', '.join(sorted(fields))}"
        )
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], dotted + name, source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing required key '{dotted}{name}'")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        where = f"'{prefix}'" if prefix else "the top level"
        raise ConfigError(f"{source}: invalid value in {where}: {e}") from e


def to_dict(obj: Any) -> Any:
    """Plain JSON/TOML-able view of a config dataclass (tuples become lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _parse_override_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word is a string


def apply_overrides(data: dict[str, Any], overrides: Sequence[str], source: str) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides to a nested mapping (in place) and return it."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=0.01")
        key, _, raw = item.partition("=")
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set {item!r}: empty component in key {key!r}")
        node = data
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: '{p}' in {source} is not a table")
            node = child
        node[parts[-1]] = _parse_override_value(raw.strip())
    return data


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a TOML file; a missing file, bad UTF-8 or bad TOML is a :class:`ConfigError` naming the file.

    A repeated key or table (which ``tomllib`` reports by line only) is named by its dotted key.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        raw = p.read_bytes()
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: not UTF-8 text ({e})") from e
    except tomllib.TOMLDecodeError as e:
        duplicate = _duplicate_key(raw.decode("utf-8"), str(e))
        if duplicate:
            raise ConfigError(f"{p}: not valid TOML: {duplicate}") from e
        raise ConfigError(f"{p}: not valid TOML: {e}") from e


_TOML_AT = re.compile(r"\(at line (\d+), column \d+\)|\(at end of document\)")
_TOML_DECLARED = re.compile(r"^Cannot declare \((.*)\) twice \(at line (\d+), column \d+\)")
_TOML_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")


def _duplicate_key(text: str, message: str) -> str:
    """Name the key of a repeated-key error, which tomllib gives by line only ("" for other errors)."""
    declared = _TOML_DECLARED.match(message)
    if declared is not None:
        name = ".".join(part.strip().strip("'\"") for part in declared.group(1).split(",") if part.strip())
        return f"line {declared.group(2)}: table [{name}] is declared twice (TOML forbids it; merge them)"
    if not message.startswith("Cannot overwrite a value"):
        return ""
    m = _TOML_AT.search(message)
    lines = text.splitlines()
    if m is None or not lines:
        return ""
    lineno = int(m.group(1)) if m.group(1) else len(lines)
    while lineno > 1 and not lines[lineno - 1].strip():
        lineno -= 1
    line = lines[lineno - 1] if lineno <= len(lines) else ""
    key, sep, _ = line.partition("=")
    key = ".".join(part.strip().strip("\"'") for part in key.strip().split("."))
    if not sep or not key:
        header = _TOML_HEADER.match(line)
        if header is None:
            return ""
        return (f"line {lineno}: table [{header.group(1)}] conflicts with a key of the same name "
                "defined before")
    table = ""
    for prev in reversed(lines[: lineno - 1]):
        header = _TOML_HEADER.match(prev)
        if header is not None:
            table = header.group(1).strip() + "."
            break
    return (f"line {lineno}: key {table + key!r} is defined twice (TOML forbids repeating a key; "
            f"keep one)")
