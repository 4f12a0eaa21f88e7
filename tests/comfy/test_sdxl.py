"""SDXL in a real ComfyUI, on its own SDXL classes: the text side (the core's differentiable CLIP forward gives the
2048-wide context of CLIP-L and OpenCLIP bigG, layer -2, no final norm, and bigG's pooled output, as ComfyUI's encode
does; trigger words in both token lists), Apply and the global key lock on an SDXL UNet, and Train → Load → Apply →
render → Export. The models are ComfyUI's SDXL classes with random weights, built in process (tools/sdxl_models.py):
the CLIP at 3 layers per encoder (full widths), the UNet at reduced width and depth (2048-wide context, 2816-wide
``y``)."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="the ComfyUI host tests need torch")

from perfusion_ops.clip_text import ClipTextForward  # noqa: E402
from tools import sdxl_models  # noqa: E402


@pytest.fixture(scope="module")
def sdxl_clip(comfy):
    if not sdxl_models.can_shorten_text_encoders():
        pytest.skip(f"{comfy.label}: its CLIP takes no model_options, so no reduced SDXL text encoder can be built")
    return sdxl_models.sdxl_clip()


@pytest.fixture(scope="module")
def full_sdxl_clip(sdxl_clip):
    """The two text encoders at full size (12 and 32 layers), as SDXL checkpoints hold them."""
    return sdxl_models.sdxl_clip(text_layers=None)


@pytest.mark.parametrize("which", ["3 layers", "full size"])
def test_the_core_forward_is_comfyuis_sdxl_encode(request, which):
    sdxl_clip = request.getfixturevalue("sdxl_clip" if which == "3 layers" else "full_sdxl_clip")
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
        g_hidden, pooled = forward.hidden_and_pooled(forward.embed(ids), -2, False, eos,
                                                     encoders.clip_g.transformer.text_projection.weight)
        assert torch.equal(g_hidden, hidden[1])  # one pass gives the same hidden states as the layers alone
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
def loaded_sd15(comfy, small_checkpoint):
    """(MODEL, CLIP, VAE) of the SD1.5 smoke checkpoint; its KL-f8 VAE has the structure SDXL's has."""
    with torch.inference_mode():
        return comfy.node("CheckpointLoaderSimple")().load_checkpoint(small_checkpoint.name)[:3]


@pytest.fixture(scope="module")
def loaded_sd15_clip(loaded_sd15):
    return loaded_sd15[1]


@pytest.fixture(scope="module")
def sdxl_model(comfy, sdxl_clip):
    return sdxl_models.sdxl_model()


def render(comfy, model, clip, prompt, encoder="CLIPTextEncode"):
    with torch.inference_mode():
        positive = comfy.node(encoder)().encode(clip, prompt)[0]
        negative = comfy.node("CLIPTextEncode")().encode(clip, "")[0]
        latent = comfy.node("EmptyLatentImage")().generate(64, 64, 1)[0]
        samples = comfy.nodes.common_ksampler(model, 7, 2, 5.0, "euler", "normal", positive, negative, latent)
    return samples[0]["samples"]


