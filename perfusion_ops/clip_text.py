"""A differentiable CLIP text transformer over a host's own weights (pure torch, no autograd-hostile in-place ops).

Hosts run their CLIP without gradients (ComfyUI: in-place residual adds, inference tensors), but training needs
``∂ encoding / ∂ trigger embedding``. This is the standard CLIP text forward (pre-LN transformer, causal mask,
quick-GELU or GELU, final LayerNorm) written functionally, reading weights named as in the HF/ComfyUI ``text_model``.
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
    layer, -2 the one before. SD1 applies the final LayerNorm to whichever layer it takes (``final_norm``); SDXL
    takes layer -2 of both encoders without it. CLIP-L uses quick-GELU, OpenCLIP bigG the exact GELU; every CLIP
    text tower has 64-wide heads."""

    def __init__(self, weights: dict[str, Tensor], activation: str = "quick_gelu", eps: float = 1e-5):
        self.w = {name: t.detach() for name, t in weights.items()}
        self.heads, self.eps = self.token_table.shape[1] // 64, eps
        self.activation = {"quick_gelu": lambda h: h * torch.sigmoid(1.702 * h), "gelu": F.gelu}[activation]
        self.depth = 1 + max(int(name.split(".")[2]) for name in self.w if name.startswith("encoder.layers."))

    @property
    def token_table(self) -> Tensor:
        """The token embedding matrix ``(vocab, T)``."""
        return self.w["embeddings.token_embedding.weight"]

    def embed(self, ids: Tensor) -> Tensor:
        """Token embeddings (before position embeddings) of ``ids`` ``(B, L)``."""
        return F.embedding(ids, self.token_table)

    def __call__(self, embeds: Tensor, layer: int = -1, final_norm: bool = True) -> Tensor:
        x = self._layers(embeds, self.depth + layer if layer < 0 else layer)
        return self._norm(x, "final_layer_norm") if final_norm else x

    def hidden_and_pooled(self, embeds: Tensor, layer: int, final_norm: bool, eos: Tensor,
                          projection: Tensor) -> tuple[Tensor, Tensor]:
        """``self(embeds, layer, final_norm)`` and, from the same pass over the layers, the text embedding CLIP's
        contrastive head sees (SDXL's ``y`` takes bigG's): the last layer, final LayerNorm, at each row's end token
        ``eos`` ``(B,)``, times ``projection`` ``(P, T)``."""
        stop = self.depth + layer if layer < 0 else layer
        x = self._layers(embeds, stop)
        hidden = self._norm(x, "final_layer_norm") if final_norm else x
        x = self._norm(self._layers(x, self.depth - 1, start=stop + 1), "final_layer_norm")
        return hidden, x[torch.arange(len(x), device=x.device), eos] @ projection.T.to(x)

    def _layers(self, x: Tensor, stop: int, start: int = 0) -> Tensor:
        """Blocks ``start`` to ``stop`` on ``x``: token embeddings when ``start`` is 0, else block ``start - 1``'s
        output."""
        length = x.shape[1]
        if start == 0:
            x = x + self.w["embeddings.position_embedding.weight"][:length]
        causal = torch.full((length, length), float("-inf"), device=x.device, dtype=x.dtype).triu(1)
        for index in range(start, stop + 1):
            x = self._block(x, f"encoder.layers.{index}.", causal)
        return x

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
        return x + self._linear(self.activation(h), p + "mlp.fc2")
