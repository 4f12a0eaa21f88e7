"""Concept files for the webui (folders, names, hashes) and one generation's activation from its tags."""
import hashlib
import sys
import types

import pytest
import torch

from perfusion_ops.concept import ConceptError
from perfusion_ops.concept_file import save_concept
from perfusion_webui.prompt_tags import PerfusionTag, TagError, parse_infotext
from perfusion_webui.activation import activate, replace_words
from perfusion_webui.embeddings import Embeddings
from perfusion_webui.library import ConceptLibrary
from perfusion_webui.monitor import GateMonitor
from webui_fixtures import SMALL_LAYERS, TEXT, encodings, make_concept


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("perfusion")
    main, extra = base / "models" / "perfusion", base / "extra"
    (main / "pets").mkdir(parents=True)
    extra.mkdir()
    save_concept(make_concept(1, SMALL_LAYERS, "hugsy", "teddy", beta_global=0.45), main / "hugsy.safetensors")
    save_concept(make_concept(2, SMALL_LAYERS, "kitto", "cat"), main / "pets" / "Kitto.safetensors")
    save_concept(make_concept(3, SMALL_LAYERS, "hugsy", "bear"), extra / "other_hugsy.safetensors")
    save_concept(make_concept(4, SMALL_LAYERS, "layered", "dog", clip_layer=-2), extra / "skip2.safetensors")
    save_concept(make_concept(5, {"input_blocks.1.1.transformer_blocks.0.attn2": 32}, "narrow", "dog"),
                 extra / "narrow.safetensors")
    (extra / "notes.txt").write_text("not a concept")
    return main, extra


def test_library_names_and_resolution(folders):
    main, extra = folders
    lib = ConceptLibrary([main, extra, main.parent / "missing"])
    assert sorted(lib.files()) == ["hugsy", "narrow", "other_hugsy", "pets/Kitto", "skip2"]
    assert lib.resolve("hugsy") == main / "hugsy.safetensors"
    assert lib.resolve("pets/Kitto") == lib.resolve("pets/kitto") == lib.resolve("kitto")  # case, sub-folder
    with pytest.raises(ConceptError, match="no Perfusion concept named 'nope'.*found: hugsy"):
        lib.resolve("nope")


def test_first_folder_wins_and_ambiguous_base_names(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a / "x", a / "y", b):
        folder.mkdir(parents=True)
    for path in (a / "x" / "dog.safetensors", a / "y" / "dog.safetensors", a / "dog2.safetensors",
                 b / "dog2.safetensors"):
        path.write_bytes(b"")
    lib = ConceptLibrary([a, b])
    assert lib.resolve("dog2") == a / "dog2.safetensors"
    with pytest.raises(ConceptError, match="ambiguous: x/dog, y/dog"):
        lib.resolve("dog")


def test_short_hash_is_the_files_sha256(folders):
    main, _ = folders
    lib = ConceptLibrary([main])
    path = main / "hugsy.safetensors"
    assert lib.short_hash(path) == hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert lib.find_by_hash(lib.short_hash(path).upper()) == "hugsy"
    assert lib.find_by_hash("000000000000") is None


def test_activation_defaults_and_settings(folders):
    lib = ConceptLibrary(folders)
    tags = [PerfusionTag("hugsy"), PerfusionTag("Kitto", 0.5, beta=0.55, tau=0.2)]
    act = activate(tags, lib, SMALL_LAYERS, TEXT, clip_layer=-1)
    assert act.names == ["hugsy", "pets/Kitto"]
    (a, b) = act.applied
    assert (a.beta, a.tau, a.lock) == (0.7, 0.15, "local")  # the file's recommended local gate
    assert (b.beta, b.tau) == (0.55, 0.2)
    assert act.strengths == [1.0, 0.5]
    assert set(act.triggers()) == {"hugsy", "kitto"}
    tags_back, hashes = parse_infotext(act.infotext())
    assert tags_back == tags and set(hashes) == {"hugsy", "Kitto"}
    edit = act.edit()
    assert len(edit.applied) == 2 and edit.layers == list(SMALL_LAYERS)


