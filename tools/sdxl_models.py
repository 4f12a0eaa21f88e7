"""Random-weight SDXL models built from ComfyUI's own SDXL classes in the running host (tests and benchmarks).

No SDXL file can be downloaded, and a random one at full size would be about 7 GB; ComfyUI's SDXL model and CLIP
classes are built in process instead, from SDXL's real configuration (``FULL_UNET``) or a reduced one
(``MICRO_UNET``: 7 attn2 layers, widths 64 and 128, same 2048-wide context and 2816-wide ``y``). The CLIP keeps both
encoders' full widths; ``text_layers`` shortens them (ComfyUI's ``model_options``, trees since 2025). ComfyUI leaves
its layers uninitialised, so every weight is filled here. Call these after ComfyUI is imported (``comfy_host``).
"""
from __future__ import annotations

import importlib

import torch

FULL_UNET = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
             "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
             "model_channels": 320, "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4],
             "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_middle": 10,
             "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "use_linear_in_transformer": True,
             "context_dim": 2048, "num_head_channels": 64, "use_temporal_attention": False,
             "use_temporal_resblock": False}
MICRO_UNET = {**FULL_UNET, "model_channels": 64, "num_res_blocks": [1, 1], "channel_mult": [1, 2],
              "transformer_depth": [1, 1], "transformer_depth_middle": 1, "transformer_depth_output": [1, 1, 1, 1]}


def random_fill(module: torch.nn.Module, seed: int = 0) -> None:
    """Weights N(0, 0.02); norms (by module type) weight 1, bias 0; other biases 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for owner in module.modules():
            norm = "Norm" in type(owner).__name__
            for name, p in owner.named_parameters(recurse=False):
                if norm or name == "bias":
                    p.fill_(1.0 if norm and name == "weight" else 0.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.02)


def sdxl_model(unet_config: dict = MICRO_UNET, seed: int = 1, load_device: torch.device | None = None):
    """A ModelPatcher of ComfyUI's SDXL model (float32) with ``unet_config``, built on the CPU and loaded onto
    ``load_device`` (default: the CPU) when ComfyUI loads it."""
    supported, patcher = (importlib.import_module(f"comfy.{name}") for name in ("supported_models", "model_patcher"))
    config = supported.SDXL(unet_config)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device=torch.device("cpu"))
    random_fill(model.diffusion_model, seed)
    return patcher.ModelPatcher(model, load_device or torch.device("cpu"), torch.device("cpu"))


def can_shorten_text_encoders() -> bool:
    """Whether this ComfyUI's CLIP takes ``model_options`` (needed for ``text_layers``)."""
    import inspect
    return "model_options" in inspect.signature(importlib.import_module("comfy.sd").CLIP).parameters


def sdxl_clip(text_layers: int | None = 3, seed: int = 0):
    """ComfyUI's SDXL CLIP (CLIP-L and OpenCLIP bigG at full widths, ``text_layers`` layers each; None: their full
    12 and 32, 818 M parameters), float32."""
    sd, supported = (importlib.import_module(f"comfy.{name}") for name in ("sd", "supported_models"))
    options = {"dtype": torch.float32}
    if text_layers is not None:
        small = {"num_hidden_layers": text_layers}
        options |= {"clip_l_model_config": small, "clip_g_model_config": small}
    clip = sd.CLIP(supported.SDXL(FULL_UNET).clip_target(), model_options=options)
    random_fill(clip.cond_stage_model, seed)
    return clip
