"""The tiny world's CLIP (bench/tinyworld/clip.py): CLIP's structure where Perfusion depends on it — causal text
encodings, start/end tokens, one slot per trigger word, the end token's state as the text embedding — and the
other pieces of the v2 world (top/bottom pairs, the outline style score, the global key lock's prompt). No world
training here; a few contrastive steps at most."""
import random
from dataclasses import replace

import numpy as np
import pytest
import torch

from bench.tinyworld import render as R
from bench.tinyworld.clip import TinyCLIP, clip_batch, zero_shot
from bench.tinyworld.host import TinyWorldHost, superclass_prompt
from bench.tinyworld.measure import outline_score
from bench.tinyworld.model import TinyUNet, cross_attention_maps
from bench.tinyworld.train_world import WorldSettings, localisation_loss, object_tokens, text_encoder
from bench.tinyworld.variants import SlotContextHost
from perfusion_ops.concept import Concept
from tinyworld_fixtures import one_thread  # noqa: F401 (autouse)


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return TinyCLIP(width=32, layers=2, heads=4, embed=16).eval()


def test_tokens_have_clip_start_and_end_and_one_slot_per_trigger(clip):
    ids, slots = clip.tokenize("a photo of a sks on the left and a zwx", ["sks", "zwx"])
    assert ids[0] == clip.bos and ids[-1] == clip.eos and len(ids) == 13
    assert slots == {"sks": [5], "zwx": [11]} and ids[5] == ids[11] == clip.unk
    assert clip.token_names("a photo of a sks", ["sks"]) == ["<start>", "a", "photo", "of", "a", "sks", "<end>"]
    assert clip.embed_word("square").shape == (1, 32)


def test_text_encodings_are_causal(clip):
    """A token's encoding depends on the words before it only: the trigger's encoding in a composed prompt is its
    encoding in the training prompt (a bidirectional encoder such as MiniLM breaks this)."""
    vector = torch.randn(1, 32)
    short, _, slots = clip.encode(["a photo of a sks"], "sks", vector)
    long, mask, slots_long = clip.encode(["a photo of a sks on the left and a red circle"], "sks", vector)
    k = slots[0][0]
    assert slots_long[0][0] == k
    assert torch.allclose(short[0, : k + 1], long[0, : k + 1], atol=1e-5)
    assert not torch.allclose(short[0, k + 1], long[0, k + 1], atol=1e-3)  # <end> vs "on"
    padded, mask, _ = clip.encode(["a photo of a square", "a photo of a square on the left"])
    assert bool((padded[~mask] == 0).all()) and torch.allclose(padded[0, :6], padded[1, :6], atol=1e-5)


def test_trigger_vector_gets_gradients_and_text_embedding_is_the_end_state(clip):
    vector = torch.nn.Parameter(clip.embed_word("square").clone())
    context, mask, slots = clip.encode(["a photo of a sks on the left"], "sks", vector)
    (context[0, -1] * torch.randn(32)).sum().backward()  # (an LN output sums to its bias: no gradient)
    assert vector.grad is not None and float(vector.grad.abs().sum()) > 0
    with torch.no_grad():
        end = clip.encode(["a photo of a square"])[0][0, -1]
        assert torch.allclose(clip.text_features(["a photo of a square"])[0], clip.text_projection(end), atol=1e-5)


def test_contrastive_loss_falls_in_a_few_steps_and_zero_shot_runs():
    torch.manual_seed(0)
    clip = TinyCLIP(width=32, layers=1, heads=4, embed=16)
    opt = torch.optim.AdamW(clip.parameters(), 3e-3)
    rng = random.Random(0)
    fixed = clip_batch(rng, 32)
    first = float(clip.loss(*fixed).detach())
    for _ in range(15):
        loss = clip.loss(*fixed)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(clip.loss(*fixed).detach()) < first - 0.3
    acc = zero_shot(clip.eval(), count=8)
    assert set(acc) == {"colour", "shape", "position", "background", "texture", "size"}
    assert all(0 <= v <= 1 for v in acc.values())


