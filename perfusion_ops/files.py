"""Safe file names and atomic writes: an interrupted save never destroys the file it replaces."""
from __future__ import annotations

import errno
import os
import re
import tempfile
from pathlib import Path
from typing import Sequence

# Windows' device names: reserved with any extension ("CON.safetensors" opens the console there)
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}
_ALLOWED = re.compile(r"^[\w][\w .+-]*$")


def safe_file_name(name: str, suffix: str = ".safetensors", folder: str | os.PathLike | None = None,
                   variants: Sequence[str] = ("",)) -> str:
    """``name`` as a plain file name ending in ``suffix``; a refusal says why.

    Users type save names into a node; a name must never reach outside the folder it is saved in, so path
    separators and ``..`` are refused, as are characters other than letters, digits, space and ``. _ + -``, and
    Windows' reserved device names (``CON``, ``NUL``, ``COM1`` …, with any extension). With ``folder``, the file
    system there must accept every file the caller will write, ``<stem><variant><suffix>`` for each of
    ``variants``, together with the temporary name :func:`atomic_write_bytes` writes it through: each temporary
    file is created and removed once, so a name too long (file systems count bytes, not characters) or a folder
    that cannot be written is refused before any long work, not after it."""
    stem = name.strip()
    if stem.lower().endswith(suffix):
        stem = stem[: -len(suffix)]
    if not stem:
        raise ValueError("the save name is empty")
    if "/" in stem or "\\" in stem or ".." in stem or os.sep in stem or (os.altsep and os.altsep in stem):
        raise ValueError(f"save name '{name}' must be a plain file name, without folders or '..'")
    if not _ALLOWED.match(stem):
        raise ValueError(f"save name '{name}' may hold letters, digits, spaces and . _ + - only")
    if stem.split(".")[0].rstrip().lower() in _RESERVED:
        raise ValueError(f"save name '{name}' is a reserved device name on Windows (CON, PRN, AUX, NUL, COM1-9, "
                         "LPT1-9, with any extension): choose another name")
    if folder is not None:
        for variant in variants:
            _check_writable(Path(folder) / f"{stem}{variant}{suffix}", name)
    return stem + suffix


def _check_writable(path: Path, name: str) -> None:
    """Create and remove the temporary file of ``path`` (its longest name), or say why the folder refuses it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = _temp_file(path)
    except OSError as err:
        if err.errno != errno.ENAMETOOLONG:
            raise ValueError(f"cannot save '{path.name}' in {path.parent}: {err.strerror}") from None
        limit = _name_limit(path.parent)
        raise ValueError(
            f"save name '{name}' is too long for this file system: the pack writes '{path.name}' "
            f"({len(os.fsencode(path.name))} bytes; letters outside ASCII take 2 to 4 bytes each) through a "
            f"temporary '.{path.name}.<random>.tmp', and a file name here may take {limit} bytes: shorten the name"
        ) from None
    os.close(fd)
    os.unlink(tmp)


def _name_limit(folder: Path) -> str:
    try:
        return f"at most {os.pathconf(folder, 'PC_NAME_MAX')}"
    except (AttributeError, OSError, ValueError):  # no pathconf (Windows) or no such limit
        return "fewer"


def _temp_file(path: Path) -> tuple[int, str]:
    """The temporary file a write of ``path`` goes through: ``.<name>.<random>.tmp`` in the same folder."""
    return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and one ``os.replace``.

    Readers see the old file or the new one, never a partial file, even if the process dies mid-write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_file(path)
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
