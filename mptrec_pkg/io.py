"""Atomic single-file writes: a reader sees the old file or the whole new one, never a part.

Every writer fills a temporary file in the destination's folder (so the final ``os.replace`` is a
rename within one file system), flushes it to disk (``fsync``), then renames it over the
destination. On any failure the temporary file is removed and the destination is left as it was.
The destination's folder is created if needed.

This module is the lowest layer of mptrec: it imports only the standard library, so every
package (``data_loaders``, ``pipeline``, ``launch``, ``bench``) may use it. Folder-level staging
(a checkpoint or export folder renamed into place) is not here: it lives with its owner.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "read_json"]


def _temp_path(path: Path) -> Path:
    """A fresh hidden name beside ``path``, ``.NAME.tmpPID-RANDOM`` (unique per process and call)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}-{secrets.token_hex(4)}")


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Create or replace ``path`` atomically; ``write(tmp)`` produces the content at ``tmp``.

    Use it for writers that want a file name (``torch.save``, ``pyarrow.parquet.write_table``,
    ``savefig``, ``shutil.copyfile``); the text, bytes and JSON helpers below call it.

    Args:
        path: the destination file; its folder is created if needed.
        write: called once with the temporary path (same folder, hidden name) to write the
            content there; its return value is ignored.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        Whatever ``write`` raises; the destination is then unchanged and no temporary file remains.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> atomic_write(d / "a.bin", lambda tmp: tmp.write_bytes(b"xy")).read_bytes()
        b'xy'
        >>> sorted(p.name for p in d.iterdir())
        ['a.bin']
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(p)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)
    return p


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    r"""Write ``data`` to ``path`` atomically (see :func:`atomic_write`).

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "sub" / "b.bin"
        >>> atomic_write_bytes(p, b"\x00\x01").read_bytes()
        b'\x00\x01'
    """
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    r"""Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`).

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "c.txt"
        >>> _ = atomic_write_text(p, "old\n")
        >>> atomic_write_text(p, "new\n").read_text()
        'new\n'
    """
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2,
                      **dumps_kwargs: Any) -> Path:
    """Write ``json.dumps(obj, indent=indent, **dumps_kwargs)`` and a newline to ``path`` atomically.

    The text is built before anything is written, so an object that cannot be serialised (or
    NaN with ``allow_nan=False``) leaves the destination unchanged.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "d.json"
        >>> print(atomic_write_json(p, {"a": [1, 2]}, indent=None).read_text(), end="")
        {"a": [1, 2]}
    """
    text = json.dumps(obj, indent=indent, **dumps_kwargs) + "\n"
    return atomic_write_text(path, text)


def read_json(path: str | os.PathLike[str], error: Callable[[str], Exception], missing: str) -> Any:
    """The parsed JSON file ``path``; a missing file or bad JSON raises ``error(message)``.

    The one reader of the project's own JSON files (``schema.json``, ``manifest.json``): the
    message names the file.

    Args:
        path: the file.
        error: the exception type to raise (e.g. ``DataError``), called with the message.
        missing: the message when the file does not exist.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> read_json(atomic_write_json(d / "a.json", {"x": 1}), ValueError, "no a.json")
        {'x': 1}
        >>> read_json(d / "c.json", ValueError, "no c.json")
        Traceback (most recent call last):
        ...
        ValueError: no c.json
    """
    p = Path(path)
    if not p.is_file():
        raise error(missing)
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{p}: not valid JSON: {e}") from e
