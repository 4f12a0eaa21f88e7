"""The ``models/perfusion`` folder: registered with ComfyUI (extra_model_paths.yaml may add more paths)."""
from __future__ import annotations

import os

import folder_paths

FOLDER = "perfusion"


def register() -> None:
    """Add ``models/perfusion`` to the folder list, accepting only ``.safetensors`` (concepts are never pickles).

    A ``perfusion:`` key in extra_model_paths.yaml is read before custom nodes load, so keep its paths."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    paths = list(folder_paths.folder_names_and_paths.get(FOLDER, ([], set()))[0])
    if default not in paths:
        paths.append(default)
    folder_paths.folder_names_and_paths[FOLDER] = (paths, {".safetensors"})


def save_dir() -> str:
    """Where new concepts are written: the first configured perfusion folder."""
    path = folder_paths.get_folder_paths(FOLDER)[0]
    os.makedirs(path, exist_ok=True)
    return path
