"""Trigger words in a real ComfyUI tokenizer: the same tokens as ComfyUI's own ``embedding:`` path, the host's
chunks for long prompts, other words untouched, and the CLIP layer checked when a trigger is encoded."""
from __future__ import annotations

import pytest
import torch

from perfusion_ops.concept_file import export_embedding
from tools.factories import random_concept
from tools.smoke_checkpoint import attn2_layers

TRIGGERS = {"hugsy": "teddy", "zorbo": "dog"}


@pytest.fixture(scope="module")
def concepts(comfy):
    """Two random concepts (one learned vector each) and a third with two vectors; each also exported as a
    textual-inversion file in the host's embeddings folder, the reference ComfyUI itself reads."""
    layers = attn2_layers("small")
    made = {w: random_concept(seed=k, layers=layers, trigger=w, superclass=s)
            for k, (w, s) in enumerate(TRIGGERS.items())}
    twin = random_concept(seed=7, layers=layers, trigger="duo", superclass="cat")
    twin.embedding = torch.randn(2, 768, generator=torch.Generator().manual_seed(7)) * 0.02
    made["duo"] = twin.validate()
    for word, concept in made.items():
        export_embedding(concept, comfy.layout.folder("embeddings") / f"ti-{word}.safetensors")
    return made


@pytest.fixture(scope="module")
def loaded(comfy, small_checkpoint):
    with torch.inference_mode():
        return comfy.node("CheckpointLoaderSimple")().load_checkpoint(small_checkpoint.name)[:2]


@pytest.fixture(scope="module")
def clip(loaded):
    return loaded[1]


def wrapped(comfy, clip, concepts, words):
    tok = comfy.adapter.tokenizer
    return tok.with_concepts(clip.tokenizer, {w: concepts[w] for w in words})


def encode(clip, tokens):
    with torch.inference_mode():
        return clip.encode_from_tokens(tokens)


def test_every_marker_is_one_token_of_its_own(comfy, clip, concepts):
    tokenizer = wrapped(comfy, clip, concepts, ["hugsy"])
    ids = [tokenizer._marker_id(m) for m in comfy.adapter.tokenizer.MARKERS]
    assert None not in ids and len(set(ids)) == len(ids)


@pytest.mark.parametrize("prompt", [
    "a photo of hugsy on a wooden table",
    "A photo of HUGSY, Hugsy and hugsy",
    "(hugsy:1.3) at the beach, (a (hugsy) hat:0.8)",
    "hugsy and zorbo sailing, zorbo inside hugsy",
    "a duo of cats, duo sleeping",
])
def test_same_encoding_as_comfyuis_own_embedding_path(comfy, clip, concepts, prompt):
    words = [w for w in concepts if w in prompt.lower()]
    ours = wrapped(comfy, clip, concepts, concepts).tokenize_with_weights(prompt)
    reference = comfy.adapter.tokenizer.replace_triggers(prompt, {w: f"embedding:ti-{w}" for w in words})
    theirs = clip.tokenize(reference)
    assert any(isinstance(e[0], torch.Tensor) for chunk in theirs["l"] for e in chunk), "reference found no embedding"
    assert torch.equal(encode(clip, ours), encode(clip, theirs))


def flat(tokens):
    return [e for chunk in tokens["l"] for e in chunk]


def test_long_prompts_keep_the_hosts_chunks_and_other_words_alone(comfy, clip, concepts):
    """Against the same prompt with the trigger replaced by 'cat' (one token): identical lists of the same length
    (the host's own chunking of a 200-token prompt), except the learned vector where 'cat' was."""
    body = ", ".join(f"a {c} hugsy on a {c} sofa" for c in ("red", "green", "blue", "grey", "pink", "gold") * 4)
    prompt = f"{body}, hugsys, embedding:hugsy, xhugsy, hugsy_2"
    tokenizer = wrapped(comfy, clip, concepts, ["hugsy"])
    ours = tokenizer.tokenize_with_weights(prompt, True)
    plain = clip.tokenizer.tokenize_with_weights(prompt.replace(" hugsy on", " cat on"), True)
    assert len(ours["l"]) == len(plain["l"]) > 2
    vector = tokenizer.rows["hugsy"]["l"][0]
    swapped = 0
    for a, b in zip(flat(ours), flat(plain)):
        if isinstance(a[0], torch.Tensor):
            assert a[0] is vector and a[1:] == b[1:]
            swapped += 1
        else:
            assert a == b
    assert swapped == body.count("hugsy")


def test_a_prompt_holding_a_marker_word_keeps_it(comfy, clip, concepts):
    tokenizer = wrapped(comfy, clip, concepts, ["hugsy"])
    first = comfy.adapter.tokenizer.MARKERS[0]
    ours = flat(tokenizer.tokenize_with_weights(f"{first} hugsy {first}"))
    plain = flat(clip.tokenizer.tokenize_with_weights(f"{first} cat {first}"))
    cat = plain[2][0]  # after the start token and the marker word
    assert [cat if isinstance(e[0], torch.Tensor) else e[0] for e in ours] == [e[0] for e in plain]
    assert sum(isinstance(e[0], torch.Tensor) for e in ours) == 1


def test_without_triggers_the_host_tokenizer_answers(comfy, clip, concepts):
    tokenizer = wrapped(comfy, clip, concepts, ["hugsy", "zorbo"])
    prompt = "a hugsyish teddy, (zorbos:1.2)"
    assert tokenizer.tokenize_with_weights(prompt) == clip.tokenizer.tokenize_with_weights(prompt)
    assert tokenizer.clip_l is clip.tokenizer.clip_l  # everything else is the host's own


def test_apply_leaves_the_input_clip_alone_and_chains_concepts(comfy, loaded, concepts):
    model, clip = loaded
    before = clip.tokenizer
    with torch.inference_mode():
        m1, c1 = comfy.node("PerfusionApply")().apply(model, clip, concepts["hugsy"], 0.7, 0.15, "local")
        _, c2 = comfy.node("PerfusionApply")().apply(m1, c1, concepts["zorbo"], 0.7, 0.15, "local")
    assert clip.tokenizer is before and comfy.adapter.clip_layer.ENCODE not in clip.patcher.object_patches
    assert sorted(comfy.adapter.tokenizer.concepts_of(c2.tokenizer)) == ["hugsy", "zorbo"]
    assert sorted(comfy.adapter.tokenizer.concepts_of(c1.tokenizer)) == ["hugsy"]


def test_clip_set_last_layer_after_apply_is_refused_when_a_trigger_is_encoded(comfy, loaded, concepts):
    model, clip = loaded
    encode_node, skip = comfy.node("CLIPTextEncode")(), comfy.node("CLIPSetLastLayer")()
    with torch.inference_mode():
        _, applied = comfy.node("PerfusionApply")().apply(model, clip, concepts["hugsy"], 0.7, 0.15, "local")
        encode_node.encode(applied, "a photo of hugsy")  # the concept's own layer (-1): fine
        skipped = skip.set_last_layer(applied, -2)[0]
        encode_node.encode(skipped, "blurry, low quality")  # no trigger: the gate has nothing to compare
        with pytest.raises(ValueError, match=r"trained on CLIP layer -1.*uses layer -2.*before Apply"):
            encode_node.encode(skipped, "a photo of hugsy")
        again = encode_node.encode(applied, "a photo of hugsy")[0][0][0]  # the earlier branch is unaffected
        plain = encode_node.encode(clip, "a photo of hugsy")[0][0][0]
    assert not torch.equal(again, plain)