def test_two_object_scenes_come_left_right_and_top_bottom():
    rng = random.Random(3)
    layouts = set()
    for _ in range(200):
        spec, text = R.random_spec(rng, two_objects=1.0)
        positions = tuple(t[4] for t in spec.things)
        layouts.add(positions)
        phrases = [R.POSITION_PHRASE[p] for p in positions]
        assert text.index(phrases[0]) < text.index(" and ") < text.index(phrases[1])
    assert layouts == {("left", "right"), ("top", "bottom")}


def test_outline_score_separates_the_fine_tuned_style():
    rng = random.Random(0)
    scenes = [R.random_scene(rng, 0.0)[0] for _ in range(40)]
    plain = outline_score(torch.from_numpy(R.render_batch(scenes, 0)[0]))
    outlined = outline_score(torch.from_numpy(R.render_batch(scenes, 0, outline=True)[0]))
    assert plain.mean() < 0.05 and outlined.mean() > 0.15 and np.mean(outlined > plain) > 0.8


def test_global_key_lock_prompt_swaps_triggers_for_superclass_words():
    e = torch.zeros(4)
    concept = lambda trigger, word: Concept(trigger, word, e[None], e, e, e, {"l": e})
    assert superclass_prompt("a photo of a sks on the left and a ZWX on the right",
                             [concept("sks", "square"), concept("zwx", "circle")]) == \
        "a photo of a square on the left and a circle on the right"


def test_positions_come_before_or_after_their_objects_and_each_object_has_its_mask():
    rng = random.Random(5)
    orders = set()
    for _ in range(100):
        spec, text = R.random_spec(rng, two_objects=1.0)
        orders.add(text.startswith(R.POSITION_PHRASE[spec.things[0][4]]))
    assert orders == {True, False}
    scene = R.Scene((R.Thing("square", "red", "plain", "medium", "left"),
                     R.Thing("circle", "blue", "striped", "medium", "right")), "white")
    image, masks = R.render(scene, jitter=0)
    assert masks.shape == (2, 32, 32)
    assert masks[0][:, :16].sum() == masks[0].sum() > 50 and masks[1][:, 16:].sum() == masks[1].sum() > 50
    _, combined = R.render_batch([scene], seed=0, jitter=0)
    assert np.array_equal(combined[0], masks.sum(0))
    text = R.caption(scene, "a photo of a {}", {"colour": True, "texture": True}, position_first=True)
    assert text == "on the left a photo of a red plain square and on the right a blue striped circle"


def test_object_tokens_are_each_objects_description(clip):
    spec = R.Spec((("square", "red", None, "medium", "left"), ("square", "blue", "dotted", "medium", "right")), None)
    for caption in ("on the left a photo of a red square and on the right a blue dotted square",
                    "a photo of a red square on the left and a blue dotted square on the right on a gray background"):
        names = clip.token_names(caption)
        spans = object_tokens(clip, spec, caption)
        assert [[names[k] for k in span] for span in spans] == [["red", "square"], ["blue", "dotted", "square"]]
    assert object_tokens(clip, R.Spec((("square", None, None, None, None),), None), "a photo of a square") == []


def test_localisation_loss_is_the_share_of_attention_outside_the_own_object():
    own = torch.zeros(1, 32, 32)
    own[0, :, :16] = 1
    other = own.flip(-1)
    tokens = torch.tensor([[False, True, False]])
    objects = (torch.tensor([0]), tokens, own, other)
    pixel_left = torch.arange(256).view(16, 16)[:, :8].flatten()

    def maps(inside: float):  # token 1's attention: `inside` of its mass on the left half, the rest on the right
        probs = torch.full((1, 256, 3), 0.5)
        probs[0, :, 1] = 2 * (1 - inside) / 256
        probs[0, pixel_left, 1] = 2 * inside / 256
        return [probs]

    for inside in (1.0, 0.75, 0.5, 0.0):
        assert float(localisation_loss(maps(inside), objects)) == pytest.approx(1 - inside, abs=1e-4)


