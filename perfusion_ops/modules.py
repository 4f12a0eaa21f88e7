"""What every host does with a UNet's modules, written once: find the cross-attention layers Perfusion edits, and
swap module forwards in and out (training routes each K/V projection through the edit being trained)."""
from __future__ import annotations

import contextlib

from torch import nn


def cross_attention_layers(unet: nn.Module) -> dict[str, int]:
    """``{module path: K/V output width}`` of every cross-attention (``attn2``) layer under ``unet``; each edited
    layer is a ``to_k``/``to_v`` pair mapping the text encodings to that width."""
    return {name: module.to_k.out_features for name, module in unet.named_modules()
            if name.endswith("attn2") and hasattr(module, "to_k")}


def text_width(unet: nn.Module, layers: dict[str, int]) -> int:
    """Width of the text encodings ``unet``'s cross-attention takes (768 for SD1.x), from the first of ``layers``."""
    if not layers:
        raise ValueError("this model has no cross-attention layers to edit")
    return unet.get_submodule(next(iter(layers))).to_k.in_features


@contextlib.contextmanager
def forwards_installed(modules: dict, forwards: dict):
    """Set ``forward`` of each module ``modules[key]`` to ``forwards[key]`` while open; restore whatever instance
    forward it had before (none: the class's own)."""
    previous = {key: modules[key].__dict__.get("forward") for key in forwards}
    for key, fn in forwards.items():
        modules[key].forward = fn
    try:
        yield
    finally:
        for key, old in previous.items():
            if old is None:
                del modules[key].forward
            else:
                modules[key].forward = old
