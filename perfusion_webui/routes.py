"""Which route the edit takes into the webui's model: A1111's forward hooks or Forge's UnetPatcher patches, the
diffusion model of either, its cross-attention widths and Forge's attention function (imported only in Forge)."""
from __future__ import annotations

import os

from perfusion_ops.modules import cross_attention_layers, text_width


def is_forge(sd_model) -> bool:
    return hasattr(sd_model, "forge_objects")


ROUTE_VARIABLE = "PERFUSION_WEBUI_ROUTE"


def use_hooks(sd_model) -> bool:
    """A1111: forward hooks; Forge: UnetPatcher patches. ``PERFUSION_WEBUI_ROUTE=hooks`` forces the hook route
    in Forge too (a diagnostic: Forge's modules are called like the webui's, so both routes can be compared
    in one real host); ``=patches`` has no effect outside Forge."""
    route = os.environ.get(ROUTE_VARIABLE, "auto").strip().lower()
    return route == "hooks" or not is_forge(sd_model)


def diffusion_model(sd_model):
    if is_forge(sd_model):
        return sd_model.forge_objects.unet.model.diffusion_model
    return sd_model.model.diffusion_model


def cross_attention_widths(unet) -> tuple[dict[str, int], int]:
    """The edited layers' widths and the text width of ``unet``."""
    widths = cross_attention_layers(unet)
    return widths, text_width(unet, widths)  # text_width refuses a model without them


def forge_attention():
    try:
        from backend.attention import attention_function  # Forge (2024-08 and later)
    except ImportError:
        from ldm_patched.ldm.modules.attention import optimized_attention as attention_function  # Forge 1
    return attention_function