def test_global_lock_defaults_and_key_prompt(folders):
    lib = ConceptLibrary(folders)
    act = activate([PerfusionTag("hugsy", lock="global"), PerfusionTag("kitto")], lib, SMALL_LAYERS, TEXT)
    assert act.applied[0].beta == 0.45 and act.applied[0].lock == "local"  # global = local lock + K context
    assert act.global_lock
    assert act.key_prompt("(Hugsy:1.2) and kitto, hugsyish hugsy.") == "(teddy:1.2) and kitto, hugsyish teddy."
    assert replace_words("a b", {}) == "a b"


@pytest.mark.parametrize("tags, message", [
    ([PerfusionTag("hugsy"), PerfusionTag("other_hugsy")], "share the trigger word 'hugsy'"),
    ([PerfusionTag("skip2")], "clip skip 2"),
    ([PerfusionTag("narrow")], "is 64 wide in this model but 32"),
    ([PerfusionTag("nothere")], "no Perfusion concept named 'nothere'"),
])
def test_activation_refuses_with_a_reason(folders, tags, message):
    with pytest.raises(ConceptError, match=message):
        activate(tags, ConceptLibrary(folders), SMALL_LAYERS, TEXT, clip_layer=-1)


def test_activation_refuses_a_twice_tagged_concept(folders):
    with pytest.raises(TagError, match="tagged twice"):
        activate([PerfusionTag("hugsy"), PerfusionTag("HUGSY")], ConceptLibrary(folders), SMALL_LAYERS, TEXT)


def test_activation_refuses_another_text_width(folders):
    with pytest.raises(ConceptError, match="text encoder"):
        activate([PerfusionTag("hugsy")], ConceptLibrary(folders), SMALL_LAYERS, 1024)


def test_an_sdxl_concept_is_refused_even_where_the_webuis_model_is_sdxl(tmp_path):
    """The width and layer checks pass on an SDXL checkpoint; the webui's textual-inversion path is SD1.x's."""
    from tools.factories import random_concept
    save_concept(random_concept(width=2048, layers=SMALL_LAYERS), tmp_path / "xl.safetensors")
    with pytest.raises(ConceptError, match=r"'xl' is a concept for SDXL .*SD1.x concepts only \(use it in ComfyUI\)"):
        activate([PerfusionTag("xl")], ConceptLibrary([tmp_path]), SMALL_LAYERS, 2048)


def test_gate_monitor(folders):
    lib = ConceptLibrary(folders)
    act = activate([PerfusionTag("hugsy")], lib, SMALL_LAYERS, TEXT)
    edit = act.edit()
    monitor = GateMonitor(edit)
    layer = next(iter(SMALL_LAYERS))
    w = torch.randn(SMALL_LAYERS[layer], TEXT)
    projection = edit.projection(layer, "v", lambda x: x @ w.T)
    context = encodings(10, 5)[None]
    projection(context)
    projection(context)  # same context: counted once
    assert monitor.contexts == 1 and float(monitor.peak[0]) < 0.5
    assert "is the trigger word in the prompt?" in monitor.report(act.names)
    context = context.clone()
    context[0, 3] = act.concepts[0].target_input
    projection(context)
    assert monitor.contexts == 2 and float(monitor.peak[0]) > 0.85
    assert monitor.report(act.names).startswith("hugsy: gate peaked at 0.")


def test_gate_monitor_reports_the_gate_not_the_strength(folders):
    lib = ConceptLibrary(folders)
    for strength, expected in ((0.5, "gate peaked at 0.88"), (0.0, "strength 0 (off)")):
        act = activate([PerfusionTag("hugsy", strength)], lib, SMALL_LAYERS, TEXT)
        edit = act.edit()
        monitor = GateMonitor(edit)
        layer = next(iter(SMALL_LAYERS))
        context = encodings(10, 5)[None].clone()
        context[0, 3] = act.concepts[0].target_input
        edit.projection(layer, "v", lambda x: x[..., : SMALL_LAYERS[layer]])(context)
        assert expected in monitor.report(act.names)


def test_a_model_without_a_textual_inversion_database_is_refused_with_a_reason(monkeypatch):
    """A Forge Neo engine other than SD1.x has no text_processing_engine, and Neo has no modules.sd_hijack: the
    trigger words cannot be registered, which is the user's checkpoint, not a fault (one line, no traceback)."""
    monkeypatch.setitem(sys.modules, "modules", types.ModuleType("modules"))  # no sd_hijack in it
    with pytest.raises(ConceptError, match="no textual-inversion database .* need an SD1.x checkpoint"):
        Embeddings().register(types.SimpleNamespace(), {})
