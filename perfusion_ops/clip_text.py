"""A differentiable CLIP text transformer over a host's own weights (pure torch, no autograd-hostile in-place ops).

Hosts run their CLIP without gradients (ComfyUI: in-place residual adds, inference tensors), but training needs
``∂ encoding / ∂ trigger embedding``. This is the standard CLIP text forward (pre-LN transformer, causal mask,
quick-GELU, final LayerNorm) written functionally, reading weights named as in the HF/ComfyUI ``text_model``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor


class ClipTextForward:
    """``encode(embeds)`` for token embeddings ``(B, L, T)``: the hidden states the host feeds cross-attention.

    ``weights`` maps ``text_model`` names (``embeddings.token_embedding.weight``, ``encoder.layers.0.mlp.fc1.weight``,
    ``final_layer_norm.bias``, ...) to frozen tensors. ``layer`` follows ComfyUI's CLIPSetLastLayer: -1 is the last
    layer, -2 the one before; the final LayerNorm is applied to whichever layer is taken (as SD1 does)."""

    def __init__(self, weights: dict[str, Tensor], heads: int = 12, eps: float = 1e-5):
        self.w = {name: t.detach() for name, t in weights.items()}
        self.heads, self.eps = heads, eps
        self.depth = 1 + max(int(name.split(".")[2]) for name in self.w if name.startswith("encoder.layers."))

    @property
    def token_table(self) -> Tensor:
        """The token embedding matrix ``(vocab, T)``."""
        return self.w["embeddings.token_embedding.weight"]

    def embed(self, ids: Tensor) -> Tensor:
        """Token embeddings (before position embeddings) of ``ids`` ``(B, L)``."""
        return F.embedding(ids, self.token_table)

    def __call__(self, embeds: Tensor, layer: int = -1) -> Tensor:
        length = embeds.shape[1]
        x = embeds + self.w["embeddings.position_embedding.weight"][:length]
        causal = torch.full((length, length), float("-inf"), device=x.device, dtype=x.dtype).triu(1)
        stop = self.depth + layer if layer < 0 else layer
        for index in range(stop + 1):
            x = self._block(x, f"encoder.layers.{index}.", causal)
        return self._norm(x, "final_layer_norm")

    def _norm(self, x: Tensor, name: str) -> Tensor:
        return F.layer_norm(x, x.shape[-1:], self.w[f"{name}.weight"], self.w[f"{name}.bias"], self.eps)

    def _linear(self, x: Tensor, name: str) -> Tensor:
        return F.linear(x, self.w[f"{name}.weight"], self.w[f"{name}.bias"])

    def _block(self, x: Tensor, p: str, mask: Tensor) -> Tensor:
        h = self._norm(x, p + "layer_norm1")
        q, k, v = (rearrange(self._linear(h, f"{p}self_attn.{n}_proj"), "b l (h d) -> b h l d", h=self.heads)
                   for n in "qkv")
        attention = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self._linear(rearrange(attention, "b h l d -> b l (h d)"), p + "self_attn.out_proj")
        h = self._linear(self._norm(x, p + "layer_norm2"), p + "mlp.fc1")
        return x + self._linear(h * torch.sigmoid(1.702 * h), p + "mlp.fc2")
