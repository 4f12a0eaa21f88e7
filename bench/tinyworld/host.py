"""The core's TrainingHost over the tiny world model, and inference with applied concepts.

Training goes through the very code the ComfyUI node uses (``perfusion_ops.training``: Trainer, run, the gated
edit of ``edit.JointEdit``); this module only supplies the host side, as ``perfusion_comfy/training_host.py`` does
for a ComfyUI MODEL/CLIP. Also here: the embedding-only baseline (textual inversion) and sampling with concepts.
"""
from __future__ import annotations

import contextlib
import random

import torch
import torch.nn.functional as F
from torch import Tensor

from perfusion_ops.concept import Concept
from perfusion_ops.edit import AppliedConcept, JointEdit
from perfusion_ops.modules import cross_attention_layers, forwards_installed
from perfusion_ops.training import Sample, TrainSettings, Trainer, masked_noise_loss, add_noise, prompts_for, run
from perfusion_ops.words import replace_words

from . import render as R
from .model import TinyUNet, cosine_alphas_cumprod, cross_attention_maps, ddim_sample, fold
from .text import Encoder


class TinyWorldHost:
    """TrainingHost (see ``perfusion_ops.training``) for a :class:`TinyUNet` and the world's text encoder;
    ``joint_gates``: applied concepts gate on their joint coordinates (``perfusion_ops.stack.ConceptStack``)."""

    def __init__(self, unet: TinyUNet, text: Encoder, alphas_cumprod: Tensor | None = None, joint_gates: bool = False):
        self.unet, self.text, self.joint_gates = unet.requires_grad_(False), text, joint_gates
        self.layers = cross_attention_layers(unet)
        self.alphas_cumprod = cosine_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod
        self.guidance = 3.0  # classifier-free guidance scale of :meth:`sample`
        self._modules = {(layer, path): getattr(unet.get_submodule(layer), f"to_{path}")
                         for layer in self.layers for path in "kv"}

    # -- text ----------------------------------------------------------------------------------------------
    def encode(self, prompts, trigger, vector):
        context, _, slots = self.text.encode(prompts, trigger, vector)
        if any(len(s) != 1 for s in slots):
            raise ValueError(f"every training prompt must contain the trigger word '{trigger}' once")
        return context, context[torch.arange(len(prompts)), torch.tensor([s[0] for s in slots])]

    def superclass(self, word):
        embedding = self.text.embed_word(word)
        with torch.no_grad():
            context, _, slots = self.text.encode([f"a photo of a {word}"], word, embedding)
        return embedding, context[0, slots[0][0]]

    # -- UNet ----------------------------------------------------------------------------------------------
    def project(self, layer, kv):
        module = self._modules[layer, kv]
        return lambda x: type(module).forward(module, x)

    def install(self, forwards):
        return forwards_installed(self._modules, forwards)

    def predict_noise(self, noisy, timesteps, context):
        return self.unet.predict_noise(noisy, timesteps, context, self.alphas_cumprod)

    # -- inference -----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def applied(self, applied: list[AppliedConcept]):
        """The joint edit (Eq. 4) of ``applied`` installed in every cross-attention K/V projection."""
        if not applied:
            yield None
            return
        edit = JointEdit(applied, joint_gates=self.joint_gates)
        with self.install({(l, p): edit.projection(l, p, self.project(l, p)) for l in self.layers for p in "kv"}):
            yield edit

    @torch.no_grad()
    def context(self, prompts: list[str], concepts: list[Concept] = ()) -> tuple[Tensor, dict]:
        """Encodings of ``prompts`` with each concept's trigger word mapped to its learned embedding."""
        context, _, slots = self.text.encode_many(prompts, {c.trigger: c.embedding.float() for c in concepts})
        return context, slots

    @torch.no_grad()
    def sample(self, prompts: list[str], seeds: list[int], applied: list[AppliedConcept] = (),
               embeddings: list[Concept] = (), steps: int = 12, guidance: float | None = None, batch: int = 64,
               global_lock: bool = False) -> Tensor:
        """Images for ``prompts`` (one per prompt, noise from its seed); ``applied`` concepts edit the UNet,
        ``embeddings`` only map trigger words (textual inversion). ``global_lock``: every ``to_k`` sees the prompt
        with each trigger word replaced by its superclass word (paper App. C), ``to_v`` the prompt itself."""
        concepts = [a.concept for a in applied] + list(embeddings)
        guidance = self.guidance if guidance is None else guidance
        uncond = self.text.encode_plain([""])
        images = []
        with self.applied(list(applied)):
            for start in range(0, len(prompts), batch):
                chunk = prompts[start: start + batch]
                context, _ = self.context(chunk, concepts)
                keys = self.context([superclass_prompt(p, concepts) for p in chunk])[0] if global_lock else None
                images.append(ddim_sample(self.unet, context, uncond, self.alphas_cumprod, steps, guidance,
                                          seeds=list(seeds[start: start + batch]), key_context=keys))
        return torch.cat(images)

    @contextlib.contextmanager
    def attention_by_side(self):
        """Records, at every cross-attention call, how much attention each token gets from the pixels of each half
        of the image: the conditional half's softmax probabilities averaged over heads and over the pixels of the
        left, right, top and bottom halves, (B, 4, tokens) per call. ``yield`` the list they are appended to."""
        records = []
        with cross_attention_maps(self.unet) as maps:
            yield records
        for probs in maps:
            half, side = probs.shape[0] // 2, int(round(probs.shape[1] ** 0.5))
            grid, m = probs[half:].view(half, side, side, -1), side // 2  # (B, y, x, tokens)
            records.append(torch.stack([grid[:, :, :m].mean((1, 2)), grid[:, :, m:].mean((1, 2)),
                                        grid[:, :m].mean((1, 2)), grid[:, m:].mean((1, 2))], 1))


