"""SDXL's text side in a real ComfyUI: the core's differentiable CLIP forward, on ComfyUI's own SDXL CLIP weights,
gives the 2048-wide context (CLIP-L and OpenCLIP bigG, layer -2, no final norm) and bigG's pooled output that
ComfyUI's encode gives. The CLIP is ComfyUI's SDXL class at 3 layers per encoder (full widths, random weights)."""
from __future__ import annotations

import importlib
import inspect

import pytest

torch = pytest.importorskip("torch", reason="the ComfyUI host tests need torch")

from perfusion_ops.clip_text import ClipTextForward  # noqa: E402

SDXL_UNET = {"model_channels": 320, "use_linear_in_transformer": True, "transformer_depth": [0, 0, 2, 2, 10, 10],
             "context_dim": 2048, "adm_in_channels": 2816, "use_temporal_attention": False}


def random_fill(module: torch.nn.Module, seed: int = 0) -> None:
    """ComfyUI leaves its layers uninitialised: weights N(0, 0.02), norms 1, biases 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            else:
                p.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)


@pytest.fixture(scope="module")
def sdxl_clip(comfy):
    sd, supported = (importlib.import_module(f"comfy.{name}") for name in ("sd", "supported_models"))
    if "model_options" not in inspect.signature(sd.CLIP).parameters:
        pytest.skip(f"{comfy.label}: its CLIP takes no model_options, so no reduced SDXL text encoder can be built")
    small = {"num_hidden_layers": 3}
    options = {"dtype": torch.float32, "clip_l_model_config": small, "clip_g_model_config": small}
    clip = sd.CLIP(supported.SDXL(SDXL_UNET).clip_target(), model_options=options)
    random_fill(clip.cond_stage_model)
    return clip


def test_the_core_forward_is_comfyuis_sdxl_encode(sdxl_clip):
    encoders = sdxl_clip.cond_stage_model
    for prompt in ("a photo of a cat on a sofa", "two red apples"):
        tokens = sdxl_clip.tokenize(prompt)
        with torch.inference_mode():
            want, want_pooled = sdxl_clip.encode_from_tokens(tokens, return_pooled=True)
        hidden = []
        for key, encoder, activation in (("l", encoders.clip_l, "quick_gelu"), ("g", encoders.clip_g, "gelu")):
            forward = ClipTextForward(encoder.transformer.text_model.state_dict(), activation)
            ids = torch.tensor([[token[0] for token in tokens[key][0]]])
            hidden.append(forward(forward.embed(ids), -2, final_norm=False))
        eos = (ids == sdxl_clip.tokenizer.clip_g.end_token).int().argmax(1)
        pooled = forward.pooled(forward.embed(ids), eos, encoders.clip_g.transformer.text_projection.weight)
        assert torch.allclose(torch.cat(hidden, -1), want, atol=2e-5), (torch.cat(hidden, -1) - want).abs().max()
        assert torch.allclose(pooled, want_pooled, atol=2e-5), (pooled - want_pooled).abs().max()


def test_a_trigger_word_is_both_encoders_learned_rows_as_comfyuis_own_sdxl_embedding_gives(sdxl_clip, tmp_path):
    """The trigger becomes the CLIP-L row in the "l" tokens and the bigG row in the "g" tokens; encoded, that is
    exactly what ComfyUI's own ``embedding:<name>`` gives for the exported file (its SDXL clip_l/clip_g layout)."""
    from perfusion_comfy.tokenizer import with_concepts
    from perfusion_ops.concept_file import export_embedding
    from tools.factories import random_concept

    concept = random_concept(width=2048, layers={"input_blocks.4.1.transformer_blocks.0.attn2": 640})
    concept.embedding = torch.randn(1, 2048, generator=torch.Generator().manual_seed(3)) * 0.02
    tokenizer = with_concepts(sdxl_clip.tokenizer, {"hugsy": concept})
    tokens = tokenizer.tokenize_with_weights("a photo of hugsy, studio light")
    assert torch.equal(tokens["l"][0][4][0], concept.embedding[0, :768])
    assert torch.equal(tokens["g"][0][4][0], concept.embedding[0, 768:])
    assert tokenizer.triggers_in(tokens) == {"hugsy"}
    export_embedding(concept, tmp_path / "hugsy-ti.safetensors")
    reference = sdxl_clip.clone()
    reference.tokenizer = type(sdxl_clip.tokenizer)(embedding_directory=str(tmp_path))
    with torch.inference_mode():
        got, got_pooled = sdxl_clip.encode_from_tokens(tokens, return_pooled=True)
        want, want_pooled = reference.encode_from_tokens(
            reference.tokenize("a photo of embedding:hugsy-ti, studio light"), return_pooled=True)
    assert torch.allclose(got, want, atol=1e-5) and torch.allclose(got_pooled, want_pooled, atol=1e-5)


def test_sdxl_encodes_from_layer_minus_two_unless_set(sdxl_clip, loaded_sd15_clip):
    """SDXL's default is the penultimate layer of both encoders, SD1.x's the last: a concept's layer check must
    compare with what the CLIP really encodes from."""
    from perfusion_comfy.clip_layer import clip_layer
    assert clip_layer(sdxl_clip) == -2 and clip_layer(loaded_sd15_clip) == -1
    for layer in (-1, -3):
        skip = sdxl_clip.clone()
        skip.clip_layer(layer)
        assert clip_layer(skip) == layer
    assert clip_layer(sdxl_clip) == -2


@pytest.fixture(scope="module")
def loaded_sd15_clip(comfy, small_checkpoint):
    with torch.inference_mode():
        return comfy.node("CheckpointLoaderSimple")().load_checkpoint(small_checkpoint.name)[1]
