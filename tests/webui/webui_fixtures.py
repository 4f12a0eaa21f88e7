"""Helpers for the webui/Forge adapter tests: real ldm cross-attention modules from the ComfyUI test host.

The webui's ``ldm.modules.attention.CrossAttention`` and Forge's ``backend.nn.unet.CrossAttention`` have the
same structure as ComfyUI's ``comfy.ldm.modules.attention.CrossAttention`` (``to_q``/``to_k``/``to_v`` bias-free
``Linear``s, ``to_out``; ``forward(x, context, value)``), and Forge's ``BasicTransformerBlock`` runs the same
``attn2_patch``/``attn2_replace`` protocol as ComfyUI's, so ComfyUI's own classes stand in for both.
"""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from perfusion_ops.concept import Concept

TEXT = 768
SMALL_LAYERS = {  # SD1.5 layer paths, narrow widths: fast, and every kind of block (input, middle, output)
    "input_blocks.1.1.transformer_blocks.0.attn2": 64,
    "middle_block.1.transformer_blocks.0.attn2": 96,
    "output_blocks.11.1.transformer_blocks.0.attn2": 64,
}
HEADS = 4


def comfy_attention():
    """``comfy.ldm.modules.attention`` of the ComfyUI test host (CPU), or skip."""
    try:
        from tools import comfy_host
        comfy_host.importable(comfy_host.comfy_root())
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"no ComfyUI test host: {err}")
    import comfy.options  # noqa: F401
    from comfy.cli_args import args
    args.cpu = True
    import comfy.ldm.modules.attention as attention
    return attention


class Node(nn.Module):
    """A plain container, so modules can sit at dotted paths like ``input_blocks.1.1``."""


def place(root: nn.Module, path: str, module: nn.Module) -> None:
    parent = root
    *parents, last = path.split(".")
    for name in parents:
        if not hasattr(parent, name):
            parent.add_module(name, Node())
        parent = getattr(parent, name)
    parent.add_module(last, module)


def init_(module: nn.Module, seed: int) -> nn.Module:
    """ComfyUI's ``disable_weight_init`` ops leave weights uninitialised: fill them reproducibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / max(p.shape[-1], 1) ** 0.5)
    return module


def attention_unet(layers: dict[str, int], seed: int = 0, dtype=torch.float32,
                   query_dim: int | None = None) -> nn.Module:
    """A module tree with a real ComfyUI ``CrossAttention`` at each layer path (``...transformer_blocks.0.attn2``):
    ``to_k``/``to_v`` map 768 → the layer's width; queries are ``query_dim`` wide (default: the width)."""
    attention = comfy_attention()
    root = Node()
    for n, (layer, width) in enumerate(layers.items()):
        module = attention.CrossAttention(query_dim=query_dim or width, context_dim=TEXT, heads=HEADS,
                                          dim_head=width // HEADS, dtype=dtype)
        place(root, layer, init_(module, seed + n))
    return root


def block_unet(layers: dict[str, int], seed: int = 0) -> nn.Module:
    """A module tree with a real ComfyUI ``BasicTransformerBlock`` at each ``...transformer_blocks.0``."""
    attention = comfy_attention()
    root = Node()
    for n, (layer, width) in enumerate(layers.items()):
        block = attention.BasicTransformerBlock(width, HEADS, width // HEADS, context_dim=TEXT, checkpoint=False)
        place(root, layer[: -len(".attn2")], init_(block, seed + n))
    return root


class Wrapper(nn.Module):
    """What a patcher holds: ``.diffusion_model``."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.diffusion_model = unet


def contexts(batch: int = 2, tokens: int = 77, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, tokens, TEXT, generator=g) * scale


# ------------------------------------------------------------------------------------------------ concepts
@functools.lru_cache(maxsize=None)
def covariance_factors(seed: int = 11):
    """A CLIP-like covariance C (condition ~4·10³), its Cholesky factor and C⁻¹, computed once per run."""
    from tools.factories import random_covariance
    cov = random_covariance(TEXT, seed=seed)
    return cov, torch.linalg.cholesky(cov), torch.linalg.inv(cov)


def encodings(n: int, seed: int) -> torch.Tensor:
    """``n`` float32 rows drawn from N(0, C): encodings with the text encoder's second moments."""
    _, factor, _ = covariance_factors()
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, TEXT, generator=g, dtype=torch.float64) @ factor.T).float()


def make_concept(seed: int, layers: dict[str, int], trigger: str = "hugsy", superclass: str = "teddy",
                 **fields) -> Concept:
    """A valid concept (q = C⁻¹ i) for ``layers``; cheap (no per-concept matrix work)."""
    _, _, inverse = covariance_factors()
    i, e_sup = encodings(2, seed + 1000)
    g = torch.Generator().manual_seed(seed)
    return Concept(
        trigger=trigger, superclass=superclass, embedding=torch.randn(1, TEXT, generator=g) * 0.02,
        target_input=i, target_key=(inverse @ i.double()).float(), superclass_encoding=e_sup,
        value_outputs={layer: torch.randn(width, generator=g) for layer, width in layers.items()},
        encoder_fingerprint="0123456789abcdef", **fields,
    ).validate()
