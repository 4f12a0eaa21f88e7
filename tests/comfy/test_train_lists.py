"""Photos as lists (ComfyUI's list outputs reach Train whole, INPUT_IS_LIST) of mixed sizes, in a real ComfyUI: from a
node that outputs a list, from the host's own list nodes, with masks; the console says what was used."""
from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from tools.comfy_host import ExecutionFailed

from graphs import train_graph

PHOTOS = {"list-cat.png": skimage.data.chelsea, "list-coffee.png": skimage.data.coffee,
          "list-rocket.png": skimage.data.rocket}  # 451×300, 600×400, 640×427 (width × height)


class PhotoList:
    """A node whose IMAGE output is a list (OUTPUT_IS_LIST), as folder loaders have: the named input photos, each
    at its own size."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"names": ("STRING", {"default": ""})}}

    RETURN_TYPES = ("IMAGE",)
    OUTPUT_IS_LIST = (True,)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, names):
        import folder_paths

        pictures = [Image.open(folder_paths.get_annotated_filepath(n)).convert("RGB") for n in names.split(",")]
        return ([torch.from_numpy(np.asarray(p, dtype=np.float32) / 255)[None] for p in pictures],)


class IntList:
    """A node whose INT output is a list of two values."""

    INPUT_TYPES = classmethod(lambda cls: {"required": {}})
    RETURN_TYPES, OUTPUT_IS_LIST, FUNCTION, CATEGORY = ("INT",), (True,), "make", "testing"

    def make(self):
        return ([1, 2],)


def tensor(photo: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(photo[None].astype(np.float32) / 255)


@pytest.fixture(scope="module")
def photos(comfy):
    for name, load in PHOTOS.items():
        Image.fromarray(load()).save(comfy.layout.input / name)
    return list(PHOTOS)


def logged_use(logs) -> str:
    return next(line for line in logs if "training on " in line)


def test_a_list_of_mixed_sizes_trains(comfy, small_checkpoint, photos, monkeypatch):
    monkeypatch.setitem(comfy.nodes.NODE_CLASS_MAPPINGS, "PerfusionTestPhotoList", PhotoList)
    graph = train_graph(small_checkpoint.name, photos[0], "listy", "cat", "listy", steps=1)
    graph["image"] = {"class_type": "PerfusionTestPhotoList", "inputs": {"names": ",".join(photos)}}
    with comfy.capture_logs() as logs:
        concept, _ = comfy.run(graph, fresh=True)["train"]
    assert logged_use(logs) == ("[perfusion] training on 3 photos (1 of 451×300, 1 of 600×400, 1 of 640×427) from 3 "
                                "input batches, each centre-cropped to a square and resized to 64×64, with mirrored "
                                "copies: 6 latents")
    assert concept.info["images"] == "3" and (comfy.layout.folder("perfusion") / "listy.safetensors").is_file()


def test_the_hosts_list_node_and_a_mask_for_every_batch(comfy, small_checkpoint):
    """RebatchImages (both trees) turns a batch of two into a list of two; LoadImage's one mask (from the photo's
    alpha channel: ComfyUI masks where it is transparent) serves both."""
    cat = skimage.data.chelsea()
    alpha = np.full(cat.shape[:2], 255, np.uint8)
    alpha[60:240, 100:350] = 0
    Image.fromarray(np.dstack([cat, alpha])).save(comfy.layout.input / "list-cat-alpha.png")
    graph = train_graph(small_checkpoint.name, "list-cat-alpha.png", "rebatchy", "cat", "rebatchy", steps=1, mask=True,
                        flip=False)
    graph["pair"] = {"class_type": "ImageBatch", "inputs": {"image1": ["image", 0], "image2": ["image", 0]}}
    graph["list"] = {"class_type": "RebatchImages", "inputs": {"images": ["pair", 0], "batch_size": 1}}
    graph["train"]["inputs"]["images"] = ["list", 0]
    with comfy.capture_logs() as logs:
        comfy.run(graph, fresh=True)
    assert logged_use(logs).startswith("[perfusion] training on 2 photos (2 of 451×300) from 2 input batches")


def test_the_hosts_folder_loader(comfy, small_checkpoint, photos):
    """ComfyUI's own image-list loader (v0.33; the 2024 tree has none): a folder of photos of several sizes."""
    if "LoadImageDataSetFromFolder" not in comfy.nodes.NODE_CLASS_MAPPINGS:
        pytest.skip("this ComfyUI has no LoadImageDataSetFromFolder node")
    folder = comfy.layout.input / "concept-photos"
    folder.mkdir(exist_ok=True)
    for name in photos[:2]:
        (folder / name).write_bytes((comfy.layout.input / name).read_bytes())
    graph = train_graph(small_checkpoint.name, photos[0], "foldy", "cat", "foldy", steps=1, flip=False)
    graph["image"] = {"class_type": "LoadImageDataSetFromFolder", "inputs": {"folder": "concept-photos"}}
    with comfy.capture_logs() as logs:
        comfy.run(graph, fresh=True)
    line = logged_use(logs)
    assert "training on 2 photos (" in line and "1 of 451×300" in line and "1 of 600×400" in line, line


class PixelsVAE:
    """Stands in for the VAE: its "latents" are the cropped photos themselves (channels first)."""

    @staticmethod
    def encode(pixels):
        return pixels.movedim(-1, 1)


def test_each_photo_of_a_list_is_cropped_as_it_would_be_alone(comfy, small_checkpoint):
    with torch.inference_mode():
        model = comfy.node("CheckpointLoaderSimple")().load_checkpoint(small_checkpoint.name)[0]
        cat, coffee = tensor(skimage.data.chelsea()), tensor(skimage.data.coffee())
        prepare = lambda images, masks=None, flip=False: comfy.adapter.train.prepare_data(  # noqa: E731
            PixelsVAE, model, images, masks, 64, flip=flip, seed=0)
        together = prepare([cat, coffee])[0]
        assert torch.equal(together, torch.cat([prepare([cat])[0], prepare([coffee])[0]]))
        assert together.shape == (2, 3, 64, 64)
        masks = [torch.ones(1, 300, 451), torch.ones(400, 600)]
        latents, weights, _ = prepare([cat, coffee], masks, flip=True)
        assert latents.shape == (4, 3, 64, 64) and weights.shape == (4, 1, 64, 64)
        with pytest.raises(ValueError, match=r"mask size \(300, 451\) differs from image size \(400, 600\)"):
            prepare([cat, coffee], masks[:1])
        with pytest.raises(ValueError, match="got 3 mask inputs for 2 image batches"):
            prepare([cat, coffee], masks + masks[:1])


def test_only_images_and_masks_may_be_lists(comfy, small_checkpoint, photo_name, monkeypatch):
    monkeypatch.setitem(comfy.nodes.NODE_CLASS_MAPPINGS, "PerfusionTestIntList", IntList)
    graph = train_graph(small_checkpoint.name, photo_name, "listy", "cat", "never-listed", steps=1)
    graph["steps"] = {"class_type": "PerfusionTestIntList", "inputs": {}}
    graph["train"]["inputs"]["steps"] = ["steps", 0]
    with pytest.raises(ExecutionFailed, match="input 'steps' got 2 values: Train makes one concept per run"):
        comfy.run(graph, fresh=True)
