"""The CLIP layer (clip skip) a concept lives in: checked when Apply runs, and again whenever a prompt with a trigger
word is encoded, because a CLIP Set Last Layer placed *after* Apply changes the encodings the gate compares with
``i`` (Eq. 3) and would shut it silently.

The encode-time check is an object patch on the CLIP's own ModelPatcher (``clip.patcher``): like the UNet patches it
lives on a clone, follows every later clone (CLIP Set Last Layer, LoRA loaders) and never touches the host's object.
"""
from __future__ import annotations

import logging

from .tokenizer import TriggerTokenizer

log = logging.getLogger("perfusion")

ENCODE = "encode_token_weights"  # SD1ClipModel's public entry point, called by CLIP.encode_from_tokens


def clip_layer(clip) -> int:
    """The hidden layer a ComfyUI CLIP encodes from: CLIP Set Last Layer's, else its text model's default (SD1.x:
    -1, the last; SDXL: -2 in both encoders)."""
    if getattr(clip, "layer_idx", None) is not None:
        both = [getattr(clip.cond_stage_model, name, None) for name in ("clip_l", "clip_g")]
        depth = getattr(both[0], "num_layers", 12)
        if all(both) and -clip.layer_idx > depth:
            raise ValueError(f"CLIP Set Last Layer {clip.layer_idx} on SDXL: ComfyUI then keeps CLIP-L at its default "
                             f"layer while bigG takes {clip.layer_idx}; Perfusion takes -1 to -{depth} on SDXL")
        return clip.layer_idx
    default = getattr(_first_encoder(clip.cond_stage_model), "options_default", None)
    layer = _layer(*default[:2]) if default else None
    return -1 if layer is None else layer


def encoder_layer(text_model) -> int | None:
    """The layer ComfyUI's text model is set to encode from at this moment (-1: the last), None if unknown.

    ``CLIP.encode_from_tokens`` sets it on the model just before calling ``encode_token_weights``."""
    inner = _first_encoder(text_model)
    return _layer(getattr(inner, "layer", None), getattr(inner, "layer_idx", None))


def _first_encoder(text_model):
    """SD1.x's CLIP-L, or SDXL's (both of its encoders are set alike)."""
    return getattr(text_model, getattr(text_model, "clip", "clip_l"), None)


def _layer(mode, index) -> int | None:
    return -1 if mode == "last" else index if mode == "hidden" else None


class LayerGuard:
    """``encode_token_weights`` of a CLIP whose tokenizer knows triggers: refuses to encode a trigger's vector from
    another layer than its concept's, then encodes as the host does."""

    def __init__(self, text_model, tokenizer: TriggerTokenizer):
        self.text_model, self.tokenizer = text_model, tokenizer

    def __call__(self, token_weight_pairs, *args, **kwargs):
        used = self.tokenizer.triggers_in(token_weight_pairs)
        layer = encoder_layer(self.text_model) if used else None
        if used and layer is None:  # a host whose text model no longer says; Apply's check still ran
            log.warning("[perfusion] cannot tell which CLIP layer this text encoder uses; not checked at encode time")
        elif used:
            for word in sorted(used):
                self.tokenizer.concepts[word].check_clip_layer(
                    layer, "a CLIP Set Last Layer after Perfusion Apply changed it: set the layer before Apply")
        return type(self.text_model).encode_token_weights(self.text_model, token_weight_pairs, *args, **kwargs)


def guard_clip_layer(clip) -> None:
    """Install the encode-time layer check on ``clip`` (a clone whose tokenizer is a TriggerTokenizer)."""
    clip.patcher.add_object_patch(ENCODE, LayerGuard(clip.cond_stage_model, clip.tokenizer))
