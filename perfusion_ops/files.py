"""Safe file names and atomic writes: an interrupted save never destroys the file it replaces."""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}
_ALLOWED = re.compile(r"^[\w][\w .+-]*$")


def safe_file_name(name: str, suffix: str = ".safetensors") -> str:
    """``name`` as a plain file name ending in ``suffix``; refuses path separators, ``..`` and odd characters.

    Users type save names into a node; a name must never reach outside the folder it is saved in."""
    stem = name.strip()
    if stem.lower().endswith(suffix):
        stem = stem[: -len(suffix)]
    if not stem:
        raise ValueError("the save name is empty")
    if "/" in stem or "\\" in stem or ".." in stem or os.sep in stem or (os.altsep and os.altsep in stem):
        raise ValueError(f"save name '{name}' must be a plain file name, without folders or '..'")
    if not _ALLOWED.match(stem) or stem.lower() in _RESERVED or len(stem) > 120:
        raise ValueError(
            f"save name '{name}' may hold letters, digits, spaces and . _ + - only (at most 120 characters)"
        )
    return stem + suffix


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and one ``os.replace``.

    Readers see the old file or the new one, never a partial file, even if the process dies mid-write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
