"""The Perfusion tab of the webui's Extra Networks: what each card shows and inserts, the preferences of its user
metadata, and files the tab must survive.

The webui's page classes need gradio and a started webui, which the test venv does not have; the stand-ins below
hold the behaviour of A1111 v1.10.1's ``ExtraNetworksPage`` and ``UserMetadataEditor`` that the page relies on
(preview and description files beside the model, ``<name>.json`` user metadata, ``quote_js``). The real classes were
exercised in a real A1111 (see the README).
"""
from __future__ import annotations

import importlib
import json
import sys
import types
from pathlib import Path

import pytest

from perfusion_ops.concept_file import save_concept
from perfusion_webui import cards
from perfusion_webui.prompt_tags import PerfusionTag, parse_prompt

from webui_fixtures import SMALL_LAYERS, make_concept


class GradioError(Exception):
    """gradio.Error: shown to the user as a message box."""


class StandInPage:
    """What ExtraNetworksPage gives a page: preview, description and user-metadata files beside the model file."""

    def __init__(self, title):
        self.title, self.name = title, title.lower()
        self.items = {}

    def find_preview(self, stem):
        for candidate in (f"{stem}.png", f"{stem}.preview.png"):
            if Path(candidate).is_file():
                return f"./sd_extra_networks/thumb?filename={candidate}"
        return None

    def find_description(self, stem):
        path = Path(f"{stem}.txt")
        return path.read_text(encoding="utf-8") if path.is_file() else None

    def search_terms_from_path(self, filename):
        return Path(filename).name

    def get_sort_keys(self, path):
        return {"name": Path(path).name.lower()}

    def read_user_metadata(self, item):
        path = Path(item["filename"]).with_suffix(".json")
        item["user_metadata"] = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        if item["user_metadata"].get("description"):
            item["description"] = item["user_metadata"]["description"]


class StandInEditor:
    """What UserMetadataEditor gives an editor: the item's user metadata and writing it to ``<name>.json``."""

    def __init__(self, ui, tabname, page):
        self.page = page

    def get_user_metadata(self, name):
        return self.page.items[name].setdefault("user_metadata", {})

    def write_user_metadata(self, name, metadata):
        Path(self.page.items[name]["filename"]).with_suffix(".json").write_text(json.dumps(metadata), "utf-8")


@pytest.fixture
def page_module(monkeypatch, tmp_path):
    pages = []
    ui_extra_networks = types.SimpleNamespace(ExtraNetworksPage=StandInPage, extra_pages=pages,
                                              register_page=pages.append, quote_js=json.dumps)
    modules = types.ModuleType("modules")
    modules.__path__ = []
    parts = {"shared": types.SimpleNamespace(opts=types.SimpleNamespace(samples_format="png")),
             "ui_extra_networks": ui_extra_networks,
             "ui_extra_networks_user_metadata": types.SimpleNamespace(UserMetadataEditor=StandInEditor)}
    monkeypatch.setitem(sys.modules, "modules", modules)
    for name, part in parts.items():
        setattr(modules, name, part)
        monkeypatch.setitem(sys.modules, f"modules.{name}", part)
    monkeypatch.setitem(sys.modules, "gradio", types.SimpleNamespace(Error=GradioError))
    monkeypatch.delitem(sys.modules, "perfusion_webui.cards_page", raising=False)
    module = importlib.import_module("perfusion_webui.cards_page")
    yield module
    sys.modules.pop("perfusion_webui.cards_page", None)


@pytest.fixture
def folder(tmp_path):
    """models/perfusion: hugsy (with a preview and user metadata), pets/zorbo (a description file), a broken file."""
    root = tmp_path / "perfusion"
    (root / "pets").mkdir(parents=True)
    save_concept(make_concept(1, SMALL_LAYERS, "hugsy", "teddy"), root / "hugsy.safetensors")
    save_concept(make_concept(2, SMALL_LAYERS, "zorbo", "teapot"), root / "pets" / "zorbo.safetensors")
    (root / "broken.safetensors").write_bytes(b"not a safetensors file")
    (root / "hugsy.png").write_bytes(b"\x89PNG")
    (root / "pets" / "zorbo.txt").write_text("my teapot", encoding="utf-8")
    return root


