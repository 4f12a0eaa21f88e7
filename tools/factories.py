"""Builders of realistic test and benchmark inputs: random concepts in SD1.5 dimensions and the real CLIP-L
covariance."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from perfusion_ops import Concept
from perfusion_ops.covariance import ridge_inverse

REPO = Path(__file__).resolve().parents[1]
SHARED_COVARIANCE = REPO.parent / "shared" / "data" / "clip-vit-l14-text-covariance.safetensors"

# The cross-attention layers of the SD1.5 UNet, by the module paths ComfyUI and the webui's ldm both use.
# (block path, inner width): the 16 transformer blocks whose attn2.to_k / attn2.to_v map 768 -> width.
_SD15_BLOCKS = [
    ("input_blocks.1.1", 320), ("input_blocks.2.1", 320),
    ("input_blocks.4.1", 640), ("input_blocks.5.1", 640),
    ("input_blocks.7.1", 1280), ("input_blocks.8.1", 1280),
    ("middle_block.1", 1280),
    ("output_blocks.3.1", 1280), ("output_blocks.4.1", 1280), ("output_blocks.5.1", 1280),
    ("output_blocks.6.1", 640), ("output_blocks.7.1", 640), ("output_blocks.8.1", 640),
    ("output_blocks.9.1", 320), ("output_blocks.10.1", 320), ("output_blocks.11.1", 320),
]
SD15_TEXT_WIDTH = 768
SD15_LAYERS: dict[str, int] = {f"{block}.transformer_blocks.0.attn2": width for block, width in _SD15_BLOCKS}

# SDXL's: (block path, transformer depth, inner width) of its 70 attn2 layers, whose to_k/to_v map 2048 -> width.
_SDXL_BLOCKS = [("input_blocks.4.1", 2, 640), ("input_blocks.5.1", 2, 640), ("input_blocks.7.1", 10, 1280),
                ("input_blocks.8.1", 10, 1280), ("middle_block.1", 10, 1280)]
_SDXL_BLOCKS += [(f"output_blocks.{k}.1", 10, 1280) for k in range(3)]
_SDXL_BLOCKS += [(f"output_blocks.{k}.1", 2, 640) for k in range(3, 6)]
SDXL_TEXT_WIDTH = 2048
SDXL_LAYERS: dict[str, int] = {f"{block}.transformer_blocks.{n}.attn2": width
                               for block, depth, width in _SDXL_BLOCKS for n in range(depth)}


def real_covariance() -> torch.Tensor | None:
    """The real CLIP-L text covariance from ../shared/data (float64), or None where it is absent."""
    if not SHARED_COVARIANCE.is_file():
        return None
    return load_file(SHARED_COVARIANCE)["covariance"].double()


def random_covariance(dim: int, seed: int = 0, condition: float = 4e3) -> torch.Tensor:
    """A random SPD matrix with eigenvalues spread log-uniformly over ``condition`` (like CLIP-L's C)."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    eig = torch.logspace(0, torch.log10(torch.tensor(condition)).item(), dim, dtype=torch.float64)
    return basis @ torch.diag(eig) @ basis.T


def sample_encodings(covariance: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` float64 rows drawn from N(0, C): encodings with the second moments of the text encoder."""
    g = torch.Generator().manual_seed(seed)
    factor = torch.linalg.cholesky(covariance)
    return torch.randn(n, covariance.shape[0], generator=g, dtype=torch.float64) @ factor.T


def random_concept(
    seed: int = 0,
    layers: dict[str, int] = SD15_LAYERS,
    width: int = 768,
    covariance: torch.Tensor | None = None,
    trained_k: bool = False,
    trigger: str = "hugsy",
    superclass: str = "teddy",
) -> Concept:
    """A valid concept with random (but consistent, q = C⁻¹ i) tensors for the given layers."""
    g = torch.Generator().manual_seed(seed)
    covariance = covariance if covariance is not None else random_covariance(width, seed)
    i, e_sup = sample_encodings(covariance, 2, seed + 1000).float()
    q = (ridge_inverse(covariance) @ i.double()).float()
    outputs = {layer: torch.randn(dim, generator=g) for layer, dim in layers.items()}
    keys = {layer: torch.randn(dim, generator=g) for layer, dim in layers.items()} if trained_k else None
    text_encoder = {768: "clip-l", 1024: "open-clip-h", 1280: "clip-g", 2048: "clip-l+clip-g"}[width]
    return Concept(
        trigger=trigger, superclass=superclass, embedding=torch.randn(1, width, generator=g) * 0.02,
        target_input=i, target_key=q, superclass_encoding=e_sup, value_outputs=outputs, key_outputs=keys,
        text_encoder=text_encoder, encoder_fingerprint="0123456789abcdef", info={"steps": "400"},
    ).validate()
