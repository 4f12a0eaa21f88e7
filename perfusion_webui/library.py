"""Concept files on disk for the webui: ``models/perfusion`` and any extra folder, by name and by short hash.

A concept's name is its path below a folder without ``.safetensors``, with ``/`` separators
(``hugsy``, ``pets/hugsy``). Hashes are the first 12 hex digits of the file's SHA-256, as the webui shows
for LoRAs; they go into the generation parameters so a pasted picture finds its concept under another name.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from perfusion_ops.concept import Concept, ConceptError
from perfusion_ops.concept_file import load_concept

EXTENSION = ".safetensors"


class ConceptLibrary:
    """The concept files below ``folders`` (the first one wins where two hold the same name)."""

    def __init__(self, folders):
        self.folders = [Path(f) for f in folders if f]
        self._hashes: dict[tuple, str] = {}
        self._concepts: dict[tuple, Concept] = {}

    def files(self) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for folder in self.folders:
            if not folder.is_dir():
                continue
            for root, _, names in os.walk(folder, followlinks=True):
                for filename in sorted(names):
                    if not filename.lower().endswith(EXTENSION):
                        continue
                    path = Path(root) / filename
                    name = path.relative_to(folder).as_posix()[: -len(EXTENSION)]
                    found.setdefault(name, path)
        return found

    def resolve(self, name: str) -> Path:
        """The file of concept ``name``: exact name, else the one name equal up to case, else the one file
        of that base name in a sub-folder. Raises :class:`ConceptError` listing what there is."""
        files = self.files()
        if name in files:
            return files[name]
        for candidates in ([n for n in files if n.lower() == name.lower()],
                           [n for n in files if n.rsplit("/", 1)[-1].lower() == name.lower()]):
            if len(candidates) == 1:
                return files[candidates[0]]
            if len(candidates) > 1:
                raise ConceptError(f"concept name '{name}' is ambiguous: {', '.join(sorted(candidates))}")
        where = ", ".join(str(f) for f in self.folders) or "no folder"
        known = ", ".join(sorted(files)[:20]) or "none"
        raise ConceptError(f"no Perfusion concept named '{name}' in {where} (found: {known})")

    @staticmethod
    def _stamp(path: Path) -> tuple:
        st = path.stat()
        return str(path.resolve()), st.st_size, st.st_mtime_ns

    def short_hash(self, path: Path) -> str:
        key = self._stamp(path)
        if key not in self._hashes:
            digest = hashlib.sha256()
            with open(path, "rb") as file:  # in pieces: a stray checkpoint in the folder is gigabytes
                for piece in iter(lambda: file.read(1 << 20), b""):
                    digest.update(piece)
            self._hashes[key] = digest.hexdigest()[:12]
        return self._hashes[key]

    def find_by_hash(self, digest: str) -> str | None:
        """The name of the concept whose short hash is ``digest`` (None if no file has it)."""
        digest = digest.strip().lower()
        for name, path in self.files().items():
            if self.short_hash(path) == digest:
                return name
        return None

    def load(self, path: Path, expected_width: int | None = None) -> Concept:
        """The validated concept in ``path`` (cached until the file changes)."""
        key = self._stamp(path)
        if key not in self._concepts:
            self._concepts[key] = load_concept(path)
        concept = self._concepts[key]
        if expected_width is not None:
            concept.check_width(expected_width)
        return concept
