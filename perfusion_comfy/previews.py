"""Preview renders while training: a loss curve does not say when a concept is learned, so every ``preview_every``
steps Train renders its preview prompts with the concept as trained so far (the paper, too, picks its checkpoint from
rendered samples). The renders go to the node's live preview and the front-end panel, and the last ones become
``<save_name>.png`` beside the concept (ComfyUI's model library shows it) when training finishes.
"""
from __future__ import annotations

import base64
import io

import torch
from PIL import Image

import comfy.model_management

from perfusion_ops.sampling import ddim_sample
from perfusion_ops.words import whole_words
from .tokenizer import NOT_AFTER

PLACEHOLDER = "<trigger>"
DEFAULT_PROMPTS = f"a photo of a {PLACEHOLDER}\na {PLACEHOLDER} on a sandy beach at sunset"
MAX_PROMPTS = 4
SAMPLER_STEPS = 10  # DDIM steps: enough to judge likeness, a small cost next to the training steps between previews
GUIDANCE = 7.0  # classifier-free guidance against the empty prompt, as ComfyUI's KSampler defaults to (7-8)
THUMBNAIL = 256  # px: the renders as the front-end panel shows them


def parse_prompts(text: str, trigger: str) -> list[str]:
    """The prompts of the ``preview_prompts`` widget: one per non-empty line, ``<trigger>`` standing for the trigger
    word, which every prompt must name (a preview shows the concept); at most ``MAX_PROMPTS``. The trigger is made a
    word of its own ("hugsy," → "hugsy ,"), as the training host's word split finds it."""
    word = whole_words([trigger], NOT_AFTER)
    prompts = []
    for line in filter(str.strip, text.splitlines()):
        spaced, found = word.subn(r" \1 ", line.replace(PLACEHOLDER, trigger))
        if not found:
            raise ValueError(f"preview prompt '{line.strip()}' does not name the concept: write {PLACEHOLDER} (or "
                             f"'{trigger}') where it goes")
        prompts.append(" ".join(spaced.split()))
    if not prompts:
        raise ValueError(f"preview_prompts is empty: give one prompt per line (e.g. 'a photo of a {PLACEHOLDER}'), "
                         "or set preview_every to 0")
    if len(prompts) > MAX_PROMPTS:
        raise ValueError(f"{len(prompts)} preview prompts: at most {MAX_PROMPTS} (each costs a render)")
    return prompts


class Previews:
    """Renders ``prompts`` with the concept as trained so far, through the training host's own UNet and the
    checkpoint's VAE, at the training resolution (``latent_shape``) and from the same noise each time (from ``seed``),
    so a series shows the concept forming, not the seed changing. The noise has its own generator, the render keeps
    no gradients, and training's edit comes back after it: previews never change what a run trains.

    ComfyUI loads the VAE for each decode; between two training steps the memory of a step's activations is free,
    which holds a small decode without unloading the UNet being trained."""

    def __init__(self, host, vae, trigger: str, prompts: list[str], latent_shape, seed: int):
        self.host, self.vae, self.trigger, self.prompts = host, vae, trigger, prompts
        self.noise = torch.randn((len(prompts), *latent_shape), generator=torch.Generator().manual_seed(seed))
        self.uncond = host.encode_plain([""])
        self.uncond_pooled = host.pooled_output()  # SDXL's y; None for SD1.x
        self.images: list[Image.Image] = []  # the latest renders

    def render(self, trainer) -> list[Image.Image]:
        """Render at ``trainer``'s current step (inside ``run``); also kept as ``images``."""
        host = self.host

        with trainer.applied():
            context, _ = host.encode(self.prompts, self.trigger, trainer.params.embedding)
            pooled = host.pooled_output()
            # SDXL: y for ddim_sample's batch, the uncond rows first, then the prompts' (as it joins the contexts)
            if pooled is not None:
                pooled = torch.cat([self.uncond_pooled.expand(len(pooled), -1).to(pooled), pooled])

            def predict(noisy, timesteps, both):  # Cancel answered between sampler steps too
                comfy.model_management.throw_exception_if_processing_interrupted()
                return host.predict_noise(noisy, timesteps, both, pooled)

            latents = ddim_sample(predict, host.alphas_cumprod, self.noise.to(host.device), context, self.uncond,
                                  SAMPLER_STEPS, GUIDANCE)
            # no_grad, not inference mode: the VAE works in place on its activations, which inference mode would make
            # inference tensors, and the training host's guard on in-place writes (2024 tree) refuses those
            pixels = self.vae.decode(host.model.model.process_latent_out(latents))
        pixels = pixels.reshape(-1, *pixels.shape[-3:]).clamp(0, 1).mul(255).round().to(torch.uint8).cpu().numpy()
        self.images = [Image.fromarray(p[..., :3]) for p in pixels]
        return self.images


def side_by_side(images: list[Image.Image], height: int | None = None) -> Image.Image:
    """``images`` in one row, each scaled to ``height`` (default: the first one's)."""
    height = height or images[0].height
    scaled = [im.resize((max(1, round(im.width * height / im.height)), height), Image.LANCZOS)
              if im.height != height else im for im in images]
    row = Image.new("RGB", (sum(im.width for im in scaled), height))
    x = 0
    for im in scaled:
        row.paste(im, (x, 0))
        x += im.width
    return row


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def data_urls(images: list[Image.Image]) -> list[str]:
    """The renders as small JPEG data URLs, for the ``perfusion.preview`` message to the front-end panel."""
    urls = []
    for image in images:
        thumb = image.copy()
        thumb.thumbnail((THUMBNAIL, THUMBNAIL))
        out = io.BytesIO()
        thumb.save(out, format="JPEG", quality=85)
        urls.append("data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii"))
    return urls
