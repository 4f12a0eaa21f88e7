"""``perfusion_webui/host.py`` (the only webui-importing module) driven through one A1111-style generation.

The webui cannot be installed from a registry, so its few modules the glue touches are stood in by minimal
objects with the webui's names and signatures (``modules.extra_networks``, ``shared``, ``scripts``,
``script_callbacks``, ``paths``, ``prompt_parser``, ``sd_hijack``, ``textual_inversion``). The UNet is real
ldm-structured cross-attention. A real Forge run (closing note of issue #7) covers the real host.
"""
import importlib
import sys
import types

import pytest
import torch

from perfusion_ops.concept_file import save_concept
from perfusion_webui.hooks import hooked_modules
from webui_fixtures import SMALL_LAYERS, attention_unet, make_concept


class EmbeddingDb:
    """The webui's EmbeddingDatabase, reduced to its registry (A1111 signature: embedding, model, name)."""

    def __init__(self):
        self.word_embeddings = {}

    def register_embedding_by_name(self, embedding, model, name):
        if embedding is None:
            self.word_embeddings.pop(name, None)
        else:
            self.word_embeddings[name] = embedding


class Embedding:
    def __init__(self, vec, name, step=None):
        self.vec, self.name, self.vectors, self.shape = vec, name, 0, None


class Params:
    def __init__(self, items):
        self.items = items


@pytest.fixture
def webui(monkeypatch, tmp_path):
    modules = types.ModuleType("modules")
    modules.__path__ = []
    registry, callbacks = {}, {}
    extra_networks = types.SimpleNamespace(
        ExtraNetwork=type("ExtraNetwork", (), {"__init__": lambda self, name: setattr(self, "name", name)}),
        extra_network_registry=registry,
        register_extra_network=lambda net: registry.__setitem__(net.name, net))
    opts = types.SimpleNamespace(CLIP_stop_at_last_layers=1, perfusion_dir="")
    shared = types.SimpleNamespace(opts=opts, OptionInfo=lambda *a, **k: (a, k), sd_model=None,
                                   cmd_opts=types.SimpleNamespace(ckpt_dir=None))
    scripts = types.SimpleNamespace(Script=type("Script", (), {}), AlwaysVisible=object())
    script_callbacks = types.SimpleNamespace(**{name: (lambda n: lambda fn: callbacks.__setitem__(n, fn))(name)
                                               for name in ("on_before_ui", "on_ui_settings", "on_infotext_pasted")})
    db = EmbeddingDb()
    parts = {
        "extra_networks": extra_networks, "shared": shared, "scripts": scripts, "script_callbacks": script_callbacks,
        "paths": types.SimpleNamespace(models_path=str(tmp_path / "models")),
        "prompt_parser": types.SimpleNamespace(  # no AND, no [from:to:when]: one sub-prompt, one schedule
            get_multicond_prompt_list=lambda prompts: (None, list(prompts), None),
            get_learned_conditioning_prompt_schedules=lambda prompts, steps: [[(steps, prompts[0])]]),
        "sd_hijack": types.SimpleNamespace(model_hijack=types.SimpleNamespace(embedding_db=db)),
        "textual_inversion": types.ModuleType("modules.textual_inversion"),
    }
    parts["textual_inversion"].__path__ = []
    ti = types.SimpleNamespace(Embedding=Embedding)
    monkeypatch.setitem(sys.modules, "modules", modules)
    for name, value in parts.items():
        setattr(modules, name, value)
        monkeypatch.setitem(sys.modules, f"modules.{name}", value)
    monkeypatch.setitem(sys.modules, "modules.textual_inversion.textual_inversion", ti)
    parts["textual_inversion"].textual_inversion = ti
    monkeypatch.delitem(sys.modules, "perfusion_webui.host", raising=False)
    host = importlib.import_module("perfusion_webui.host")
    host.setup()
    yield types.SimpleNamespace(host=host, registry=registry, callbacks=callbacks, db=db, opts=opts,
                                folder=tmp_path / "models" / "perfusion")
    host.STATE.clear()
    sys.modules.pop("perfusion_webui.host", None)


