"""Train (once) and cache the world: its text encoder (a tiny CLIP, trained first and frozen; or the pretrained
MiniLM), the base text-to-image model, a fine-tuned copy, the feature net, and C.

Seeded and bit-reproducible for given :class:`WorldSettings` and thread count (the cache key includes the threads:
CPU kernels split their sums by thread, so another count trains another world, like another seed). The cache
file is ``<cache>/world-<settings key>.safetensors``; a partial checkpoint is written while training runs.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

from perfusion_ops.covariance import CovarianceEstimator

from . import render as R
from .clip import TinyCLIP, train_clip
from .measure import FeatureNet, train_features
from .model import TinyUNet, cosine_alphas_cumprod, cross_attention_maps, fold
from .text import Encoder, TextEncoder


@dataclass(frozen=True)
class WorldSettings:
    version: int = 4  # of the model code (4: half the scenes two objects, positions said first or last): retrains
    encoder: str = "clip"  # "clip": the tiny CLIP of clip.py; "minilm": the pretrained all-MiniLM-L6-v2
    threads: int = 0  # torch CPU threads the world was trained with (0: torch's default); see the module doc
    seed: int = 0
    clip_width: int = 96
    clip_layers: int = 3
    clip_steps: int = 600
    clip_batch: int = 256
    clip_lr: float = 1e-3
    captions: int = 5000  # caption pool (encoded once); unnamed attributes are redrawn at every use
    steps: int = 4000  # shape control: 0.26 at 2000 steps (colour, position ~1.0), 0.97 at 4000 (64 prompts)
    batch: int = 64
    lr: float = 2e-3
    warmup: int = 50
    ema: float = 0.995
    c0: int = 32
    c1: int = 64
    heads: int = 16  # head width: 2 heads at 16×16, 4 at 8×8 (one 32-wide head barely learned background)
    uncond: float = 0.1  # caption dropout (classifier-free guidance)
    localise: float = 0.1  # weight of the localisation loss (:func:`localisation_loss`); 0: none
    # an unnamed colour is the shape's typical one with this probability (render.realise), so that shape words carry
    # an appearance as SD's nouns do; at 0 a trigger in a noun's slot held little of a concept (first-opening
    # concepts: fidelity 0.058 against 0.479 at 0.8), and key locking fell behind trained-K
    typical: float = 0.8
    finetune_steps: int = 400  # the second, fine-tuned world model (outlined objects)
    finetune_batch: int = 32
    finetune_lr: float = 1e-3
    feature_steps: int = 600

    def key(self) -> str:
        fields = {k: v for k, v in asdict(self).items() if k != "typical" or v}  # at 0: the keys of earlier worlds
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]


class Captions:
    """The caption pool, its encodings (fp16, variable length) and the empty caption's."""

    def __init__(self, text: Encoder, count: int, seed: int, log=print, typical: float = 0.0):
        rng, self.typical = random.Random(seed), typical
        pairs = [R.random_spec(rng) for _ in range(count)]
        self.specs, self.texts = [p[0] for p in pairs], [p[1] for p in pairs]
        self.encodings: list[torch.Tensor] = [None] * count  # type: ignore[list-item]
        self.covariance = CovarianceEstimator(text.width)
        order = sorted(range(count), key=lambda k: len(self.texts[k]))
        start = time.time()
        for n in range(0, count, 128):
            idx = order[n: n + 128]
            context, mask, _ = text.encode([self.texts[k] for k in idx])
            for row, k in enumerate(idx):
                self.encodings[k] = context[row, mask[row]].half()
            self.covariance.update(context[mask])  # every real token position
            if n % 2048 == 0:
                log(f"  encoded {n}/{count} captions ({time.time() - start:.0f}s)")
        self.empty = text.encode_plain([""])[0].half()
        self.objects = [object_tokens(text, spec, words) for spec, words in zip(self.specs, self.texts)]

    def batch(self, rng: random.Random, n: int, uncond: float, outline: bool = False):
        """``(latents, context, objects)`` of n random captions, images realised and rendered afresh; ``objects``:
        for the two-object captions kept, ``(rows, token masks (K, L), own masks (K, 32, 32), other's masks)``."""
        idx = [rng.randrange(len(self.specs)) for _ in range(n)]
        scenes = [R.realise(self.specs[k], rng, self.typical) for k in idx]
        draw = np.random.default_rng(rng.randrange(2**31))
        images, masks = zip(*(R.render(scene, draw, outline=outline) for scene in scenes))
        dropped = [rng.random() < uncond for _ in idx]
        context = pad([self.empty if d else self.encodings[k] for k, d in zip(idx, dropped)])
        rows, tokens, own, other = [], [], [], []
        for row, (k, d) in enumerate(zip(idx, dropped)):
            for n_obj, spans in enumerate(self.objects[k] if not d else ()):
                mask = torch.zeros(context.shape[1], dtype=torch.bool)
                mask[spans] = True
                rows.append(row)
                tokens.append(mask)
                own.append(torch.from_numpy(masks[row][n_obj]))
                other.append(torch.from_numpy(masks[row][1 - n_obj]))
        objects = (torch.tensor(rows), torch.stack(tokens), torch.stack(own), torch.stack(other)) if rows else None
        return fold(torch.from_numpy(np.stack(images))), context, objects