def test_recorded_attention_maps_are_the_softmax_the_model_uses():
    unet = TinyUNet(16, 32, context_dim=24, heads=16).eval()
    x, t, ctx = torch.randn(2, 12, 16, 16), torch.tensor([10, 900]), torch.randn(2, 5, 24)
    ctx[1, 3:] = 0  # padding
    with torch.no_grad():
        plain = unet(x, t, ctx)  # scaled_dot_product_attention
        with cross_attention_maps(unet) as maps:
            recorded = unet(x, t, ctx)  # the softmax written out
    assert torch.allclose(recorded, plain, atol=1e-5) and len(maps) == 7
    assert all(torch.allclose(m.sum(-1), torch.ones(2, m.shape[1])) and float(m[1, :, 3:].abs().max()) == 0
               for m in maps)
    assert all(layer.maps is None for layer in unet.modules() if hasattr(layer, "maps"))


def test_tiny_clip_is_trained_once_and_shared_by_worlds_that_differ_after_it(tmp_path):
    settings = WorldSettings(clip_width=32, clip_layers=1, clip_steps=2, clip_batch=8)
    trained = text_encoder(tmp_path, settings, log=lambda m: None)
    assert len(list(tmp_path.glob("clip-*.safetensors"))) == 1
    lines = []
    loaded = text_encoder(tmp_path, replace(settings, steps=7, localise=0.0), log=lines.append)
    assert lines and "from" in lines[0]
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), loaded.state_dict().values()))
    text_encoder(tmp_path, replace(settings, clip_steps=3), log=lambda m: None)  # another CLIP: another file
    assert len(list(tmp_path.glob("clip-*.safetensors"))) == 2


def test_slot_context_keeps_each_trigger_on_its_own_token_and_the_superclass_prompt_elsewhere(clip):
    """variants.SlotContextHost: the real encoding at each trigger (and before it: causal), the superclass prompt's
    after it, in training (one trigger, differentiable) and at inference (two)."""
    unet = TinyUNet(16, 32, context_dim=32, heads=4).eval()
    host = SlotContextHost(TinyWorldHost(unet, clip), {"sks": "square", "zwx": "circle"})
    vector = torch.nn.Parameter(torch.randn(1, 32))
    prompt = "on the left a photo of a sks and on the right a zwx"
    real, _, slots = clip.encode([prompt], "sks", vector)
    confined, at_trigger = host.encode([prompt], "sks", vector)
    plain = clip.encode(["on the left a photo of a square and on the right a circle"])[0]
    k = slots[0][0]
    assert torch.equal(confined[0, : k + 1], real[0, : k + 1]) and torch.equal(at_trigger[0], real[0, k])
    assert torch.equal(confined[0, k + 1:], plain[0, k + 1:]) and not torch.allclose(plain[0, k + 1:], real[0, k + 1:])
    (confined[0, k] * torch.randn(32)).sum().backward()  # (an LN output sums to its bias)
    assert vector.grad is not None and float(vector.grad.abs().sum()) > 0
    e = torch.randn(32)
    concepts = [Concept(t, w, torch.randn(1, 32), e, e, e, {"l": e})
                for t, w in (("sks", "square"), ("zwx", "circle"))]
    both, slots = host.context([prompt], concepts)
    real, _ = TinyWorldHost(unet, clip).context([prompt], concepts)
    trigger = torch.zeros(both.shape[1], dtype=torch.bool)
    trigger[[slots["sks"][0][0], slots["zwx"][0][0]]] = True
    assert torch.equal(both[0, trigger], real[0, trigger]) and torch.equal(both[0, ~trigger], plain[0, ~trigger])
