"""The helpers every host shares (perfusion_ops/modules.py, perfusion_ops/words.py)."""
import pytest
import torch
from torch import nn

from perfusion_ops.modules import cross_attention_layers, forwards_installed, text_width
from perfusion_ops.words import replace_words, whole_words


class Attention(nn.Module):
    def __init__(self, text, width):
        super().__init__()
        self.to_k, self.to_v = nn.Linear(text, width, bias=False), nn.Linear(text, width, bias=False)


def unet():
    blocks = nn.ModuleDict({"down": nn.ModuleDict({"attn1": Attention(8, 8), "attn2": Attention(12, 16)}),
                            "up": nn.ModuleDict({"attn2": Attention(12, 32), "norm": nn.LayerNorm(4)})})
    return nn.ModuleDict({"blocks": blocks})


def test_cross_attention_layers_are_the_attn2_modules_with_their_widths():
    root = unet()
    layers = cross_attention_layers(root)
    assert layers == {"blocks.down.attn2": 16, "blocks.up.attn2": 32}  # attn1 (self-attention) is not edited
    assert text_width(root, layers) == 12
    with pytest.raises(ValueError, match="no cross-attention layers to edit"):
        text_width(nn.Linear(2, 2), cross_attention_layers(nn.Linear(2, 2)))


def test_forwards_installed_restores_what_each_module_had():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    earlier = b.forward = lambda x: x * 3  # an instance forward someone else set
    x = torch.ones(1, 2)
    with forwards_installed({"a": a, "b": b}, {"a": lambda x: x * 0, "b": lambda x: x + 1}):
        assert torch.equal(a(x), x * 0) and torch.equal(b(x), x + 1)
    assert "forward" not in a.__dict__ and b.forward is earlier
    with pytest.raises(RuntimeError), forwards_installed({"a": a}, {"a": lambda x: x}):
        raise RuntimeError("restored even on error")
    assert "forward" not in a.__dict__


@pytest.mark.parametrize("not_after, text, want", [
    ("", "a Hugsy, hugsy2 and hugsys", "a teddy, toy and hugsys"),  # any case; the longest trigger first
    (":", "embedding:hugsy beside (hugsy:1.2)", "embedding:hugsy beside (teddy:1.2)"),  # ComfyUI's embeddings
    ("", "[cat:hugsy:0.5]", "[cat:teddy:0.5]"),  # the webui's prompt editing
])
def test_trigger_words_are_whole_words(not_after, text, want):
    words = {"hugsy": "teddy", "hugsy2": "toy"}
    assert replace_words(text, words, not_after) == want
    assert replace_words(text, {}, not_after) == text
    assert len(whole_words(["hugsy"], not_after).findall(want)) == 0