def object_tokens(text: Encoder, spec: R.Spec, caption: str) -> list[list[int]]:
    """For a two-object caption, each object's token positions: its shape word and the attribute words before it
    (its description); ``[]`` for one object."""
    if len(spec.things) != 2:
        return []
    words = caption.split()
    attributes = {*R.SIZES, "medium", *R.COLOURS, *R.TEXTURES}
    start = lambda j: len(text.tokenize(" ".join(words[:j]))[0]) - 1  # token position of word j (after start)
    out, after = [], 0
    for thing in spec.things:
        noun = words.index(thing[0], after)
        first = noun
        while first > 0 and words[first - 1] in attributes:
            first -= 1
        out.append(list(range(start(first), start(noun + 1))))
        after = noun + 1
    return out


def localisation_loss(maps: list[Tensor], objects) -> Tensor:
    """1 − the share of an object's words' attention that comes from its own pixels rather than the other
    object's, averaged over objects and cross-attention calls (each object's mask area-pooled to the call's grid).

    SD's object words are attended where their objects are (Hertz et al. 2022, Prompt-to-Prompt); the world model
    is taught that property, which Perfusion's composition of concepts relies on."""
    rows, tokens, own, other = objects
    losses = []
    for probs in maps:  # (B, pixels, tokens)
        side = int(round(probs.shape[1] ** 0.5))
        attended = (probs[rows] * tokens[:, None, : probs.shape[-1]]).sum(-1)  # (K, pixels)
        pool = lambda m: F.adaptive_avg_pool2d(m[:, None], side).flatten(1)
        inside, outside = (attended * pool(own)).sum(1), (attended * pool(other)).sum(1)
        losses.append(1 - inside / (inside + outside + 1e-6))
    return torch.cat(losses).mean()


def pad(rows: list[torch.Tensor]) -> torch.Tensor:
    length = max(r.shape[0] for r in rows)
    out = torch.zeros(len(rows), length, rows[0].shape[-1])
    for k, r in enumerate(rows):
        out[k, : r.shape[0]] = r.float()
    return out


def diffusion_loss(unet, latents, context, alphas_cumprod, g: torch.Generator, objects=None, localise: float = 0.0):
    """v-MSE (the x₀ error weighted by SNR + 1: layout at high noise keeps its share of the gradient), plus
    ``localise`` × :func:`localisation_loss` of ``objects``."""
    t = torch.randint(0, len(alphas_cumprod), (latents.shape[0],), generator=g)
    noise = torch.randn(latents.shape, generator=g)
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    localising = bool(localise) and objects is not None  # only then the softmax is written out, for its maps
    with cross_attention_maps(unet) if localising else contextlib.nullcontext() as maps:
        loss = (unet(noisy, t, context) - (a.sqrt() * noise - (1 - a).sqrt() * latents)).square().mean()
    return loss + localise * localisation_loss(maps, objects) if localising else loss


def train_unet(unet, captions: Captions, steps, batch, lr, warmup, ema_decay, seed, uncond, outline=False,
               log=print, checkpoint=None, tag="world", localise: float = 0.0):
    """AdamW with warm-up and cosine decay; returns the EMA copy of the weights."""
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    alphas = cosine_alphas_cumprod()
    opt = torch.optim.AdamW(unet.parameters(), lr, weight_decay=0.01)
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    start, recent = time.time(), []
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, step / warmup) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * step / steps)))
        latents, context, objects = captions.batch(rng, batch, uncond, outline)
        loss = diffusion_loss(unet, latents, context, alphas, g, objects, localise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in unet.state_dict().items():
                ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
        recent.append(float(loss.detach()))
        if step % 50 == 0 or step == steps:
            log(f"  {tag} step {step}/{steps} loss {np.mean(recent):.4f} ({time.time() - start:.0f}s)")
            recent = []
        if checkpoint and step % 200 == 0:
            checkpoint(ema, step)
    return ema


def world_path(cache: Path, settings: WorldSettings) -> Path:
    return Path(cache) / f"world-{settings.key()}.safetensors"


CLIP_FIELDS = ("version", "threads", "seed", "clip_width", "clip_layers", "clip_steps", "clip_batch", "clip_lr")


def text_encoder(cache: Path, settings: WorldSettings, log=print) -> Encoder:
    """The world's text encoder: the pretrained MiniLM, or the tiny CLIP, trained once and cached on its own
    (``<cache>/clip-<key>.safetensors``), so that worlds differing only after it share it."""
    if settings.encoder != "clip":
        return TextEncoder.pretrained()
    key = hashlib.sha256(json.dumps({f: getattr(settings, f) for f in CLIP_FIELDS}).encode()).hexdigest()[:10]
    path = Path(cache) / f"clip-{key}.safetensors"
    if path.is_file():  # the world model's initialisation does not depend on this branch: features are seeded
        log(f"[tinyworld] the tiny CLIP from {path}")
        clip = TinyCLIP(settings.clip_width, settings.clip_layers)
        clip.load_state_dict(load_file(str(path)))
        return clip.eval().requires_grad_(False)
    log(f"[tinyworld] training the tiny CLIP ({settings.clip_steps} steps × {settings.clip_batch})")
    clip = train_clip(settings.clip_width, settings.clip_layers, 4, 64, settings.clip_steps, settings.clip_batch,
                      settings.clip_lr, settings.seed + 4, log)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(path.with_suffix(".tmp")))
    path.with_suffix(".tmp").replace(path)
    return clip


