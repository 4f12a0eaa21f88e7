"""Perfusion Train Concept in a real ComfyUI, on the small random SD1.5 checkpoint and real photos."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import perfusion_ops.training
from perfusion_ops.concept_file import load_concept

from graphs import sampling_graph, train_graph


@pytest.fixture(scope="module")
def loaded(comfy, small_checkpoint):
    with torch.inference_mode():
        return comfy.node("CheckpointLoaderSimple")().load_checkpoint(small_checkpoint.name)[:3]


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes: equal bit patterns compare equal, NaN included."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def changed(a, b) -> list[str]:
    """What differs between two state dicts: keys gained or lost, then tensors with their dtype/device/largest change
    (so a rare failure says which weight moved, and how). Compared bit for bit: a weight the checkpoint lacks (the
    small checkpoint has no CLIP text_projection, like SD1.5 files) is left uninitialised by ComfyUI, and memory
    that happens to hold NaN never equals itself under torch.equal — the cause of this test's rare failures."""
    out = [f"keys {sorted(a.keys() ^ b.keys())[:5]}"] if a.keys() != b.keys() else []
    for k in a.keys() & b.keys():
        x, y = a[k], b[k]
        if x.shape != y.shape or x.dtype != y.dtype or not torch.equal(bits(x), bits(y)):
            delta = (x.float() - y.float().to(x.device)).abs().max().item() if x.shape == y.shape else "shape"
            out.append(f"{k}: {x.dtype}/{x.device} -> {y.dtype}/{y.device}, max change {delta}")
    return out


def test_a_weight_holding_nan_is_unchanged_when_its_bits_are():
    before = {"w": torch.tensor([float("nan"), 1.0], dtype=torch.float16)}
    assert changed(before, {"w": before["w"].clone()}) == []  # torch.equal says NaN != NaN
    assert changed(before, {"w": torch.tensor([float("nan"), 2.0], dtype=torch.float16)})[0].startswith("w: ")


def photos(count=2):
    import skimage.data

    cat = torch.from_numpy(skimage.data.chelsea().astype(np.float32) / 255)
    return torch.stack([cat, cat.flip(1)][:count])


def test_differentiable_clip_matches_comfyui_encode(comfy, loaded):
    """The training text path (core ClipTextForward on ComfyUI's weights) equals ComfyUI's encode, clip skip too."""
    model, clip, _ = loaded
    prompts = ["a photo of a cat on a sofa", "two red apples, studio light, 35mm"]
    for layer in (-1, -2):
        with torch.inference_mode():
            skip = clip.clone()
            skip.clip_layer(layer)
            want = torch.cat([skip.encode_from_tokens(skip.tokenize(p)) for p in prompts])
        with torch.inference_mode(False):
            got = comfy.adapter.training_host.ComfyTrainingHost(model, skip, layer).encode_plain(prompts)
        assert torch.allclose(got.cpu(), want.float(), atol=2e-5, rtol=1e-5), (got.cpu() - want).abs().max()


def test_training_lowers_the_fixed_loss_and_touches_only_what_it_learns(comfy, loaded):
    model, clip, vae = loaded
    training, host_mod = perfusion_ops.training, comfy.adapter.training_host
    unet_before, clip_before = state(model.model.diffusion_model), state(clip.cond_stage_model)
    with torch.inference_mode():
        latents, _, _ = comfy.adapter.train.prepare_data(vae, model, [photos()], None, 64, flip=True, seed=0)
    with torch.inference_mode(False):
        host = host_mod.ComfyTrainingHost(model, clip)
        settings = training.TrainSettings(steps=6, batch_size=2, grad_accum=1, lr_values=0.05, lr_embedding=0.01)
        trainer = training.Trainer(host, "hugsy", "cat", torch.eye(768), settings)
        latents = latents.clone()
        fixed = training.Sample(latents, None, ["a photo of a hugsy"] * len(latents))
        g = torch.Generator().manual_seed(5)
        noise, timesteps = torch.randn(latents.shape, generator=g), torch.tensor([100, 400, 700, 900])
        start_concept = trainer.concept()
        before = trainer.evaluate(fixed, noise, timesteps)

        def draw(rng, n):
            return training.Sample(latents[[rng.randrange(len(latents)) for _ in range(n)]], None,
                                   training.prompts_for("hugsy", rng, n))

        result = training.run(trainer, draw)
        after = trainer.evaluate(fixed, noise, timesteps)
    assert after < before, (before, after)
    end = result.concept
    assert not torch.equal(end.embedding, start_concept.embedding)
    assert all(not torch.equal(end.value_outputs[l], start_concept.value_outputs[l]) for l in end.layers)
    assert end.key_outputs is None and torch.equal(end.superclass_encoding, start_concept.superclass_encoding)
    assert not (moved := changed(unet_before,
                                 state(model.model.diffusion_model))), f"UNet weights changed: {moved[:8]}"
    assert not (moved := changed(clip_before, state(clip.cond_stage_model))), f"CLIP weights changed: {moved[:8]}"
    assert all(p.grad is None for p in model.model.diffusion_model.parameters()), "UNet weights got gradients"