class Processing:
    """The parts of StableDiffusionProcessing the glue reads and writes."""

    def __init__(self, sd_model, prompts):
        self.sd_model, self.prompts, self.steps = sd_model, prompts, 4
        self.extra_generation_params, self.comments = {}, []

    def comment(self, text):
        self.comments.append(text)


def test_one_a1111_generation(webui):
    host = webui.host
    assert set(webui.callbacks) == {"on_before_ui", "on_ui_settings", "on_infotext_pasted"}
    assert webui.folder.is_dir()  # models/perfusion is created at load
    save_concept(make_concept(1, SMALL_LAYERS, "hugsy", "teddy"), webui.folder / "hugsy.safetensors")
    previous_ti = Embedding(torch.zeros(1, 768), "hugsy")  # a textual inversion of the same name, already loaded
    webui.db.word_embeddings["hugsy"] = previous_ti
    unet = attention_unet(SMALL_LAYERS, seed=5)
    sd_model = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=unet))
    p = Processing(sd_model, ["a photo of hugsy"])
    script = host.PerfusionScript()
    assert script.show(False) is host.scripts.AlwaysVisible
    script.process(p)
    network = webui.registry["perfusion"]

    network.activate(p, [Params(["hugsy", "beta=0.6"])])
    assert sorted(hooked_modules(unet)) == sorted(f"{layer}.to_{x}" for layer in SMALL_LAYERS for x in "kv")
    emb = webui.db.word_embeddings["hugsy"]
    assert emb is not previous_ti and emb.vectors == 1 and emb.shape == 768
    assert p.extra_generation_params["Perfusion"] == "<perfusion:hugsy:beta=0.6>"
    assert p.extra_generation_params["Perfusion hashes"].startswith("hugsy: ")
    layer = next(iter(SMALL_LAYERS))
    context = torch.randn(1, 7, 768)
    to_v = unet.get_submodule(layer).to_v
    assert not torch.allclose(to_v(context), torch.nn.functional.linear(context, to_v.weight))
    script.process_before_every_sampling(p)  # the Forge hook is a no-op in A1111

    network.deactivate(p)
    assert hooked_modules(unet) == []
    assert webui.db.word_embeddings["hugsy"] is previous_ti  # the user's own TI is back
    assert torch.equal(to_v(context), torch.nn.functional.linear(context, to_v.weight))
    script.postprocess(p, None)


def test_a_tag_at_strength_zero_leaves_the_generation_as_without_it(webui, capsys):
    """<perfusion:kitto:0> next to hugsy: exactly hugsy alone (README: 0 leaves the model exactly as without the
    tag), whatever the two concepts' inputs have in common; alone, it hooks nothing."""
    save_concept(make_concept(1, SMALL_LAYERS, "hugsy", "teddy"), webui.folder / "hugsy.safetensors")
    save_concept(make_concept(2, SMALL_LAYERS, "kitto", "cat"), webui.folder / "kitto.safetensors")
    unet = attention_unet(SMALL_LAYERS, seed=5)
    p = Processing(types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=unet)), ["hugsy and kitto"])
    script = webui.host.PerfusionScript()
    script.process(p)  # registers the extra network
    network = webui.registry["perfusion"]
    layer = next(iter(SMALL_LAYERS))
    attn = unet.get_submodule(layer)
    context = torch.randn(2, 7, 768)
    context[0, 2] = webui.host.library().load(webui.folder / "hugsy.safetensors").target_input
    context[1, 3] = webui.host.library().load(webui.folder / "kitto.safetensors").target_input

    def outputs(*tags):
        script.process(p)
        network.activate(p, [Params(list(tag)) for tag in tags])
        try:
            return attn.to_k(context), attn.to_v(context), sorted(hooked_modules(unet))
        finally:
            network.deactivate(p)

    alone, with_off = outputs(["hugsy"]), outputs(["hugsy"], ["kitto", "0"])
    assert all(torch.equal(x, y) for x, y in zip(alone[:2], with_off[:2])) and alone[2] == with_off[2]
    host = (attn.to_k(context), attn.to_v(context))
    capsys.readouterr()
    only_off = outputs(["kitto", "0"])
    assert only_off[2] == [] and all(torch.equal(x, y) for x, y in zip(only_off[:2], host))
    assert "edit applied in 0 cross-attention layer calls; strength 0: the concepts are off" in capsys.readouterr().out