def test_apply_edits_an_sdxl_unet_and_strength_zero_is_the_plain_one(comfy, sdxl_model, sdxl_clip):
    from perfusion_ops.modules import cross_attention_layers
    from tools.factories import random_concept

    layers = cross_attention_layers(sdxl_model.model.diffusion_model)
    assert len(layers) == 7 and set(layers.values()) == {64, 128}
    concept = random_concept(width=2048, layers=layers)
    concept.clip_layer = -2  # SDXL's default layer: what a concept trained on an SDXL checkpoint records
    apply = comfy.node("PerfusionApply")().apply
    model, clip = apply(sdxl_model, sdxl_clip, concept, 0.7, 0.15, "local")
    off, _ = apply(sdxl_model, sdxl_clip, concept, 0.7, 0.15, "local", strength=0.0)
    prompt = "a photo of hugsy on a table"
    plain, edited, at_zero = (render(comfy, m, clip, prompt) for m in (sdxl_model, model, off))
    assert not torch.equal(plain, edited)
    assert torch.equal(plain, at_zero)  # strength 0: the SDXL model as it was, bit for bit
    assert not sdxl_model.object_patches  # the host's model holds no patch of ours
    locked = render(comfy, model, clip, prompt, encoder="PerfusionGlobalKeyLock")  # K sees 'a photo of teddy on…'
    assert not torch.equal(locked, edited) and torch.isfinite(locked).all()
    other = random_concept(seed=5, width=2048, layers=layers, trigger="zorbo", superclass="teapot")
    other.clip_layer = -2
    both, both_clip = apply(model, clip, other, 0.7, 0.15, "local")  # two concepts: one joint edit (Eq. 4)
    assert [e.concept.trigger for e in comfy.adapter.patching.applied_concepts(both)] == ["hugsy", "zorbo"]
    two = render(comfy, both, both_clip, "a photo of hugsy and zorbo on a table")
    assert not torch.equal(two, render(comfy, model, both_clip, "a photo of hugsy and zorbo on a table"))


def test_the_sdxl_training_host_encodes_as_comfyui_and_trains_both_rows(comfy, sdxl_model, sdxl_clip):
    """The differentiable SDXL text path equals ComfyUI's encode; a few Perfusion steps on the SDXL UNet move the
    CLIP-L and the bigG row of the trigger (bigG's also through y) and leave the UNet as it was."""
    from perfusion_comfy.training_host_sdxl import SdxlTrainingHost
    from perfusion_ops.training import Sample, TrainSettings, Trainer

    prompts = ["a photo of a cat on a sofa", "two red apples"]
    with torch.inference_mode():
        want = torch.cat([sdxl_clip.encode_from_tokens(sdxl_clip.tokenize(p)) for p in prompts])
    before = {k: v.clone() for k, v in sdxl_model.model.diffusion_model.state_dict().items()}
    with torch.inference_mode(False):
        host = SdxlTrainingHost(sdxl_model, sdxl_clip, clip_layer=-2)
        got = host.encode_plain(prompts)
        assert torch.allclose(got, want, atol=2e-5), (got - want).abs().max()
        trainer = Trainer(host, "hugsy", "cat", torch.eye(2048), TrainSettings(steps=3, batch_size=1, grad_accum=1))
        start = trainer.params.embedding.detach().clone()
        latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        for _ in range(3):
            trainer.step(lambda rng, batch: Sample(latents, None, ["a photo of hugsy"]))
        moved = (trainer.params.embedding.detach() - start).abs()
    assert moved[0, :768].max() > 0 and moved[0, 768:].max() > 0
    after = sdxl_model.model.diffusion_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_train_save_load_apply_render_on_sdxl(comfy, sdxl_model, sdxl_clip, loaded_sd15, monkeypatch):
    """Train Concept on the SDXL model (2 steps, a real photo, a preview render), then Load, Apply and render with the
    saved file; the file says what it is for and Export writes SDXL's embedding layout."""
    import numpy as np
    import skimage.data
    from safetensors.torch import load_file

    photos = torch.from_numpy(skimage.data.chelsea().astype(np.float32) / 255)[None]
    monkeypatch.setattr(comfy.adapter.previews, "SAMPLER_STEPS", 2)
    with torch.inference_mode():  # as ComfyUI's executor runs a node
        concept, _ = comfy.node("PerfusionTrainConcept")().run(
            [photos], None, sdxl_model, sdxl_clip, loaded_sd15[2], "hugsy", "cat", steps=2, batch_size=1,
            grad_accum=1, lr_values=0.03, lr_embedding=0.006, train_beta=0.75, train_tau=0.1, flip=True,
            resolution=64, seed=0, save_name="sdxl-hugsy", checkpoint_every=0, covariance_captions=16,
            preview_every=2)["result"]
    assert (comfy.layout.folder("perfusion") / "sdxl-hugsy.png").is_file()  # the last preview render, saved
    loaded = comfy.node("PerfusionLoadConcept")().load("sdxl-hugsy.safetensors")[0]
    assert (loaded.model_family, loaded.text_encoder, loaded.width, loaded.clip_layer) == ("sdxl", "clip-l+clip-g",
                                                                                        2048, -2)
    assert len(loaded.layers) == 7 and torch.allclose(loaded.embedding.float(), concept.embedding.float(), atol=1e-3)
    model, clip = comfy.node("PerfusionApply")().apply(sdxl_model, sdxl_clip, loaded, 0.7, 0.15, "local")
    assert not torch.equal(render(comfy, sdxl_model, clip, "a photo of hugsy"),
                           render(comfy, model, clip, "a photo of hugsy"))
    comfy.node("PerfusionExportEmbedding")().export(loaded, "sdxl-hugsy-ti")
    exported = load_file(comfy.layout.folder("embeddings") / "sdxl-hugsy-ti.safetensors")
    assert {k: tuple(v.shape) for k, v in exported.items()} == {"clip_l": (1, 768), "clip_g": (1, 1280)}


