"""Preview renders while training, in a real ComfyUI: they reach the progress bar and the front end, the last ones
are saved as <save_name>.png when training finishes (and only then), and they never change what is trained."""
from __future__ import annotations

import base64
import importlib.util
import io

import pytest
import torch
from PIL import Image

from tools.comfy_host import ExecutionFailed

from graphs import train_graph

PROMPTS = "a photo of a <trigger>\n<trigger>, on a beach"


@pytest.fixture
def recorded(comfy, monkeypatch):
    """Messages to the front end (event, data) and the progress bar's previews (step, preview, the preview images in
    models/perfusion then) of the next runs; the preview sampler cut to 2 steps (CPU)."""
    monkeypatch.setattr(comfy.adapter.previews, "SAMPLER_STEPS", 2)
    messages, bar = [], []
    send = comfy.prompt_server.send_sync
    monkeypatch.setattr(comfy.prompt_server, "send_sync", lambda event, data, *a, **k: (
        messages.append((event, data)), send(event, data, *a, **k)))
    update = comfy.comfy.utils.ProgressBar.update_absolute

    def record(self, value, total=None, preview=None):
        if preview is not None:
            bar.append((value, preview, sorted(p.name for p in comfy.layout.folder("perfusion").glob("*.png"))))
        update(self, value, total, preview)

    monkeypatch.setattr(comfy.comfy.utils.ProgressBar, "update_absolute", record)
    return messages, bar


def decode(url: str) -> Image.Image:
    head, data = url.split(",", 1)
    assert head == "data:image/jpeg;base64"
    return Image.open(io.BytesIO(base64.b64decode(data)))


def test_previews_appear_while_training_and_the_last_are_saved_when_it_finishes(comfy, small_checkpoint, photo_name,
                                                                               recorded):
    messages, bar = recorded
    folder = comfy.layout.folder("perfusion")
    image = folder / "peeky.png"
    graph = train_graph(small_checkpoint.name, photo_name, "peeky", "cat", "peeky", steps=3, preview_every=2,
                        preview_prompts=PROMPTS)
    result = comfy.run(graph, fresh=True)
    previews = [data for event, data in messages if event == "perfusion.preview"]
    assert [(p["step"], len(p["images"])) for p in previews] == [(2, 2), (3, 2)]  # every 2 steps, and at the end
    assert all(p["node"] == "train" for p in previews)
    renders = [decode(url) for url in previews[-1]["images"]]
    assert all(r.size == (64, 64) for r in renders)  # the training resolution
    assert torch.tensor(list(renders[0].tobytes()), dtype=torch.float32).std() > 1  # a picture, not a flat fill
    live = {step: preview for step, preview, _ in bar}
    kind, picture, size = live[3]
    assert kind == "JPEG" and size == 512 and picture.size == (512, 256 + 256)  # the renders above the loss chart
    assert live[2][1].size == (512, 512) and live[1][1].size == (512, 256)  # before the first renders: the chart
    assert all("peeky.png" not in pngs for _, _, pngs in bar), "the preview image was written before training finished"
    saved = Image.open(image)
    assert saved.format == "PNG" and saved.size == (128, 64)  # the last renders, side by side
    assert not list(folder.glob(".peeky.png.*")), "a temporary file was left behind"
    assert result.ui["train"]["text"] == ["saved peeky.safetensors"]
    if importlib.util.find_spec("app.model_manager") is not None:  # ComfyUI's model library (v0.33) finds it
        from app.model_manager import ModelFileManager
        assert str(image) in ModelFileManager().get_model_previews(str(folder / "peeky.safetensors"))


def test_a_run_with_previews_trains_the_same_concept_as_one_without(comfy, small_checkpoint, photo_name, recorded):
    concepts = {}
    for every in (0, 1):
        graph = train_graph(small_checkpoint.name, photo_name, "same", "cat", f"same-{every}", steps=2, seed=7,
                            preview_every=every, preview_prompts=PROMPTS)
        concepts[every], chart = comfy.run(graph, fresh=True)["train"]
    assert [e for e, _ in recorded[0]].count("perfusion.preview") == 2
    off, on = concepts[0].learned, concepts[1].learned
    assert all(torch.equal(off[name], on[name]) for name in off), "previews changed the trained concept"
    assert torch.equal(concepts[0].target_input, concepts[1].target_input)


def test_a_preview_out_of_memory_turns_previews_off_and_training_goes_on(comfy, small_checkpoint, photo_name,
                                                                       recorded, monkeypatch):
    previews = comfy.adapter.previews.Previews
    render = previews.render

    def out_of_memory_at_step_2(self, trainer):
        if trainer.done == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
        return render(self, trainer)

    monkeypatch.setattr(previews, "render", out_of_memory_at_step_2)
    graph = train_graph(small_checkpoint.name, photo_name, "oomy", "cat", "oomy", steps=3, preview_every=1,
                        preview_prompts=PROMPTS)
    with comfy.capture_logs() as logs:
        comfy.run(graph, fresh=True)
    assert any("out of memory rendering the previews at step 2" in line for line in logs), logs
    assert [data["step"] for event, data in recorded[0] if event == "perfusion.preview"] == [1]
    folder = comfy.layout.folder("perfusion")
    assert (folder / "oomy.safetensors").is_file() and not (folder / "oomy.png").exists()


@pytest.mark.parametrize("prompts,message", [
    ("a photo of a cat", "does not name the concept: write <trigger>"),
    ("", "preview_prompts is empty"),
    ("\n".join(["a <trigger>"] * 5), "5 preview prompts: at most 4"),
])
def test_preview_prompts_are_checked_before_training(comfy, small_checkpoint, photo_name, prompts, message):
    graph = train_graph(small_checkpoint.name, photo_name, "peeky", "cat", "never", preview_every=5,
                        preview_prompts=prompts)
    with pytest.raises(ExecutionFailed, match=message):
        comfy.run(graph, fresh=True)
    assert not (comfy.layout.folder("perfusion") / "never.safetensors").exists()

