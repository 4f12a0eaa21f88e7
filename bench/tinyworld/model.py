"""A small v-prediction text-to-image UNet with the SD1.5 UNet's structure, and its noise schedule and sampler.

Pixel space: a 32×32 RGB image is folded 2×2 into a 16×16×12 "latent" (pixel unshuffle, lossless: the world's
stand-in for a VAE). Blocks and module paths follow SD1.5 / ComfyUI's ``openaimodel`` (``input_blocks``,
``middle_block``, ``output_blocks``, each transformer block with ``attn1`` self- and ``attn2`` cross-attention
whose ``to_k``/``to_v`` take the text encodings), at two resolutions (16×16 and 8×8) with cross-attention in
every transformer. Text contexts are zero-padded; cross-attention masks keys whose *input* row is all zero. An
optional ``key_context`` feeds ``to_k`` instead of the context (the global key lock, paper App. C; ComfyUI's
``attn2_patch`` does the same).
"""
from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FOLD = 2


def fold(images: Tensor) -> Tensor:
    return F.pixel_unshuffle(images, FOLD)


def unfold(latents: Tensor) -> Tensor:
    return F.pixel_shuffle(latents, FOLD)


def cosine_alphas_cumprod(steps: int = 1000, s: float = 0.008) -> Tensor:
    """ᾱ_t of the cosine schedule (Nichol & Dhariwal), t = 0 … steps−1, clipped to [1e-4, 0.9999]."""
    t = (torch.arange(steps + 1, dtype=torch.float64) / steps + s) / (1 + s)
    f = torch.cos(t * math.pi / 2) ** 2
    return (f[1:] / f[0]).clamp(1e-4, 0.9999).float()


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], -1)


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(8, ch)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int):
        super().__init__()
        self.in_layers = nn.Sequential(_norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(temb, cout))
        self.out_layers = nn.Sequential(_norm(cout), nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1))
        self.skip_connection = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """SD's CrossAttention: ``to_q``/``to_k``/``to_v`` without bias, ``to_out``; context=None is self-attention;
    ``key_context`` (same shape as ``context``) replaces the context of ``to_k`` only. Within
    :func:`cross_attention_maps`, a cross-attention call also appends its attention maps to ``maps``."""

    def __init__(self, dim: int, context_dim: int | None, heads: int):
        super().__init__()
        context_dim = context_dim or dim
        self.heads = max(1, dim // heads)  # ``heads`` is the head width here
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim))
        self.maps: list[Tensor] | None = None

    def forward(self, x: Tensor, context: Tensor | None = None, key_context: Tensor | None = None) -> Tensor:
        mask = None
        if context is None:
            context = x
        else:  # zero rows are padding: mask them
            mask = (context.abs().amax(-1) > 0)[:, None, None, :]
        b, n, _ = x.shape
        h = self.heads
        q = self.to_q(x).view(b, n, h, -1).transpose(1, 2)
        k = self.to_k(context if key_context is None else key_context).view(b, context.shape[1], h, -1).transpose(1, 2)
        v = self.to_v(context).view(b, context.shape[1], h, -1).transpose(1, 2)
        if self.maps is not None and mask is not None:  # the softmax written out, to keep its probabilities
            probs = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).masked_fill(~mask, float("-inf")).softmax(-1)
            self.maps.append(probs.mean(1))
            out = probs @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # a caption always has start/end tokens
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


@contextlib.contextmanager
def cross_attention_maps(unet: nn.Module):
    """Within, every cross-attention call of ``unet`` appends its attention probabilities, averaged over heads,
    (B, pixels, tokens), to the yielded list (differentiable: the world's localisation loss trains on them)."""
    layers = [m for m in unet.modules() if isinstance(m, CrossAttention)]
    maps: list[Tensor] = []
    for layer in layers:
        layer.maps = maps
    try:
        yield maps
    finally:
        for layer in layers:
            layer.maps = None


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 2):
        super().__init__()
        self.proj = nn.Linear(dim, dim * mult * 2)  # GEGLU, as SD1.5
        self.out = nn.Linear(dim * mult, dim)

    def forward(self, x: Tensor) -> Tensor:
        a, g = self.proj(x).chunk(2, -1)
        return self.out(a * F.gelu(g))


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int, self_attention: bool = True):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads) if self_attention else None
        self.attn2 = CrossAttention(dim, context_dim, heads)
        self.ff = FeedForward(dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor, key_context: Tensor | None = None) -> Tensor:
        if self.attn1 is not None:
            x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, key_context)
        return x + self.ff(self.norm3(x))