def test_training_encodes_a_trigger_prompt_as_comfyui_encodes_it_after_apply(sdxl_model, sdxl_clip):
    """The training host's encoding of a prompt with the learned vector is what Apply's CLIP gives for it: context
    (both encoders) and pooled output. The trigger's placeholder is an end-token id, which must not be taken for the
    prompt's end (bigG's padding and the pooled output start there)."""
    from perfusion_comfy.tokenizer import with_concepts
    from perfusion_comfy.training_host_sdxl import SdxlTrainingHost
    from tools.factories import random_concept

    concept = random_concept(width=2048, layers={"input_blocks.1.1.transformer_blocks.0.attn2": 64})
    concept.embedding = torch.randn(1, 2048, generator=torch.Generator().manual_seed(3)) * 0.02
    tokenizer = with_concepts(sdxl_clip.tokenizer, {"hugsy": concept})
    with torch.inference_mode(False):
        host = SdxlTrainingHost(sdxl_model, sdxl_clip, clip_layer=-2)
    for prompt in ("a photo of a hugsy", "A hugsy shown in a photo"):
        with torch.no_grad():
            context, _ = host.encode([prompt], "hugsy", concept.embedding)
            pooled = host.pooled_output()
        with torch.inference_mode():
            tokens = tokenizer.tokenize_with_weights(prompt)
            want, want_pooled = sdxl_clip.encode_from_tokens(tokens, return_pooled=True)
        assert torch.allclose(context.float(), want, atol=2e-5), (prompt, (context.float() - want).abs().max())
        assert torch.allclose(pooled, want_pooled, atol=2e-5), (prompt, (pooled - want_pooled).abs().max())


def test_a_concept_of_the_other_family_is_refused_for_its_family_and_sdxl_layers_below_12_are_refused(
        comfy, sdxl_model, sdxl_clip, loaded_sd15):
    from perfusion_comfy.clip_layer import clip_layer
    from tools.factories import random_concept
    from tools.smoke_checkpoint import attn2_layers

    apply = comfy.node("PerfusionApply")().apply
    sd15 = random_concept(layers=attn2_layers("small"))
    with pytest.raises(Exception, match=r"made for SD1.x \(CLIP-L\) text encodings, but this model's text encoder "
                                        r"gives SDXL \(CLIP-L \+ OpenCLIP bigG\)"):
        apply(sdxl_model, sdxl_clip, sd15, 0.7, 0.15, "local")
    sdxl = random_concept(width=2048, layers={"input_blocks.1.1.transformer_blocks.0.attn2": 64})
    sdxl.clip_layer = -2
    with pytest.raises(Exception, match=r"made for SDXL .* but this model's text encoder gives SD1.x"):
        apply(loaded_sd15[0], loaded_sd15[1], sdxl, 0.7, 0.15, "local")
    deep = sdxl_clip.clone()
    deep.clip_layer(-13)
    with pytest.raises(ValueError, match="CLIP Set Last Layer -13 on SDXL: ComfyUI then keeps CLIP-L"):
        clip_layer(deep)