BAD_TAGS = [  # (tag items, the reason the console line and the infotext give)
    (["missing"], "no Perfusion concept named 'missing'"),
    (["hugsy", "beta=abc"], "beta 'abc' is not a number"),
    (["hugsy", "3"], "strength 3.0 must be in [0; 2]"),
    (["hugsy", "lock=sideways"], "lock 'sideways' must be one of"),
    (["hugsy", "color=red"], "unknown setting 'color=red'"),
    (["corrupt"], "'corrupt.safetensors' is truncated or not a safetensors file"),
    (["skip2"], "set 'Clip skip' to 2"),
    (["hugsy", "0.5", "0.7"], "strength is given twice"),
]


@pytest.mark.parametrize("items,reason", BAD_TAGS)
def test_a_refused_tag_is_one_console_line_and_the_infotext_not_a_traceback(webui, capsys, items, reason):
    """A1111 prints the whole traceback of anything activate() raises ('activating extra network perfusion ...'):
    a refused tag is instead one line with the reason, the generation runs without the edit, nothing is left."""
    save_concept(make_concept(1, SMALL_LAYERS, "hugsy", "teddy"), webui.folder / "hugsy.safetensors")
    save_concept(make_concept(4, SMALL_LAYERS, "layered", "dog", clip_layer=-2), webui.folder / "skip2.safetensors")
    (webui.folder / "corrupt.safetensors").write_bytes(b"\x10" + bytes(20))
    unet = attention_unet(SMALL_LAYERS, seed=5)
    p = Processing(types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=unet)), ["x"])
    webui.host.PerfusionScript().process(p)
    capsys.readouterr()
    webui.registry["perfusion"].activate(p, [Params(items)])  # returns: A1111 would print a traceback otherwise
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("[Perfusion] ") and reason.replace(";", ",") in lines[0], lines
    assert reason in p.extra_generation_params["Perfusion error"]
    assert p.comments and hooked_modules(unet) == [] and not webui.db.word_embeddings
    assert webui.host.STATE.activation is None


def test_settings_folder_and_paste(webui, tmp_path):
    extra = tmp_path / "elsewhere"
    extra.mkdir()
    save_concept(make_concept(2, SMALL_LAYERS, "kitto", "cat"), extra / "kitto_v2.safetensors")
    webui.opts.perfusion_dir = str(extra)
    lib = webui.host.library()
    assert "kitto_v2" in lib.files()
    digest = lib.short_hash(extra / "kitto_v2.safetensors")
    params = {"Prompt": "a kitto", "Perfusion": "<perfusion:kitto:0.5>", "Perfusion hashes": f"kitto: {digest}"}
    webui.callbacks["on_infotext_pasted"]("", params)
    assert params["Prompt"] == "a kitto <perfusion:kitto_v2:0.5>"  # found by hash under its new name


def fake_encoding(text: str) -> torch.Tensor:
    """A deterministic stand-in for the webui's CLIP encode of one prompt: (1, 77, 768)."""
    g = torch.Generator().manual_seed(sum(map(ord, text)) * 7919 % 2**31)
    return torch.randn(1, 77, 768, generator=g)