def test_train_node_end_to_end_saves_a_small_loadable_file(comfy, small_checkpoint, photo_name):
    plain = sampling_graph(small_checkpoint.name, "a photo of a cat", seed=9)
    before = comfy.run(plain, fresh=True)["k"][0]["samples"]
    result = comfy.run(train_graph(small_checkpoint.name, photo_name, "kitto", "cat", "kitto", steps=2))
    concept, chart = result["train"]
    assert chart.shape[0] == 1 and chart.shape[-1] == 3 and chart.std() > 0
    path = comfy.layout.folder("perfusion") / "kitto.safetensors"
    assert path.stat().st_size < 64 * 1024
    loaded = comfy.run(sampling_graph(small_checkpoint.name, "a photo of a kitto", [("kitto.safetensors", .7, .15)]))
    assert loaded["load0"][0].trigger == "kitto" and loaded["load0"][0].layers == concept.layers
    after = comfy.run(plain, fresh=True)["k"][0]["samples"]
    assert torch.equal(before, after), "sampling changed after training: the models were not restored"


def test_interrupt_keeps_the_earlier_file_and_the_last_checkpoint(comfy, small_checkpoint, photo_name, monkeypatch):
    comfy.run(train_graph(small_checkpoint.name, photo_name, "stoppy", "cat", "stoppy", steps=1))
    path = comfy.layout.folder("perfusion") / "stoppy.safetensors"
    earlier = path.read_bytes()
    mm, utils = comfy.model_management, comfy.comfy.utils
    original = utils.ProgressBar.update_absolute

    def press_interrupt_at_step_2(self, value, total=None, preview=None):
        original(self, value, total, preview)
        if total == 4 and value == 2:
            mm.interrupt_current_processing(True)

    monkeypatch.setattr(utils.ProgressBar, "update_absolute", press_interrupt_at_step_2)
    graph = train_graph(small_checkpoint.name, photo_name, "stoppy", "cat", "stoppy", steps=4, checkpoint_every=1,
                        seed=1)
    with pytest.raises(Exception):
        comfy.run(graph, fresh=True)
    assert path.read_bytes() == earlier, "an interrupted run replaced the earlier concept file"
    checkpoint = comfy.layout.folder("perfusion") / "stoppy-checkpoint.safetensors"
    assert checkpoint.is_file()
    assert load_concept(checkpoint).info["steps"] == "4"


@pytest.mark.parametrize("case,message", [
    ("no images", "no training images"),
    ("mask size", "mask size"),
    ("empty trigger", "trigger word"),
    ("steps 0", "steps must be at least 1"),
    ("bad name", "plain file name"),
])
def test_bad_training_inputs_give_clear_errors(comfy, loaded, case, message):
    model, clip, vae = loaded
    images = photos(1)
    kwargs = dict(model=model, clip=clip, vae=vae, images=images, trigger_word="hugsy", superclass="cat", steps=1,
                  batch_size=1, grad_accum=1, lr_values=0.03, lr_embedding=0.006, train_beta=0.75, train_tau=0.1,
                  flip=False, resolution=64, seed=0, save_name="bad", checkpoint_every=0, covariance_captions=16)
    kwargs |= {"no images": {"images": images[:0]}, "mask size": {"masks": torch.ones(1, 64, 64)},
               "empty trigger": {"trigger_word": "  "}, "steps 0": {"steps": 0},
               "bad name": {"save_name": "../../etc/bad"}}[case]
    with pytest.raises(ValueError, match=message), torch.inference_mode():
        comfy.node("PerfusionTrainConcept")().train(**kwargs)


def test_multi_token_superclass_follows_the_documented_rule(comfy, loaded):
    model, clip, _ = loaded
    host_mod = comfy.adapter.training_host
    with torch.inference_mode(False):
        host = host_mod.ComfyTrainingHost(model, clip)
        embedding, e_sup = host.superclass("teddy bear")
        pieces = host.word_ids("teddy") + host.word_ids("bear")
        assert torch.allclose(embedding[0], host.text.token_table[pieces].mean(0))
        context = host.encode_plain(["a photo of a teddy bear"])
        ids = host.token_ids("a photo of a teddy bear")[0]
        assert ids[5:5 + len(pieces)] == pieces  # BOS, a, photo, of, a, then the superclass pieces
        assert torch.allclose(e_sup, context[0, 5 + len(pieces) - 1], atol=1e-5)
        single_embedding, single = host.superclass("cat")
        assert torch.allclose(single, host.encode_plain(["a photo of a cat"])[0, 5], atol=1e-5)


def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients(comfy, loaded, monkeypatch):
    model, clip, _ = loaded
    training, host_mod = perfusion_ops.training, comfy.adapter.training_host
    calls = []
    original = host_mod.checkpoint
    monkeypatch.setattr(host_mod, "checkpoint", lambda *a, **k: calls.append(type(a[1]).__name__) or original(*a, **k))
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    sample, timesteps = training.Sample(latents, None, ["a photo of a hugsy"] * 2), torch.tensor([300, 700])
    grads = {}
    with torch.inference_mode(False):
        for checkpointing in (False, True):
            host = host_mod.ComfyTrainingHost(model, clip, gradient_checkpointing=checkpointing)
            trainer = training.Trainer(host, "hugsy", "cat", torch.eye(768), training.TrainSettings(steps=1))
            with host.install(trainer.forwards()):
                trainer.loss(sample, noise, timesteps, track=False).backward()
            grads[checkpointing] = torch.cat([trainer.params.embedding.grad.flatten(),
                                              *(p.grad for p in trainer.params.values)])
    # res blocks, and the attention and feed-forward modules of every transformer block, are recomputed
    assert set(calls) == {"ResBlock", "CrossAttention", "FeedForward"}, set(calls)
    assert torch.allclose(grads[True], grads[False], rtol=1e-5, atol=1e-7)
