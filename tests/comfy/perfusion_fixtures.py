"""Session fixtures with real Perfusion concepts for the small checkpoint: trained here, through the Train node."""
from __future__ import annotations

import pytest
from PIL import Image

from graphs import train_graph


@pytest.fixture(scope="session")
def photo_name(comfy):
    """scikit-image's 'chelsea' cat photo in the host's input folder (a real photo, bundled in a package)."""
    import skimage.data

    Image.fromarray(skimage.data.chelsea()).save(comfy.layout.input / "chelsea.png")
    return "chelsea.png"


class ConceptFiles(dict):
    """``{trigger: file name in models/perfusion}``, and ``.concept(trigger)`` read with the core's loader."""

    def __init__(self, host, files):
        super().__init__(files)
        self.host = host

    def concept(self, trigger):
        from perfusion_ops.concept_file import load_concept
        return load_concept(self.host.layout.folder("perfusion") / self[trigger])


@pytest.fixture(scope="session")
def concept_files(comfy, small_checkpoint, photo_name):
    """Two concepts trained separately on the small checkpoint (2 steps each): hugsy (cat), zorbo (dog)."""
    for trigger, superclass in (("hugsy", "cat"), ("zorbo", "dog")):
        comfy.run(train_graph(small_checkpoint.name, photo_name, trigger, superclass, trigger, steps=2))
    return ConceptFiles(comfy, {t: f"{t}.safetensors" for t in ("hugsy", "zorbo")})


@pytest.fixture(scope="session")
def concept_files_server(server, comfy, concept_files):
    """The server's perfusion folder: a good concept, one for SD2-width text, and a corrupt file."""
    from perfusion_ops.concept_file import save_concept
    from tools.factories import random_concept

    folder = server.layout.folder("perfusion")
    good = comfy.layout.folder("perfusion") / concept_files["hugsy"]
    (folder / "hugsy.safetensors").write_bytes(good.read_bytes())
    layers = {layer: t.shape[0] for layer, t in concept_files.concept("hugsy").value_outputs.items()}
    wide = random_concept(width=1024, layers=layers)
    save_concept(wide, folder / "sd2-concept.safetensors")
    (folder / "corrupt.safetensors").write_bytes(good.read_bytes()[:700])
    return folder
