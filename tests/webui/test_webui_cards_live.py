"""The Perfusion tab in a real, running AUTOMATIC1111 (or Forge) with this extension installed: the webui's own page
classes build the cards from files this test puts into its ``models/perfusion``.

Runs where ``PERFUSION_WEBUI_URL`` (e.g. http://127.0.0.1:7861) and ``PERFUSION_WEBUI_ROOT`` (the webui's folder)
name one; skips otherwise (no webui can be installed in CI). The README says how a real A1111 v1.10.1 was run here.
"""
from __future__ import annotations

import html
import json
import os
import re
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from perfusion_ops.concept_file import save_concept

from webui_fixtures import SMALL_LAYERS, make_concept

URL, ROOT = os.environ.get("PERFUSION_WEBUI_URL"), os.environ.get("PERFUSION_WEBUI_ROOT")
pytestmark = pytest.mark.skipif(not (URL and ROOT), reason="no running webui: set PERFUSION_WEBUI_URL and "
                                "PERFUSION_WEBUI_ROOT to a webui with this extension installed")


def card(name: str) -> str:
    query = urllib.parse.urlencode({"page": "perfusion", "tabname": "txt2img", "name": name})
    with urllib.request.urlopen(f"{URL}/sd_extra_networks/get-single-card?{query}", timeout=60) as response:
        return json.load(response)["html"]


@pytest.fixture
def files():
    folder = Path(ROOT) / "models" / "perfusion" / "perfusion-live-test"
    folder.mkdir(parents=True, exist_ok=True)
    save_concept(make_concept(1, SMALL_LAYERS, "hugsy", "teddy"), folder / "hugsy.safetensors")
    Image.new("RGB", (64, 96), "teal").save(folder / "hugsy.png")
    (folder / "broken.safetensors").write_bytes(b"not a concept")
    (folder / "odd v2=final.safetensors").write_bytes((folder / "hugsy.safetensors").read_bytes())
    (folder / "hugsy.json").write_text(json.dumps({"preferred weight": 0.8, "activation text": "hugsy plush"}))
    yield folder
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()


def test_the_real_page_builds_cards_that_insert_the_tag_and_the_trigger(files):
    hugsy = html.unescape(card("perfusion-live-test/hugsy"))
    assert "cardClicked('txt2img', \"<perfusion:perfusion-live-test/hugsy:0.8> hugsy plush\"" in hugsy
    assert "thumb?filename=" in hugsy and "hugsy.png" in hugsy  # the preview beside the file
    assert re.search(r"trigger 'hugsy', a teddy; recommended β 0\.70, τ 0\.15 \(local lock\)", hugsy)
    broken = html.unescape(card("perfusion-live-test/broken"))
    assert "cannot be used: 'broken.safetensors' is truncated or not a safetensors file" in broken
    odd = html.unescape(card("perfusion-live-test/odd v2=final"))  # no tag can name it: a card, not a failed tab
    assert "cannot be used: bad concept name 'perfusion-live-test/odd v2=final'" in odd
