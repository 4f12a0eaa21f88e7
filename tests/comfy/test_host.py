"""The test host itself: a real ComfyUI loads the random SD1.5 files as SD15, runs graphs deterministically
and text-dependently, applies LoRAs to attn2, reports failures, and serves the same over HTTP."""
from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch", reason="the ComfyUI host tests need torch")

from tools import comfy_host
from tools import smoke_checkpoint as sc

# What a real SD1.5 file also lacks: ComfyUI logs these as "clip missing" for v1-5-pruned too.
CLIP_EXTRA_IN_COMFY = {"text_projection.weight", "logit_scale"}


@pytest.fixture(scope="module")
def loaded(comfy, small_checkpoint):
    """(model, clip, vae, log messages) from ComfyUI's own CheckpointLoaderSimple."""
    with torch.inference_mode(), comfy.capture_logs() as logs:
        model, clip, vae = comfy.node("CheckpointLoaderSimple")().load_checkpoint(small_checkpoint.name)[:3]
    return model, clip, vae, logs


def _shapes(module, strip=""):
    return {k[len(strip):]: tuple(v.shape) for k, v in module.state_dict().items() if k.startswith(strip)}


def test_small_checkpoint_detected_as_sd15_with_exact_layout(comfy, loaded):
    model, clip, vae, logs = loaded
    assert type(model.model.model_config).__name__ == "SD15"
    assert model.model.model_config.unet_config["channel_mult"] == [1, 2]
    problems = [m for m in logs if m.startswith(("unet missing", "unet unexpected", "left over keys", "Missing VAE"))]
    assert not problems, problems
    unet, _, _ = sc.unet_layout("small")
    assert _shapes(model.model.diffusion_model) == unet
    assert _shapes(vae.first_stage_model) == sc.vae_layout()
    comfy_clip = _shapes(clip.cond_stage_model, "clip_l.transformer.text_model.")
    assert {k: v for k, v in comfy_clip.items() if k not in CLIP_EXTRA_IN_COMFY} == sc.clip_layout()


def test_small_unet_attn2_layers(loaded):
    model = loaded[0]
    found = {name: mod.to_k.weight.shape[0] for name, mod in model.model.diffusion_model.named_modules()
             if name.endswith(".attn2")}
    assert found == sc.SMALL_ATTN2
    assert all(mod.weight.shape[1] == 768 for name, mod in model.model.diffusion_model.named_modules()
               if name.endswith(("attn2.to_k", "attn2.to_v")))


@pytest.mark.parametrize("variant", ["small", "full"])
def test_layouts_are_detected_as_sd15_from_shapes(comfy, variant):
    """ComfyUI's detection on the layout alone (meta tensors: nothing generated or allocated)."""
    import comfy.model_detection as md
    unet, attn2, _ = sc.unet_layout(variant)
    sd = {"model.diffusion_model." + k: torch.empty(s, device="meta", dtype=torch.float16) for k, s in unet.items()}
    cfg = md.model_config_from_unet(sd, "model.diffusion_model.")
    assert type(cfg).__name__ == "SD15"
    assert cfg.unet_config["context_dim"] == 768 and cfg.unet_config["model_channels"] == 320
    if variant == "full":
        assert cfg.unet_config["num_res_blocks"] == [2, 2, 2, 2]
        assert cfg.unet_config["transformer_depth_output"] == [1] * 9 + [0] * 3
        assert sum(math.prod(s) for s in unet.values()) == 859_520_964  # SD1.5's UNet parameter count
        from tools.factories import SD15_LAYERS
        assert attn2 == SD15_LAYERS


def test_clip_encodings_are_finite_and_token_dependent(comfy, loaded):
    clip = loaded[1]
    encode = comfy.node("CLIPTextEncode")()
    with torch.inference_mode():
        a, a2, b = (encode.encode(clip, t)[0][0][0][0].float() for t in
                    ("a photo of a cat", "a photo of a cat", "a red car on a road"))
    assert a.shape == (77, 768) and torch.isfinite(a).all()
    assert torch.equal(a, a2)
    assert a.std(dim=-1).min() > 0.5  # no collapsed positions
    content = torch.nn.functional.cosine_similarity(a[2:7], b[2:7], dim=-1)
    assert content.max() < 0.95, content  # the words differ, so do their encodings


