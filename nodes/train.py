"""Perfusion Train Concept: in-graph training on the user's checkpoint, with a progress bar and a loss chart."""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

import comfy.model_management
import comfy.utils
import folder_paths

from ..perfusion_ops.captions import caption_digest, caption_source
from ..perfusion_ops.concept_file import save_concept
from ..perfusion_ops.covariance import cached_covariance, estimate_covariance, ridge_inverse
from ..perfusion_ops.files import safe_file_name
from ..perfusion_ops.training import Sample, TrainSettings, Trainer, normalise_masks, prompts_for, run
from .folders import caption_files, caption_path, save_dir
from .clip_layer import clip_layer
from .inference import CATEGORY, CONCEPT
from .loss_chart import loss_chart, loss_chart_image
from .tokenizer import check_trigger
from .training_host import ComfyTrainingHost

log = logging.getLogger("perfusion")
CHECKPOINT = "-checkpoint"  # <save_name>-checkpoint.safetensors holds the last good state while training runs


def square_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Centre-crop ``(B, H, W, C)`` images to a square and resize to ``size`` (channels-first out)."""
    _, h, w, _ = images.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = images[:, top:top + side, left:left + side].movedim(-1, 1)
    return F.interpolate(square, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def prepare_data(vae, model, images, masks, resolution: int, flip: bool):
    """VAE latents of every image (and its mirror), computed once, and the matching loss weights or None."""
    if images is None or images.shape[0] == 0:
        raise ValueError("no training images: connect an IMAGE batch with at least one photo")
    if resolution % 64:
        raise ValueError(f"resolution must be a multiple of 64, got {resolution}")
    if not torch.isfinite(images).all():
        raise ValueError("the training images contain NaN or infinite values")
    pixels = square_crop(images.float(), resolution)
    if masks is not None:
        masks = masks if masks.ndim == 3 else masks.reshape(-1, *masks.shape[-2:])
        if masks.shape[-2:] != images.shape[1:3]:
            raise ValueError(f"mask size {tuple(masks.shape[-2:])} differs from image size {tuple(images.shape[1:3])}")
        if masks.shape[0] not in (1, images.shape[0]):
            raise ValueError(f"got {masks.shape[0]} masks for {images.shape[0]} images (give one, or one per image)")
        masks = square_crop(masks.expand(images.shape[0], -1, -1)[..., None].float(), resolution)
    if flip:
        pixels = torch.cat([pixels, pixels.flip(-1)])
        masks = None if masks is None else torch.cat([masks, masks.flip(-1)])
    latents = model.model.process_latent_in(vae.encode(pixels.movedim(1, -1)[..., :3]))
    if masks is None:
        return latents, None
    weights = normalise_masks(F.interpolate(masks, size=latents.shape[-2:], mode="area"))
    return latents, weights


def covariance_captions_for(captions_name: str, count: int) -> list[str]:
    """The captions C is estimated from: the first ``count`` of the caption file ``captions_name`` (a combo value
    of the captions folder), or ``count`` built-in ones for ``""``. Read before training, so a bad file fails first."""
    return caption_source(caption_path(captions_name), count=count, name=captions_name)


def inverse_covariance(host: ComfyTrainingHost, captions: list[str]):
    """C⁻¹ for this CLIP: estimated once from ``captions``, cached by what it was estimated from (the encoder's
    weight fingerprint, its CLIP layer and the digest of the captions)."""
    cache = os.path.join(folder_paths.models_dir, "perfusion_cache")
    key = f"{host.encoder_fingerprint()}-l{host.clip_layer}-c{caption_digest(captions)}"
    pbar = comfy.utils.ProgressBar(len(captions))

    def compute():
        return estimate_covariance(host.encode_plain, captions, batch_size=32,
                                   progress=lambda done, total: (pbar.update_absolute(done, total),
                                                                 log.info("[perfusion] covariance %d/%d", done, total)))

    return ridge_inverse(cached_covariance(cache, key, compute, log=log.warning)).float()


class PerfusionTrainConcept:
    DESCRIPTION = (
        "Trains a Perfusion concept from a few photos on this checkpoint: the trigger word's embedding and the "
        "V targets of every cross-attention layer, with keys locked to the superclass (paper Sec. 4.4). Saves one "
        "small file to models/perfusion and outputs the concept for Perfusion Apply."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (CONCEPT, "IMAGE")
    RETURN_NAMES = ("concept", "loss_curve")
    OUTPUT_TOOLTIPS = ("The trained concept (also saved to models/perfusion/<save_name>.safetensors).",
                       "A chart of the training loss per step.")
    OUTPUT_NODE = True
    FUNCTION = "train"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The SD1.x checkpoint to train on (its UNet stays frozen)."}),
                "clip": ("CLIP", {"tooltip": "The checkpoint's CLIP (frozen; clip skip is recorded in the concept)."}),
                "vae": ("VAE", {"tooltip": "Encodes the photos to latents once, before training."}),
                "images": ("IMAGE", {"tooltip": "1 or more photos of the concept (centre-cropped to a square)."}),
                "trigger_word": ("STRING", {"default": "hugsy", "tooltip":
                                 "A new, rare word that will mean your concept in prompts (one word)."}),
                "superclass": ("STRING", {"default": "teddy", "tooltip":
                               "What it is, in one common word ('cat', 'teddy', 'mug'); keys are locked to it."}),
                "steps": ("INT", {"default": 400, "min": 1, "max": 10000, "tooltip":
                          "Optimizer steps (paper: about 210 on average, 400 at most)."}),
                "batch_size": ("INT", {"default": 4, "min": 1, "max": 64, "tooltip": "Images per forward pass."}),
                "grad_accum": ("INT", {"default": 4, "min": 1, "max": 64, "tooltip":
                               "Forward passes per step; effective batch = batch_size × grad_accum (paper: 16)."}),
                "lr_values": ("FLOAT", {"default": 0.03, "min": 1e-5, "max": 1.0, "step": 0.001,
                              "tooltip": "Learning rate of the V target outputs (paper: 0.03)."}),
                "lr_embedding": ("FLOAT", {"default": 0.006, "min": 1e-5, "max": 1.0, "step": 0.001,
                                 "tooltip": "Learning rate of the trigger embedding (paper: 0.006)."}),
                "train_beta": ("FLOAT", {"default": 0.75, "min": -1.0, "max": 2.0, "step": 0.01,
                               "tooltip": "Gate bias during training (paper: 0.75)."}),
                "train_tau": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 10.0, "step": 0.01,
                              "tooltip": "Gate temperature during training (paper: 0.1)."}),
                "flip": ("BOOLEAN", {"default": True, "tooltip":
                         "Mirror images half of the time; turn off for asymmetric objects (text, logos)."}),
                "resolution": ("INT", {"default": 512, "min": 64, "max": 1024, "step": 64,
                               "tooltip": "Training resolution in pixels (SD1.5: 512)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": "Seed of prompts, noise, timesteps."}),
                "save_name": ("STRING", {"default": "hugsy", "tooltip":
                              "File name in models/perfusion (no folders). An earlier file is replaced only when "
                              "training finishes."}),
                "checkpoint_every": ("INT", {"default": 0, "min": 0, "max": 10000, "tooltip":
                                     "Also save <save_name>-checkpoint every N steps (0: off); kept on interrupt."}),
            },
            "optional": {
                "masks": ("MASK", {"tooltip": "Optional soft masks of the concept (one, or one per image); the "
                                   "loss is weighted by mask / max(mask)."}),
                "gradient_checkpointing": ("BOOLEAN", {"default": False, "tooltip":
                                           "Recompute the UNet res blocks in backward: less VRAM, slower steps."}),
                "trained_k": ("BOOLEAN", {"default": False, "tooltip":
                              "Ablation: learn the K targets too instead of locking them to the superclass."}),
                "covariance_captions": ("INT", {"default": 20000, "min": 16, "max": 200000, "tooltip":
                                        "Captions to estimate the text covariance C from (once per CLIP; cached)."}),
                # optional, with "" first: API prompts that pass captions_file="" still validate
                "captions_file": (caption_files(), {"default": "", "tooltip":
                                  "Captions for C: a .txt file (one caption per line) from models/perfusion/captions; "
                                  "empty: the built-in corpus."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def train(self, model, clip, vae, images, trigger_word, superclass, steps, batch_size, grad_accum, lr_values,
              lr_embedding, train_beta, train_tau, flip, resolution, seed, save_name, checkpoint_every,
              masks=None, gradient_checkpointing=False, trained_k=False, covariance_captions=20000,
              captions_file="", unique_id=None):
        trigger = check_trigger(trigger_word)
        if not superclass.strip():
            raise ValueError("the superclass word is empty: say what the concept is ('cat', 'teddy', ...)")
        # every file this run may write must fit the folder's file system: checked now, not after training
        variants = ("", CHECKPOINT) if checkpoint_every else ("",)
        file_name = safe_file_name(save_name, folder=save_dir(), variants=variants)
        settings = TrainSettings(steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr_values=lr_values,
                                 lr_embedding=lr_embedding, train_beta=train_beta, train_tau=train_tau,
                                 trained_k=trained_k, seed=seed).check()
        captions = covariance_captions_for(captions_file, covariance_captions)
        layer = clip_layer(clip)
        latents, weights = prepare_data(vae, model, images, masks, resolution, flip)
        with torch.inference_mode(False):
            host = ComfyTrainingHost(model, clip, layer, gradient_checkpointing)
            inverse = inverse_covariance(host, captions).to(host.device)
            fields = {"encoder_fingerprint": host.encoder_fingerprint(), "clip_layer": layer,
                      "info": {"steps": str(steps), "images": str(images.shape[0]), "resolution": str(resolution)}}
            trainer = Trainer(host, trigger, superclass.strip(), inverse, settings, fields)
            latents = latents.detach().clone().to(host.device)
            weights = None if weights is None else weights.detach().clone().to(host.device)

            def draw(rng, n):
                index = [rng.randrange(latents.shape[0]) for _ in range(n)]
                return Sample(latents[index], None if weights is None else weights[index], prompts_for(trigger, rng, n))

            progress = TrainingProgress(steps, unique_id, checkpoint_every, trainer, file_name)
            result = run(trainer, draw, on_step=progress)
        path = save_concept(result.concept, os.path.join(save_dir(), file_name))
        progress.finish()
        log.info("[perfusion] saved %s (%.1f KB)", path, path.stat().st_size / 1024)
        return {"ui": {"text": [f"saved {path.name}"]}, "result": (result.concept, loss_chart(result.losses))}


class TrainingProgress:
    """Per-step callback: progress bar (and ComfyUI's interrupt), live loss to the front end, checkpoints."""

    def __init__(self, steps, node_id, every, trainer, file_name):
        self.bar = comfy.utils.ProgressBar(steps)
        self.steps, self.node_id, self.every, self.trainer = steps, node_id, every, trainer
        self.losses: list[float] = []
        self.preview_every = max(1, steps // 25)
        stem = file_name[: -len(".safetensors")]
        self.checkpoint = os.path.join(save_dir(), f"{stem}{CHECKPOINT}.safetensors") if every else None

    def __call__(self, step: int, loss: float) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        self.losses.append(loss)
        preview = None
        if step % self.preview_every == 0 or step == self.steps:  # the loss chart as the node's live preview
            preview = ("JPEG", loss_chart_image(self.losses), 512)
        self.bar.update_absolute(step, self.steps, preview)
        send("perfusion.train", {"node": self.node_id, "step": step, "steps": self.steps, "loss": loss})
        if self.checkpoint and step % self.every == 0:
            save_concept(self.trainer.concept(), self.checkpoint)

    def finish(self) -> None:
        if self.checkpoint and os.path.exists(self.checkpoint):
            os.remove(self.checkpoint)  # the final file supersedes it


def send(event: str, data: dict) -> None:
    """A message to the browser, when a server runs (not in headless in-process use)."""
    try:
        from server import PromptServer
    except ImportError:
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is not None:
        instance.send_sync(event, data)