@functools.lru_cache(maxsize=None)  # a few (size, width) pairs; recomputing it in every forward is waste
def sincos_2d(height: int, width: int, dim: int) -> Tensor:
    """Fixed 2-D sine-cosine position embedding (height·width, dim), as in MAE/DiT: x in one half, y in the other."""
    quarter = dim // 4
    freqs = 1.0 / 100 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                            indexing="ij")
    parts = [f(c.reshape(-1, 1) * freqs) for c in (xs, ys) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, 1)


class SpatialTransformer(nn.Module):
    """SD's SpatialTransformer plus a fixed position embedding on its tokens: queries know where they are, so a
    word like "left" can be attended in one half only (SD1.5 gets this from its depth; this net is two levels)."""

    def __init__(self, ch: int, context_dim: int, heads: int, self_attention: bool = True):
        super().__init__()
        self.norm = _norm(ch)
        self.proj_in = nn.Conv2d(ch, ch, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(ch, context_dim, heads, self_attention)])
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: Tensor, context: Tensor, key_context: Tensor | None = None) -> Tensor:
        b, c, hh, ww = x.shape
        h = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2) + sincos_2d(hh, ww, c).to(x)
        for block in self.transformer_blocks:
            h = block(h, context, key_context)
        return x + self.proj_out(h.transpose(1, 2).reshape(b, c, hh, ww))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Step(nn.Sequential):
    """SD's TimestepEmbedSequential: passes ``emb`` to ResBlocks and ``context`` to transformers."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor, key_context: Tensor | None = None) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, key_context)
            else:
                x = layer(x)
        return x


class TinyUNet(nn.Module):
    """Two resolution levels (16×16: c0, 8×8: c1), a transformer with cross-attention after every ResBlock.

    It predicts v = √ᾱ ε − √(1−ᾱ) x₀ (Salimans & Ho 2022, as SD2): an ε-loss weights the x₀ error by the SNR,
    almost nothing at the high noise levels where layout is decided, and an ε-model of this size never learned
    "on the left". :meth:`predict_noise` gives ε, which is what hosts, the sampler and Perfusion's loss use.

    The 8×8 transformers of the up path have width c1 too, so cross-attention widths are c0 and c1. Two fixed
    coordinate channels join the input (CoordConv) and every transformer adds a position embedding: SD1.5 infers
    position from a deep receptive field over a 64×64 latent, a two-level net over 16×16 cannot. (Measured at 700
    steps: coordinates alone left "on the left" at chance, 0.15; the embedding on the attention tokens gave 0.71.)"""

    def __init__(self, c0: int = 32, c1: int = 64, context_dim: int = 384, heads: int = 32,
                 in_ch: int = 3 * FOLD * FOLD):
        super().__init__()
        temb = 4 * c0
        self.model_channels = c0
        self.time_embed = nn.Sequential(nn.Linear(c0, temb), nn.SiLU(), nn.Linear(temb, temb))
        # self-attention (attn1) at 8×8 only: at 16×16 it would cost more than the rest of the model on CPU
        st = lambda ch: SpatialTransformer(ch, context_dim, heads, self_attention=ch == c1)
        self.input_blocks = nn.ModuleList([
            Step(nn.Conv2d(in_ch + 2, c0, 3, padding=1)),
            Step(ResBlock(c0, c0, temb), st(c0)),
            Step(Downsample(c0)),
            Step(ResBlock(c0, c1, temb), st(c1)),
        ])
        self.middle_block = Step(ResBlock(c1, c1, temb), st(c1), ResBlock(c1, c1, temb))
        self.output_blocks = nn.ModuleList([
            Step(ResBlock(c1 + c1, c1, temb), st(c1)),
            Step(ResBlock(c1 + c0, c1, temb), st(c1), Upsample(c1)),
            Step(ResBlock(c1 + c0, c0, temb), st(c0)),
            Step(ResBlock(c0 + c0, c0, temb), st(c0)),
        ])
        self.out = nn.Sequential(_norm(c0), nn.SiLU(), nn.Conv2d(c0, in_ch, 3, padding=1))

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, key_context: Tensor | None = None) -> Tensor:
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        hs = []
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, x.shape[2]), torch.linspace(-1, 1, x.shape[3]), indexing="ij")
        h = torch.cat([x, torch.stack([xs, ys]).to(x).expand(x.shape[0], -1, -1, -1)], 1)
        for block in self.input_blocks:
            h = block(h, emb, context, key_context)
            hs.append(h)
        h = self.middle_block(h, emb, context, key_context)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], 1), emb, context, key_context)
        return self.out(h)

    def predict_noise(self, x: Tensor, timesteps: Tensor, context: Tensor, alphas_cumprod: Tensor,
                      key_context: Tensor | None = None) -> Tensor:
        """ε = √ᾱ v + √(1−ᾱ) x_t."""
        a = alphas_cumprod.to(x)[timesteps].view(-1, 1, 1, 1)
        return a.sqrt() * self(x, timesteps, context, key_context) + (1 - a).sqrt() * x


@torch.no_grad()
def ddim_sample(unet: TinyUNet, context: Tensor, uncond: Tensor, alphas_cumprod: Tensor, steps: int = 20,
                guidance: float = 3.0, seed: int = 0, seeds: list[int] | None = None, eta: float = 1.0,
                key_context: Tensor | None = None) -> Tensor:
    """DDIM with classifier-free guidance; returns images (B, 3, 32, 32) in [-1, 1].

    ``eta`` 1 (default) is ancestral sampling: each step adds fresh noise, which washes out the errors of the
    first, high-noise steps (deterministic η = 0 amplifies them in this small model). Image k draws all of its
    noise from generator ``seeds[k]`` (default ``seed + k``), so an image does not depend on its batch.
    ``uncond`` is the context of the empty caption (1 or B rows); contexts are zero-padded to one length.
    ``key_context`` (B rows like ``context``): what the conditional half's ``to_k`` sees (global key lock)."""
    b = context.shape[0]
    if uncond.shape[0] == 1:
        uncond = uncond.expand(b, -1, -1)
    length = max(context.shape[1], uncond.shape[1])
    pad = lambda c: F.pad(c, (0, 0, 0, length - c.shape[1]))
    both = torch.cat([pad(uncond), pad(context)])
    keys = None if key_context is None else torch.cat([pad(uncond), pad(key_context)])
    gens = [torch.Generator().manual_seed(s) for s in (seeds if seeds is not None else range(seed, seed + b))]
    shape = (3 * FOLD * FOLD, 16, 16)
    draw = lambda: torch.stack([torch.randn(shape, generator=g) for g in gens])
    x = draw()
    total = len(alphas_cumprod)
    ts = torch.linspace(total - 1, 0, steps).round().long()
    for k, t in enumerate(ts):
        a = alphas_cumprod[t]
        a_prev = alphas_cumprod[ts[k + 1]] if k + 1 < steps else torch.tensor(1.0)
        eps_u, eps_c = unet.predict_noise(torch.cat([x, x]), t.repeat(2 * b), both, alphas_cumprod, keys).chunk(2)
        eps = eps_u + guidance * (eps_c - eps_u)
        x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).clamp(min=0).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).clamp(min=0).sqrt() * eps
        if k + 1 < steps:
            x = x + sigma * draw()
    return unfold(x).clamp(-1, 1)
