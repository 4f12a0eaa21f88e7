"""Fixture for the front-end tests: a real ComfyUI server (``main.py --cpu``, its bundled web UI) with the pack,
the small random SD1.5 checkpoint, a photo and concept files (browser_env.py says whether a browser can run)."""
from __future__ import annotations

import pytest

from tools import comfy_host

from browser_env import CONCEPT, PHOTO


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory):
    """``main.py --cpu`` serving the pack and ComfyUI's bundled front end; the perfusion folder holds a random
    (valid) concept and a corrupt file; the input folder a real photo."""
    pytest.importorskip("torch", reason="the ComfyUI server needs torch")
    import skimage.data
    from PIL import Image

    from perfusion_ops.concept_file import save_concept
    from tools.factories import random_concept
    from tools.smoke_checkpoint import attn2_layers, checkpoint_path

    layout = comfy_host.Layout(tmp_path_factory.mktemp("comfy-ui"))
    layout.add_model("checkpoints", checkpoint_path("small"))
    Image.fromarray(skimage.data.chelsea()).save(layout.input / PHOTO)
    concept = random_concept(layers=attn2_layers("small"), trigger="hugsy", superclass="teddy")
    save_concept(concept, layout.folder("perfusion") / CONCEPT)
    good = (layout.folder("perfusion") / CONCEPT).read_bytes()
    (layout.folder("perfusion") / "corrupt.safetensors").write_bytes(good[:300])
    server = comfy_host.Server(layout)
    server.start()
    yield server
    server.stop()