def test_txt2img_graph_is_deterministic_and_text_dependent(comfy, small_checkpoint):
    cat = comfy_host.txt2img_prompt(small_checkpoint.name, "a photo of a cat", negative="blurry", seed=7)
    car = comfy_host.txt2img_prompt(small_checkpoint.name, "a red car on a road", negative="blurry", seed=7)
    r1 = comfy.run(cat)
    r2 = comfy.run(cat, fresh=True)  # a new executor: every node runs again
    r3 = comfy.run(car)
    assert comfy.progress[-1] == (2, 2)  # KSampler's ProgressBar reaches the host's progress hook
    l1, l2, l3 = (r["5"][0]["samples"] for r in (r1, r2, r3))
    assert l1.shape == (1, 4, 8, 8) and torch.isfinite(l1).all()
    assert torch.equal(l1, l2)
    assert (l1 - l3).abs().mean() > 0.05 * l1.abs().mean()
    image = r1["6"][0]
    assert image.shape == (1, 64, 64, 3) and image.std() > 0.02  # not a flat image
    preview = r1.ui["7"]["images"][0]
    assert (comfy.layout.temp / preview["subfolder"] / preview["filename"]).is_file()


def test_lora_patches_every_attn2_key(comfy, small_checkpoint, small_lora, loaded):
    model, clip = loaded[:2]
    with torch.inference_mode(), comfy.capture_logs() as logs:
        patched, _ = comfy.node("LoraLoader")().load_lora(model, clip, small_lora.name, 1.0, 1.0)
    assert not [m for m in logs if "lora key not loaded" in m]
    expected = {f"diffusion_model.{layer}.{p}.weight" for layer in sc.SMALL_ATTN2 for p in ("to_k", "to_v")}
    assert set(patched.patches) == expected
    prompt = comfy_host.txt2img_prompt(small_checkpoint.name, "a photo of a cat", negative="blurry", seed=7)
    base = comfy.run(prompt)["5"][0]["samples"]  # cached when the txt2img test ran first
    prompt["8"] = {"class_type": "LoraLoader",
                   "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": small_lora.name,
                              "strength_model": 1.0, "strength_clip": 1.0}}
    prompt["5"]["inputs"]["model"] = ["8", 0]
    with_lora = comfy.run(prompt)["5"][0]["samples"]
    assert not torch.equal(base, with_lora)


def test_failures_raise_with_comfyui_message(comfy, small_checkpoint):
    bad_name = comfy_host.txt2img_prompt("no-such-model.safetensors", "x")
    with pytest.raises(comfy_host.ExecutionFailed, match="ckpt_name"):
        comfy.run(bad_name)
    broken = comfy.layout.folder("checkpoints") / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    comfy.refresh_models()
    with pytest.raises(comfy_host.ExecutionFailed, match=r"node 1 \(CheckpointLoaderSimple\) failed"):
        comfy.run(comfy_host.txt2img_prompt(broken.name, "x"))


def test_pack_loads_as_custom_node(comfy):
    if not (comfy_host.REPO / "__init__.py").is_file():
        pytest.skip("the pack has no __init__.py yet")
    assert comfy.pack is not None, comfy.pack_error
    for name, cls in comfy.pack.NODE_CLASS_MAPPINGS.items():
        assert comfy.nodes.NODE_CLASS_MAPPINGS.get(name) is cls


def test_server_object_info(server):
    info = server.get("/object_info")
    for node in ("CheckpointLoaderSimple", "CLIPTextEncode", "KSampler", "VAEDecode", "LoraLoader", "SaveImage"):
        assert node in info
    assert "sd15-small-random.safetensors" in info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    if (comfy_host.REPO / "__init__.py").is_file():
        assert any(name.startswith("Perfusion") for name in info), "the pack's nodes are not served"


def test_server_runs_prompt(server):
    prompt = comfy_host.txt2img_prompt("sd15-small-random.safetensors", "a photo of a cat", seed=1, output="SaveImage")
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success"
    image = entry["outputs"]["7"]["images"][0]
    assert (server.layout.output / image["subfolder"] / image["filename"]).is_file()
    assert server.view(image["filename"], image["subfolder"], image["type"]).startswith(b"\x89PNG")
    prompt["5"]["inputs"]["steps"] = 0  # below KSampler's minimum: rejected by validation
    with pytest.raises(comfy_host.ExecutionFailed, match="HTTP 400"):
        server.queue(prompt)