def make_page(page_module, folder):
    from perfusion_webui.library import ConceptLibrary
    library = ConceptLibrary([folder])
    return page_module.ConceptCards(lambda: library, lambda: [folder])


def items_by_name(page):
    page.items = {item["name"]: item for item in page.list_items()}
    return page.items


def test_one_card_per_concept_file_with_preview_description_and_what_a_click_inserts(page_module, folder):
    page = make_page(page_module, folder)
    items = items_by_name(page)
    assert sorted(items) == ["broken", "hugsy", "pets/zorbo"]
    hugsy, zorbo = items["hugsy"], items["pets/zorbo"]
    assert page.title == "Perfusion" and page.allowed_directories_for_previews() == [str(folder)]
    assert hugsy["preview"].endswith("hugsy.png") and zorbo["preview"] is None
    assert hugsy["local_preview"] == str(folder / "hugsy.png")  # where "Replace preview" saves
    assert json.loads(hugsy["prompt"]) == "<perfusion:hugsy> hugsy"  # the tag, then the trigger word
    assert json.loads(zorbo["prompt"]) == "<perfusion:pets/zorbo> zorbo"
    assert "trigger 'hugsy', a teddy" in hugsy["description"] and "β 0.70, τ 0.15" in hugsy["description"]
    assert zorbo["description"] == "my teapot"  # a description file wins over the generated one
    assert {"hugsy", "teddy", hugsy["shorthash"]} <= set(hugsy["search_terms"]) and len(hugsy["shorthash"]) == 12
    assert hugsy["metadata"]["superclass"] == "teddy" and hugsy["metadata"]["layers"] == str(len(SMALL_LAYERS))


def test_a_click_inserts_text_the_webuis_tags_read_back_to_the_concept(page_module, folder):
    """What a card inserts is a tag the extra network accepts, naming a concept the library resolves."""
    from perfusion_webui.library import ConceptLibrary
    (folder / "hugsy.json").write_text(json.dumps({"preferred weight": 0.8, "preferred beta": "0.6"}), "utf-8")
    for name, item in items_by_name(make_page(page_module, folder)).items():
        prompt, tags = parse_prompt(json.loads(item["prompt"]))
        assert [t.name for t in tags] == [name]
        assert ConceptLibrary([folder]).resolve(tags[0].name) == Path(item["filename"])
    prompt, (tag,) = parse_prompt(json.loads(items_by_name(make_page(page_module, folder))["hugsy"]["prompt"]))
    assert tag == PerfusionTag("hugsy", strength=0.8, beta=0.6) and prompt.strip() == "hugsy"


def test_a_broken_file_is_a_card_that_says_why_not_a_failed_tab(page_module, folder):
    broken = items_by_name(make_page(page_module, folder))["broken"]
    assert broken["description"].startswith("cannot be used: ") and broken["metadata"] == {}
    assert "not a safetensors file" in broken["description"]
    assert broken["shorthash"] == "" and broken["search_terms"] == ["broken.safetensors"]  # not read to hash it
    assert json.loads(broken["prompt"]) == "<perfusion:broken>"


def test_the_editor_saves_preferences_and_refuses_a_beta_outside_its_range(page_module, folder):
    page = make_page(page_module, folder)
    items_by_name(page)
    editor = page.create_user_metadata_editor(None, "txt2img")
    with pytest.raises(GradioError, match=r"preferred β must be a number in \[-1, 2\]"):
        editor.save_user_metadata("hugsy", "", "", "", 1.0, "7")
    assert not (folder / "hugsy.json").exists()  # nothing written
    editor.save_user_metadata("hugsy", "my bear", "notes", "hugsy bear", 1.25, "0.65")
    saved = json.loads((folder / "hugsy.json").read_text(encoding="utf-8"))
    assert saved == {"description": "my bear", "notes": "notes", "activation text": "hugsy bear",
                     "preferred weight": 1.25, "preferred beta": "0.65"}
    hugsy = items_by_name(page)["hugsy"]  # the refreshed card
    assert json.loads(hugsy["prompt"]) == "<perfusion:hugsy:1.25:beta=0.65> hugsy bear"
    assert hugsy["description"] == "my bear"


