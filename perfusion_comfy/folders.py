"""The pack's folders, registered with ComfyUI (extra_model_paths.yaml may add more paths to each):
``models/perfusion`` for concepts and ``models/perfusion/captions`` for caption files (the covariance C).

Nodes read files only from these folders, by the names ComfyUI lists in their combos: a node input is never a path.
"""
from __future__ import annotations

import os

import folder_paths

FOLDER = "perfusion"
CAPTIONS = "perfusion_captions"
CAPTIONS_SHOWN = "models/perfusion/captions"  # how messages name the folder (never a path of the server)


def _register(name: str, default: str, extensions: set[str]) -> None:
    # a key in extra_model_paths.yaml is read before custom nodes load, so keep its paths
    paths = list(folder_paths.folder_names_and_paths.get(name, ([], set()))[0])
    if default not in paths:
        paths.append(default)
    folder_paths.folder_names_and_paths[name] = (paths, extensions)


def register() -> None:
    """Register ``models/perfusion`` (``.safetensors`` only: concepts are never pickles) and its ``captions``
    sub-folder (``.txt``; created, so users find where caption files go)."""
    _register(FOLDER, os.path.join(folder_paths.models_dir, FOLDER), {".safetensors"})
    captions = os.path.join(folder_paths.models_dir, FOLDER, "captions")
    _register(CAPTIONS, captions, {".txt"})
    try:
        os.makedirs(captions, exist_ok=True)
    except OSError:  # a read-only install still works: the combo then offers the built-in corpus only
        pass


def save_dir() -> str:
    """Where new concepts are written: the first configured perfusion folder."""
    path = folder_paths.get_folder_paths(FOLDER)[0]
    os.makedirs(path, exist_ok=True)
    return path


def caption_files() -> list[str]:
    """The caption combo: ``""`` (the built-in corpus, the default) and every caption file in the folder."""
    return ["", *folder_paths.get_filename_list(CAPTIONS)]


def listed_path(folder: str, name: str, refusal: str) -> str | None:
    """The file behind the combo value ``name`` of ``folder``, or None for ``""`` (the combo's 'none'). A name the
    combo does not list raises ``ValueError(refusal)``: a message that names only the folder, never a server path."""
    if not name:
        return None
    path = folder_paths.get_full_path(folder, name) if name in folder_paths.get_filename_list(folder) else None
    if path is None:
        raise ValueError(refusal)
    return path


def caption_path(name: str) -> str | None:
    """The caption file behind the combo value ``name``, or None for ``""`` (the built-in corpus)."""
    return listed_path(CAPTIONS, name, f"caption file '{name}' is not in {CAPTIONS_SHOWN}: put the .txt file there "
                                       "and pick it from the list (empty: the built-in corpus)")