def test_global_key_lock_a1111(webui):
    save_concept(make_concept(1, SMALL_LAYERS, "hugsy", "teddy"), webui.folder / "hugsy.safetensors")
    unet = attention_unet(SMALL_LAYERS, seed=5)
    encoded = []
    sd_model = types.SimpleNamespace(
        model=types.SimpleNamespace(diffusion_model=unet),
        get_learned_conditioning=lambda texts: encoded.extend(texts) or torch.cat([fake_encoding(t) for t in texts]))
    p = Processing(sd_model, ["a photo of Hugsy", "a photo of Hugsy", "no trigger here"])
    webui.host.PerfusionScript().process(p)
    webui.registry["perfusion"].activate(p, [Params(["hugsy", "lock=global"])])
    assert encoded == ["a photo of Hugsy", "a photo of teddy"]  # each distinct prompt with a trigger, once
    state = webui.host.STATE
    assert len(state.keys) == 1 and state.activation.applied[0].beta == 0.5  # the file's global-lock β
    real, key = fake_encoding("a photo of Hugsy"), fake_encoding("a photo of teddy")
    uncond = fake_encoding("")
    layer = next(iter(SMALL_LAYERS))
    attn = unet.get_submodule(layer)
    batch = torch.cat([real, uncond])
    k, v = attn.to_k(batch), attn.to_v(batch)
    edit = state.activation.edit()
    project_k = edit.projection(layer, "k", lambda x: torch.nn.functional.linear(x, attn.to_k.weight))
    project_v = edit.projection(layer, "v", lambda x: torch.nn.functional.linear(x, attn.to_v.weight))
    assert torch.allclose(k, project_k(torch.cat([key, uncond])), atol=1e-5)  # K: the superclass prompt
    assert torch.allclose(v, project_v(batch), atol=1e-5)  # V: the real prompt
    assert state.keys.matched_rows == 1
    webui.registry["perfusion"].deactivate(p)
    assert hooked_modules(unet) == []


def test_forge_encodes_the_key_lock_prompts_at_the_clip_skip_of_this_generation(webui):
    """Forge sets its CLIP layer only when it encodes the prompts, after the activation; the key-lock encodings
    must use this generation's Clip skip, or the first generation after a change finds no row to lock."""
    concept = make_concept(1, SMALL_LAYERS, "hugsy", "teddy", clip_layer=-2)  # trained at Clip skip 2
    save_concept(concept, webui.folder / "hugsy.safetensors")
    layer = {"now": 1}
    encoded = []

    def encode(texts):
        encoded.extend((text, layer["now"]) for text in texts)
        return torch.cat([fake_encoding(f"{t} @{layer['now']}") for t in texts])

    sd_model = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=attention_unet(SMALL_LAYERS, seed=5)),
                                     get_learned_conditioning=encode, set_clip_skip=lambda n: layer.update(now=n))
    webui.opts.CLIP_stop_at_last_layers = 2
    p = Processing(sd_model, ["a photo of hugsy"])
    webui.host.PerfusionScript().process(p)
    webui.registry["perfusion"].activate(p, [Params(["hugsy", "lock=global"])])
    assert encoded == [("a photo of hugsy", 2), ("a photo of teddy", 2)]


def test_a_trigger_in_the_negative_prompt_is_applied_there_and_said_so(webui, capsys):
    """Chosen behaviour: the trigger word means the concept wherever it is written, as in ComfyUI and as a
    textual inversion in the negative prompt does; the console says so, once."""
    save_concept(make_concept(1, SMALL_LAYERS, "hugsy", "teddy"), webui.folder / "hugsy.safetensors")
    unet = attention_unet(SMALL_LAYERS, seed=5)
    sd_model = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=unet))
    notes = {}
    for negative in ("blurry, low quality", "blurry, Hugsy, low quality"):
        p = Processing(sd_model, ["a photo of hugsy"])
        p.negative_prompts = [negative]
        webui.host.PerfusionScript().process(p)
        capsys.readouterr()
        webui.registry["perfusion"].activate(p, [Params(["hugsy"])])
        notes[negative] = [line for line in capsys.readouterr().out.splitlines() if "negative prompt" in line]
        webui.registry["perfusion"].deactivate(p)
    assert notes["blurry, low quality"] == []
    assert len(notes["blurry, Hugsy, low quality"]) == 1
    assert "'hugsy' is in the negative prompt" in notes["blurry, Hugsy, low quality"][0]
