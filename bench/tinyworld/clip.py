"""A tiny CLIP for the world: trained here, contrastively, on the world's renderings and captions, and frozen before
the world model trains on its text tower's last hidden states, as SD1.5 conditions on CLIP ViT-L/14's.

What makes it CLIP-like where Perfusion cares: a word-level vocabulary with start and end tokens, learned position
embeddings, pre-LN transformer blocks under a *causal* mask (a token's encoding depends on the words before it only,
so a trigger's encoding in "a sks on the left and a zwx …" is its encoding in "a sks"), a final layer norm whose
output at every token is what cross-attention sees, and the end token's state projected into the joint space for the
contrastive loss. The image tower is a small CNN whose last feature map is flattened rather than pooled, so where
things are survives into the embedding.
"""
from __future__ import annotations

import math
import random
import re
import time
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import render as R
from .text import Encoder, words_of_world

SPECIAL = ("<pad>", "<unk>", "<start>", "<end>")


class Block(nn.Module):
    """CLIP's residual attention block: pre-LN causal self-attention, then a pre-LN GELU MLP."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # causal: padding sits after the end token, so no real token ever attends to it
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, n, d)
        x = x + self.out(a)
        return x + self.mlp(self.ln_2(x))


class ImageTower(nn.Module):
    """Three stride-2 convolutions to a 4×4 map, flattened (position kept) and projected to the joint space."""

    def __init__(self, embed: int):
        super().__init__()
        conv = lambda cin, cout: [nn.Conv2d(cin, cout, 3, 2, 1), nn.GroupNorm(8, cout), nn.SiLU()]
        self.body = nn.Sequential(*conv(3, 32), *conv(32, 64), *conv(64, 128))
        self.proj = nn.Linear(128 * 16, embed)

    def forward(self, images: Tensor) -> Tensor:
        return self.proj(self.body(images).flatten(1))


class TinyCLIP(Encoder):
    name = "tinyclip"

    def __init__(self, width: int = 96, layers: int = 3, heads: int = 4, embed: int = 64, context: int = 32,
                 words: list[str] | None = None):
        super().__init__()
        self.words = [*SPECIAL, *(words or words_of_world())]
        self.vocab = {w: k for k, w in enumerate(self.words)}
        self.unk, self.bos, self.eos = (self.vocab[w] for w in SPECIAL[1:])
        self.width = width
        self.token_embedding = nn.Embedding(len(self.words), width)
        self.position_embedding = nn.Parameter(torch.randn(context, width) * 0.01)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.blocks = nn.ModuleList([Block(width, heads) for _ in range(layers)])
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Linear(width, embed, bias=False)
        self.visual = ImageTower(embed)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    @property
    def table(self) -> Tensor:
        return self.token_embedding.weight

    def word_ids(self, word: str) -> list[int]:
        return [self.vocab.get(w, self.unk) for w in re.findall(r"\w+|[^\w\s]", word.lower())]

    def forward_embeds(self, embeds: Tensor, mask: Tensor) -> Tensor:
        x = embeds + self.position_embedding[: embeds.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.ln_final(x)

    def text_features(self, prompts: list[str]) -> Tensor:
        """The end token's final state, projected into the joint space (CLIP's text embedding)."""
        context, mask, _ = self.encode(prompts)
        return self.text_projection(context[torch.arange(len(prompts)), mask.sum(1) - 1])

    def image_features(self, images: Tensor) -> Tensor:
        return self.visual(images)

    def loss(self, images: Tensor, prompts: list[str]) -> Tensor:
        """CLIP's symmetric InfoNCE over the batch, with a learned temperature (capped at 100 as CLIP's)."""
        a, b = F.normalize(self.image_features(images), dim=-1), F.normalize(self.text_features(prompts), dim=-1)
        logits = self.logit_scale.clamp(max=math.log(100)).exp() * a @ b.T
        target = torch.arange(len(prompts))
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def clip_batch(rng: random.Random, n: int) -> tuple[Tensor, list[str]]:
    """n fresh world scenes rendered, with one caption each (attributes named at random, as the world model's)."""
    pairs = [R.random_scene(rng) for _ in range(n)]
    images, _ = R.render_batch([scene for scene, _ in pairs], rng.randrange(2**31))
    return torch.from_numpy(images), [text for _, text in pairs]


def train_clip(width: int, layers: int, heads: int, embed: int, steps: int, batch: int, lr: float, seed: int,
               log=print) -> TinyCLIP:
    """AdamW with warm-up and cosine decay on fresh (rendering, caption) batches; returns the frozen model."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    clip = TinyCLIP(width, layers, heads, embed)
    decay = [p for n, p in clip.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in clip.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr)
    start, recent = time.time(), []
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, step / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = clip.loss(*clip_batch(rng, batch))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        recent.append(float(loss.detach()))
        if step % 100 == 0 or step == steps:
            log(f"  clip step {step}/{steps} loss {np.mean(recent):.3f} ({time.time() - start:.0f}s)")
            recent = []
    return clip.eval().requires_grad_(False)


@torch.no_grad()
def zero_shot(clip: TinyCLIP, count: int = 256, seed: int = 5) -> dict[str, float]:
    """CLIP's zero-shot check: for fresh single-object renderings, the caption naming the right value of one
    attribute (all else named correctly) scores highest among its alternatives. Chance is 1 / number of values."""
    rng = random.Random(seed)
    values = {"colour": list(R.COLOURS), "shape": list(R.SHAPES), "position": list(R.POSITIONS),
              "background": list(R.BACKGROUNDS), "texture": list(R.TEXTURES), "size": list(R.SIZES)}
    scenes = [R.Scene((R.Thing(rng.choice(R.SHAPES), rng.choice(list(R.COLOURS)), rng.choice(R.TEXTURES),
                               rng.choice(list(R.SIZES)), rng.choice(list(R.POSITIONS))),),
                      rng.choice(list(R.BACKGROUNDS)))
              for _ in range(count)]
    images = F.normalize(clip.image_features(torch.from_numpy(R.render_batch(scenes, seed)[0])), dim=-1)
    words = dict.fromkeys(("size", "colour", "texture", "position", "background"), True)
    out = {}
    for attribute, options in values.items():
        vary = lambda scene, v: (replace(scene, background=v) if attribute == "background"
                                 else replace(scene, things=(replace(scene.things[0], **{attribute: v}),)))
        prompts = [R.caption(vary(scene, v), "a photo of a {}", words) for scene in scenes for v in options]
        texts = F.normalize(clip.text_features(prompts), dim=-1).view(count, len(options), -1)
        picked = (texts @ images[:, :, None])[..., 0].argmax(1)
        truth = [scene.background if attribute == "background" else getattr(scene.things[0], attribute)
                 for scene in scenes]
        out[attribute] = float(np.mean([options[int(k)] == t for k, t in zip(picked, truth)]))
    return out