def build_world(cache: Path, settings: WorldSettings = WorldSettings(), log=print) -> Path:
    """Train everything the benchmark needs from nothing and write the cache file; returns its path."""
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    path = world_path(cache, settings)
    timings = {}
    t0 = time.time()
    torch.manual_seed(settings.seed)
    text = text_encoder(cache, settings, log)
    timings["text_encoder_s"] = time.time() - t0
    t = time.time()
    log(f"[tinyworld] encoding {settings.captions} captions with {text.name}")
    captions = Captions(text, settings.captions, settings.seed, log, settings.typical)
    timings["captions_s"] = time.time() - t

    t = time.time()
    log(f"[tinyworld] training the feature net ({settings.feature_steps} steps)")
    features = train_features(settings.feature_steps, settings.seed + 1, log)
    timings["features_s"] = time.time() - t

    t = time.time()
    unet = TinyUNet(settings.c0, settings.c1, text.width, settings.heads)
    log(f"[tinyworld] training the world model: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M parameters, "
        f"{settings.steps} steps × {settings.batch}")
    partial = path.with_suffix(".partial.safetensors")

    def checkpoint(ema, step):
        save_file({f"base.{k}": v.contiguous() for k, v in ema.items()}, str(partial), metadata={"step": str(step)})

    base = train_unet(unet, captions, settings.steps, settings.batch, settings.lr, settings.warmup, settings.ema,
                      settings.seed + 2, settings.uncond, log=log, checkpoint=checkpoint, localise=settings.localise)
    timings["world_s"] = time.time() - t

    t = time.time()
    log(f"[tinyworld] fine-tuning a copy on outlined objects ({settings.finetune_steps} steps)")
    tuned = TinyUNet(settings.c0, settings.c1, text.width, settings.heads)
    tuned.load_state_dict(base)
    tuned_ema = train_unet(tuned, captions, settings.finetune_steps, settings.finetune_batch, settings.finetune_lr,
                           10, 0.98, settings.seed + 3, settings.uncond, outline=True, log=log, tag="finetune")
    timings["finetune_s"] = time.time() - t
    timings["total_s"] = time.time() - t0
    timings["cpu_s"] = time.process_time()

    tensors = {**{f"base.{k}": v for k, v in base.items()}, **{f"finetuned.{k}": v for k, v in tuned_ema.items()},
               **{f"features.{k}": v for k, v in features.state_dict().items()},
               "covariance": captions.covariance.covariance().float(), "empty": captions.empty.float()}
    if isinstance(text, TinyCLIP):
        tensors.update({f"clip.{k}": v for k, v in text.state_dict().items()})
    meta = {"settings": json.dumps(asdict(settings)), "timings": json.dumps(timings),
            "encodings": str(captions.covariance.count)}
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    tmp.replace(path)
    partial.unlink(missing_ok=True)
    log(f"[tinyworld] world cached in {path} ({timings['total_s'] / 60:.1f} min)")
    return path


@dataclass
class World:
    settings: WorldSettings
    text: Encoder
    base: TinyUNet
    finetuned: TinyUNet
    features: FeatureNet
    covariance: torch.Tensor
    timings: dict


def load_world(path: Path) -> World:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    settings = WorldSettings(**json.loads(meta["settings"]))

    def part(prefix, module):
        module.load_state_dict({k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")})
        return module.eval().requires_grad_(False)

    if settings.encoder == "clip":
        text = part("clip", TinyCLIP(settings.clip_width, settings.clip_layers))
    else:
        text = TextEncoder.pretrained()
    unet = lambda: TinyUNet(settings.c0, settings.c1, text.width, settings.heads)
    return World(settings, text, part("base", unet()), part("finetuned", unet()), part("features", FeatureNet()),
                 tensors["covariance"].double(), json.loads(meta.get("timings", "{}")))
