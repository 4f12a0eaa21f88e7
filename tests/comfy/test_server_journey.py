"""A user's session over HTTP, against ``main.py`` as users run it (in CI: the 2024 tree and v0.33): train two
concepts, apply one, combine both, the global key lock, LoRA + Perfusion, export an embedding and use it, and a
refused graph that leaves the server serving. Each result is compared with the run it must differ from."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from graphs import sampling_graph, train_graph

torch = pytest.importorskip("torch", reason="the ComfyUI server tests need torch")
from safetensors.torch import load_file

CKPT, LORA = "sd15-small-random.safetensors", "sd15-small-random-lora.safetensors"
PROMPT = "a photo of a {} on a wooden table"


@pytest.fixture(scope="module")
def trained(server):
    """hugsy (cat) and zorbo (dog), each trained through POST /prompt (2 steps)."""
    import skimage.data

    Image.fromarray(skimage.data.chelsea()).save(server.layout.input / "chelsea.png")
    for trigger, superclass in (("hugsy", "cat"), ("zorbo", "dog")):
        entry = server.run(train_graph(CKPT, "chelsea.png", trigger, superclass, f"journey-{trigger}"))
        assert entry["status"]["status_str"] == "success"
    return {t: f"journey-{t}.safetensors" for t in ("hugsy", "zorbo")}


def latent(server, graph) -> torch.Tensor:
    """Run ``graph`` and read the latent its SaveLatent node wrote."""
    saved = server.run(graph)["outputs"]["save"]["latents"][0]
    return load_file(server.layout.output / saved["subfolder"] / saved["filename"])["latent_tensor"]


def differ(a, b) -> bool:
    return (a - b).abs().mean() > 1e-3 * a.abs().mean()


def test_trained_files_are_served_as_concepts(server, trained):
    info = server.get(f"/perfusion/concept_info?name={trained['zorbo']}")
    assert (info["trigger"], info["superclass"], info["layers"]) == ("zorbo", "dog", 7)
    assert info["size"] < 64 * 1024


def test_apply_combine_keylock_and_lora(server, trained):
    hugsy, zorbo = (trained["hugsy"], 0.7, 0.15), (trained["zorbo"], 0.7, 0.15)
    plain = latent(server, sampling_graph(CKPT, PROMPT.format("hugsy")))
    one = latent(server, sampling_graph(CKPT, PROMPT.format("hugsy"), [hugsy]))
    both = latent(server, sampling_graph(CKPT, "a hugsy next to a zorbo", [hugsy, zorbo]))
    both_plain = latent(server, sampling_graph(CKPT, "a hugsy next to a zorbo", [hugsy]))
    keylock = latent(server, sampling_graph(CKPT, PROMPT.format("hugsy"), [hugsy], keylock=True))
    lora = latent(server, sampling_graph(CKPT, PROMPT.format("hugsy"), [hugsy], lora=LORA))
    lora_only = latent(server, sampling_graph(CKPT, PROMPT.format("hugsy"), lora=LORA))
    assert differ(one, plain), "the concept changed nothing"
    assert differ(both, both_plain), "the second concept changed nothing"
    assert differ(keylock, one), "the global key lock changed nothing"
    assert differ(lora, one) and differ(lora, lora_only), "LoRA and Perfusion did not both act"


def test_exported_embedding_works_in_a_plain_prompt(server, trained):
    export = {"load": {"class_type": "PerfusionLoadConcept", "inputs": {"concept_name": trained["hugsy"]}},
              "export": {"class_type": "PerfusionExportEmbedding", "inputs": {"concept": ["load", 0],
                                                                              "name": "journey-hugsy-ti"}}}
    message = server.run(export)["outputs"]["export"]["text"][0]
    written = Path(message.split()[1].rstrip(";"))  # "wrote <path>; use embedding:<name> in prompts"
    try:  # the first embeddings folder of the server, which may be the ComfyUI tree's own
        assert written.name == "journey-hugsy-ti.safetensors" and written.is_file()
        with_embedding = latent(server, sampling_graph(CKPT, PROMPT.format("embedding:journey-hugsy-ti")))
        without = latent(server, sampling_graph(CKPT, PROMPT.format("")))
        assert differ(with_embedding, without)
    finally:
        written.unlink(missing_ok=True)


def test_clip_skip_after_apply_is_refused_and_the_server_serves_on(server, trained):
    graph = sampling_graph(CKPT, PROMPT.format("hugsy"), [(trained["hugsy"], 0.7, 0.15)])
    graph["skip"] = {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["apply0", 1], "stop_at_clip_layer": -2}}
    graph["pos"]["inputs"]["clip"] = ["skip", 0]
    with pytest.raises(Exception, match="trained on CLIP layer -1"):
        server.run(graph)
    assert server.run(sampling_graph(CKPT, PROMPT.format("cat"), steps=1))["status"]["status_str"] == "success"