def superclass_prompt(prompt: str, concepts: list[Concept]) -> str:
    """The prompt with every trigger word replaced by its concept's superclass word (one token each here)."""
    return replace_words(prompt, {c.trigger.lower(): c.superclass for c in concepts})


# -- concept data ------------------------------------------------------------------------------------------
def concept_images(thing: R.Thing, background: str, count: int, seed: int) -> tuple[Tensor, Tensor]:
    """``count`` renderings of a concept (positions/sizes jittered): images (N, 3, 32, 32) and masks (N, 32, 32)."""
    images, masks = R.render_batch([R.Scene((thing,), background)] * count, seed)
    return torch.from_numpy(images), torch.from_numpy(masks)


def drawer(images: Tensor, masks: Tensor | None, trigger: str, flip: bool = True, floor: float = 0.25):
    """``draw(rng, n)`` for the training loop: random renderings, flipped with p = 0.5, neutral prompts (App. G).

    Loss weights: the object mask (max-pooled to the latent grid), softened with a floor (the paper weights the
    loss by a soft zero-shot segmentation mask normalised by its maximum)."""
    latents = fold(images)
    weights = None
    if masks is not None:
        m = F.max_pool2d(masks[:, None].float(), 2)
        weights = floor + (1 - floor) * m

    def draw(rng: random.Random, n: int) -> Sample:
        idx = [rng.randrange(len(latents)) for _ in range(n)]
        flips = [flip and rng.random() < 0.5 for _ in idx]
        x = torch.stack([fold(images[k:k + 1].flip(-1))[0] if f else latents[k] for k, f in zip(idx, flips)])
        w = None if weights is None else torch.stack([weights[k].flip(-1) if f else weights[k]
                                                      for k, f in zip(idx, flips)])
        return Sample(x, w, prompts_for(trigger, rng, n))

    return draw


def train_concept(host: TinyWorldHost, trigger: str, superclass: str, inverse_covariance: Tensor, draw,
                  settings: TrainSettings) -> tuple[Concept, list[float]]:
    """Perfusion training through the core's Trainer and run (key-locked, or trained-K per ``settings``)."""
    fields = {"text_encoder": host.text.name, "model_family": "tinyworld"}
    trainer = Trainer(host, trigger, superclass, inverse_covariance, settings, fields)
    result = run(trainer, draw)
    return result.concept, result.losses


def train_embedding_only(host: TinyWorldHost, trigger: str, superclass: str, draw, steps: int, batch: int,
                         lr: float, seed: int) -> tuple[Concept, list[float]]:
    """Textual inversion: only the trigger's embedding learns (init: the superclass word's); no edit."""
    embedding, e_sup = host.superclass(superclass)
    vector = torch.nn.Parameter(embedding.clone())
    opt = torch.optim.AdamW([vector], lr, weight_decay=0.0)
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        sample = draw(rng, batch)
        noise = torch.randn(sample.latents.shape, generator=g)
        t = torch.randint(0, len(host.alphas_cumprod), (batch,), generator=g)
        context, _ = host.encode(sample.prompts, trigger, vector)
        noisy = add_noise(sample.latents, noise, t, host.alphas_cumprod)
        loss = masked_noise_loss(host.predict_noise(noisy, t, context), noise, sample.weights)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    concept = Concept(trigger, superclass, vector.detach().clone(), e_sup.clone(), e_sup.clone(), e_sup.clone(),
                      {l: torch.zeros(w) for l, w in host.layers.items()}, text_encoder=host.text.name)
    return concept, losses