def test_the_page_is_registered_once(page_module, folder):
    page_module.register(lambda: None, lambda: [folder])
    page_module.register(lambda: None, lambda: [folder])
    assert len(page_module.ui_extra_networks.extra_pages) == 1


@pytest.mark.parametrize("metadata, inserted", [
    ({}, "<perfusion:hugsy> hugsy"),
    ({"preferred weight": 1.0, "preferred beta": ""}, "<perfusion:hugsy> hugsy"),
    ({"preferred weight": "0.5"}, "<perfusion:hugsy:0.5> hugsy"),
    ({"preferred beta": -0.25}, "<perfusion:hugsy:beta=-0.25> hugsy"),
    ({"activation text": "hugsy, plush"}, "<perfusion:hugsy> hugsy, plush"),
    ({"preferred weight": 3, "preferred beta": "high"}, "<perfusion:hugsy> hugsy"),  # out of range, not a number
    ({"preferred weight": float("nan"), "preferred beta": float("inf")}, "<perfusion:hugsy> hugsy"),
])
def test_inserted_text_follows_the_valid_preferences_only(metadata, inserted):
    assert cards.inserted_text("hugsy", "hugsy", metadata) == inserted


def test_descriptions_are_plain_text_for_the_webui_to_escape():
    """A1111 escapes a card's description itself: markup would show as typed, and escaping twice garbles quotes."""
    concept = make_concept(3, SMALL_LAYERS, "hugsy", "teddy")
    assert cards.description(concept, 40_000) == (
        "trigger 'hugsy', a teddy; recommended β 0.70, τ 0.15 (local lock); sd15, 39 KB")
    assert cards.description(None, 0, "'x.safetensors' is <bad>") == "cannot be used: 'x.safetensors' is <bad>"


def test_a_concept_trained_at_another_clip_skip_says_which():
    """Forge Neo defaults to Clip skip 2: the card says what a concept needs before a generation refuses it."""
    assert cards.description(make_concept(3, SMALL_LAYERS), 1024).endswith("sd15, 1 KB")
    skip2 = make_concept(3, SMALL_LAYERS, clip_layer=-2)
    assert cards.description(skip2, 1024).endswith("sd15, 1 KB; needs Clip skip 2")
    assert cards.details(skip2)["clip skip"] == "2"


def test_odd_files_are_cards_that_say_why_and_words_from_a_file_never_become_markup(page_module, tmp_path):
    """A1111 builds every Extra Networks tab in one go: a file whose name no tag can hold, or a link to nothing, must
    give a card, not an exception; a concept's words go into search terms, which A1111 writes unescaped."""
    root = tmp_path / "perfusion"
    root.mkdir()
    save_concept(make_concept(1, SMALL_LAYERS, "hugsy", "teddy"), root / "hugsy v2=final.safetensors")
    (root / "dangling.safetensors").symlink_to(root / "missing.safetensors")
    markup = make_concept(2, SMALL_LAYERS, "zorbo", "<img src=x onerror=alert(1)>")
    save_concept(markup, root / "zorbo.safetensors")
    items = items_by_name(make_page(page_module, root))
    assert sorted(items) == ["dangling", "hugsy v2=final", "zorbo"]
    for item in items.values():  # what A1111 v1.10.1 reads as item[...]: one missing empties the tab
        assert {"name", "filename", "prompt", "local_preview"} <= set(item), item
    assert items["hugsy v2=final"]["description"].startswith("cannot be used: ")
    assert items["dangling"]["description"].startswith("cannot be used: ")
    assert "&lt;img src=x onerror=alert(1)&gt;" in items["zorbo"]["search_terms"]
    assert not any("<img" in term for term in items["zorbo"]["search_terms"])


def test_an_sdxl_concept_card_says_it_is_for_comfyui():
    from tools.factories import random_concept
    xl = random_concept(width=2048, layers=SMALL_LAYERS)
    xl.clip_layer = -2
    assert cards.description(xl, 2048).endswith("2 KB; for ComfyUI only")
