"""Perfusion Train Concept: in-graph training on the user's checkpoint, with a progress bar, a loss chart and preview
renders; it resumes from its checkpoints, and takes photos as batches or as lists of any sizes."""
from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import replace

import torch
import torch.nn.functional as F

import comfy.model_management
import comfy.utils
import folder_paths

from perfusion_ops.captions import caption_digest, caption_source
from perfusion_ops.concept import ConceptError
from perfusion_ops.concept_file import load_training_state, save_concept
from perfusion_ops.covariance import cached_covariance, estimate_covariance, ridge_inverse
from perfusion_ops.envelope import MAX_STEPS
from perfusion_ops.files import atomic_write_bytes, safe_file_name
from perfusion_ops.gate_choice import caption_sample, choose_gate
from perfusion_ops.settings import BETA, PAPER_GATES, TAU
from perfusion_ops.training import Sample, TrainSettings, Trainer, normalise_masks, prompts_for, run
from .folders import FOLDER, caption_files, caption_path, listed_path, save_dir
from .clip_layer import clip_layer
from .inference import CATEGORY, CONCEPT
from .loss_chart import live_preview, loss_chart
from .previews import (DEFAULT_PROMPTS, MAX_PROMPTS, PLACEHOLDER, Previews, data_urls, parse_prompts, png_bytes,
                       side_by_side)
from .tokenizer import check_trigger
from .training_host import ComfyTrainingHost, training_host

log = logging.getLogger("perfusion")
CHECKPOINT = "-checkpoint"  # <save_name>-checkpoint.safetensors holds the last good state while training runs


def square_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Centre-crop ``(B, H, W, C)`` images to a square and resize to ``size`` (channels-first out)."""
    _, h, w, _ = images.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = images[:, top:top + side, left:left + side].movedim(-1, 1)
    return F.interpolate(square, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def prepare_data(vae, model, images: list[torch.Tensor], masks: list[torch.Tensor] | None, resolution: int,
                 flip: bool, seed: int):
    """VAE latents of every photo (and its mirror), computed once, the matching loss weights or None, and a line
    saying what was used.

    ``images`` is a list of ``(B, H, W, C)`` batches of any sizes (ComfyUI's list outputs; a batch alone is a list of
    one); each photo is centre-cropped to a square and resized to ``resolution``, as SD1.5 trains on squares (buckets
    of other aspect ratios would need batches of one shape each). ``masks``, if given, holds one entry for every batch
    or one per batch: one mask, or one per photo, of its photos' size. Where the host's VAE samples its latent
    distribution (the 2024 tree; later ones take its mean), it samples from ``seed`` (the global generators are left
    as they were), so one seed gives one run, resumed or not."""
    if not sum(batch.shape[0] for batch in images):
        raise ValueError("no training images: connect an IMAGE batch or list with at least one photo")
    if resolution % 64:
        raise ValueError(f"resolution must be a multiple of 64, got {resolution}")
    if not all(bool(torch.isfinite(batch).all()) for batch in images):
        raise ValueError("the training images contain NaN or infinite values")
    if masks is not None and len(masks) not in (1, len(images)):
        raise ValueError(f"got {len(masks)} mask inputs for {len(images)} image batches (give one, or one per batch)")
    pixels = torch.cat([square_crop(batch.float(), resolution) for batch in images])
    if masks is not None:
        masks = torch.cat([square_crop(_masks_for(masks[k % len(masks)], batch), resolution)
                           for k, batch in enumerate(images)])
    if flip:
        pixels = torch.cat([pixels, pixels.flip(-1)])
        masks = None if masks is None else torch.cat([masks, masks.flip(-1)])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        latents = model.model.process_latent_in(vae.encode(pixels.movedim(1, -1)[..., :3]))
    sizes = Counter(f"{batch.shape[2]}×{batch.shape[1]}" for batch in images for _ in range(batch.shape[0]))
    count = sum(sizes.values())
    listed = ", ".join(f"{n} of {size}" for size, n in sizes.items())
    used = (f"training on {count} photo{'s' * (count > 1)} ({listed}) "
            f"from {len(images)} input batch{'es' if len(images) > 1 else ''}, each centre-cropped to a square and "
            f"resized to {resolution}×{resolution}{', with mirrored copies' if flip else ''}: {len(latents)} latents")
    if masks is None:
        return latents, None, used
    weights = normalise_masks(F.interpolate(masks, size=latents.shape[-2:], mode="area"))
    return latents, weights, used


def _masks_for(masks: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """``(B, H, W, 1)`` masks for the batch ``images`` from one mask or one per photo, of the photos' size."""
    masks = masks if masks.ndim == 3 else masks.reshape(-1, *masks.shape[-2:])
    if masks.shape[-2:] != images.shape[1:3]:
        raise ValueError(f"mask size {tuple(masks.shape[-2:])} differs from image size {tuple(images.shape[1:3])}")
    if masks.shape[0] not in (1, images.shape[0]):
        raise ValueError(f"got {masks.shape[0]} masks for {images.shape[0]} images (give one, or one per image)")
    return masks.expand(images.shape[0], -1, -1)[..., None].float()


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
                                                                 log.info("[perfusion] covariance %d/%d",
                                                                          done, total)))

    return ridge_inverse(cached_covariance(cache, key, compute, log=log.warning)).float()


def resume_files() -> list[str]:
    """The resume combo: ``""`` (train from the start, the default) and every file in the perfusion folders."""
    return ["", *folder_paths.get_filename_list(FOLDER)]


def resume_source(name: str):
    """``(concept, training state or None)`` of the resume combo value ``name``, read before any work; None for
    ``""``. Refuses a name the combo does not list."""
    path = listed_path(FOLDER, name, f"'{name}' is not in models/perfusion: pick a concept or checkpoint file from "
                                     "the list (empty: train from the start)")
    if path is None:
        return None
    concept, state = load_training_state(path)
    if state is None and os.path.splitext(name)[0].endswith(CHECKPOINT):
        raise ConceptError(f"'{name}' is a checkpoint of an earlier comfyui-perfusion, without the training state "
                           "resuming needs: resume from a finished concept, or train from the start")
    return concept, state


def resume(trainer: Trainer, name: str, source) -> None:
    """Continue ``trainer`` from the file ``name`` (read by :func:`resume_source`): exactly from a checkpoint's
    training state, or from a finished concept's step count (its ``info.steps``) with a fresh optimizer."""
    concept, state = source
    try:
        done = int(concept.info.get("steps", ""))
    except ValueError:
        done = None
    try:
        trainer.resume(concept, state, done)
    except ConceptError as err:
        raise ConceptError(f"cannot resume from '{name}': {err}") from None
    how = "optimizer state and loss curve restored" if state else "a finished concept: the optimizer starts afresh"
    log.info("[perfusion] resuming from %s at step %d of %d (%s)", name, trainer.done, trainer.settings.steps, how)


def one(name: str, value):
    """The one value of an input that ComfyUI passed as a list (INPUT_IS_LIST); a plain value (a direct call) as is."""
    if not isinstance(value, list):
        return value
    if len(value) != 1:
        raise ValueError(f"input '{name}' got {len(value)} values: Train makes one concept per run, so only its "
                         "images and masks may be lists")
    return value[0]


def batches(value) -> list[torch.Tensor]:
    """The batches of an IMAGE or MASK input passed as a list (INPUT_IS_LIST), or of one tensor (a direct call)."""
    return [batch for batch in (value if isinstance(value, list) else [value]) if batch is not None]


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
    # photos may come as a list of batches of any sizes (ComfyUI's list outputs, e.g. a folder loader); with this
    # flag every input arrives as a list, and all but images and masks must hold one value
    INPUT_IS_LIST = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The SD1.x checkpoint to train on (its UNet stays frozen)."}),
                "clip": ("CLIP", {"tooltip": "The checkpoint's CLIP (frozen; clip skip is recorded in the concept)."}),
                "vae": ("VAE", {"tooltip": "Encodes the photos to latents once, before training."}),
                "images": ("IMAGE", {"tooltip": "1 or more photos of the concept: a batch, or a list of any sizes "
                                     "(each centre-cropped to a square)."}),
                "trigger_word": ("STRING", {"default": "hugsy", "tooltip":
                                 "A new, rare word that will mean your concept in prompts (one word)."}),
                "superclass": ("STRING", {"default": "teddy", "tooltip":
                               "What it is, in one common word ('cat', 'teddy', 'mug'); keys are locked to it."}),
                "steps": ("INT", {"default": 400, "min": 1, "max": MAX_STEPS, "tooltip":
                          "Optimizer steps in all (paper: about 210 on average, 400 at most); a resumed run trains "
                          "until this many."}),
                "batch_size": ("INT", {"default": 4, "min": 1, "max": 64, "tooltip": "Images per forward pass."}),
                "grad_accum": ("INT", {"default": 4, "min": 1, "max": 64, "tooltip":
                               "Forward passes per step; effective batch = batch_size × grad_accum (paper: 16)."}),
                "lr_values": ("FLOAT", {"default": 0.03, "min": 1e-5, "max": 1.0, "step": 0.001,
                              "tooltip": "Learning rate of the V target outputs (paper: 0.03)."}),
                "lr_embedding": ("FLOAT", {"default": 0.006, "min": 1e-5, "max": 1.0, "step": 0.001,
                                 "tooltip": "Learning rate of the trigger embedding (paper: 0.006)."}),
                "train_beta": BETA.widget(PAPER_GATES["train"][0], "Gate bias during training (paper: 0.75)."),
                "train_tau": TAU.widget(PAPER_GATES["train"][1], "Gate temperature during training (paper: 0.1)."),
                "flip": ("BOOLEAN", {"default": True, "tooltip":
                         "Mirror images half of the time; turn off for asymmetric objects (text, logos)."}),
                "resolution": ("INT", {"default": 512, "min": 64, "max": 1024, "step": 64,
                               "tooltip": "Training resolution in pixels (SD1.5: 512); previews render at it too."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip":
                         "Seed of prompts, noise, timesteps, and of the previews' noise."}),
                "save_name": ("STRING", {"default": "hugsy", "tooltip":
                              "File name in models/perfusion (no folders). An earlier file is replaced only when "
                              "training finishes."}),
                "checkpoint_every": ("INT", {"default": 0, "min": 0, "max": MAX_STEPS, "tooltip":
                                     "Also save <save_name>-checkpoint every N steps (0: off); kept on interrupt, "
                                     "and resume_from continues it exactly."}),
            },
            "optional": {
                "masks": ("MASK", {"tooltip": "Optional soft masks of the concept (one, or one per image); the "
                                   "loss is weighted by mask / max(mask)."}),
                "gradient_checkpointing": ("BOOLEAN", {"default": True, "tooltip":
                                           "Recompute the UNet's res blocks, attention and feed-forward layers in "
                                           "backward (same gradients): at SD1.5 512 px a step keeps 38% less "
                                           "activation memory for 11% more time (bench/checkpointing.py, CPU), "
                                           "which batch_size 4 needs on a 12 GB card. Turn off on large cards."}),
                "trained_k": ("BOOLEAN", {"default": False, "tooltip":
                              "Ablation: learn the K targets too instead of locking them to the superclass."}),
                "covariance_captions": ("INT", {"default": 20000, "min": 16, "max": 200000, "tooltip":
                                        "Captions to estimate the text covariance C from (once per CLIP; cached)."}),
                # optional, with "" first: API prompts that pass captions_file="" still validate
                "captions_file": (caption_files(), {"default": "", "tooltip":
                                  "Captions for C: a .txt file (one caption per line) from models/perfusion/captions; "
                                  "empty: the built-in corpus."}),
                "preview_every": ("INT", {"default": 50, "min": 0, "max": MAX_STEPS, "tooltip":
                                  "Render the preview prompts with the concept so far every N steps and at the end "
                                  "(0: off): shown on the node; the last ones are saved as <save_name>.png."}),
                "preview_prompts": ("STRING", {"default": DEFAULT_PROMPTS, "multiline": True, "tooltip":
                                    f"One prompt per line (at most {MAX_PROMPTS}); {PLACEHOLDER} stands for the "
                                    "trigger word. Rendered at the training resolution, with the seed's noise."}),
                "resume_from": (resume_files(), {"default": "", "tooltip":
                                "Continue training a concept of the same trigger word and superclass: a "
                                "<name>-checkpoint file exactly where it stopped (optimizer state, steps, loss "
                                "curve), a finished concept with a fresh optimizer. Empty: from the start."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def train(self, images, masks=None, **inputs):
        """ComfyUI's entry point (INPUT_IS_LIST): every input comes as a list; see :meth:`run` for the rest."""
        settings = {name: one(name, value) for name, value in inputs.items()}
        return self.run(batches(images), None if masks is None else batches(masks), **settings)

    def run(self, images, masks, model, clip, vae, trigger_word, superclass, steps, batch_size, grad_accum, lr_values,
            lr_embedding, train_beta, train_tau, flip, resolution, seed, save_name, checkpoint_every,
            gradient_checkpointing=True, trained_k=False, covariance_captions=20000, captions_file="",
            preview_every=50, preview_prompts=DEFAULT_PROMPTS, resume_from="", unique_id=None):
        """Train on the list of photo batches ``images`` (and ``masks``, see :func:`prepare_data`)."""
        trigger = check_trigger(trigger_word)
        if not superclass.strip():
            raise ValueError("the superclass word is empty: say what the concept is ('cat', 'teddy', ...)")
        # every file this run may write must fit the folder's file system: checked now, not after training (the
        # preview image's name, <stem>.png, is shorter than the concept's)
        variants = ("", CHECKPOINT) if checkpoint_every else ("",)
        file_name = safe_file_name(save_name, folder=save_dir(), variants=variants)
        settings = TrainSettings(steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr_values=lr_values,
                                 lr_embedding=lr_embedding, train_beta=train_beta, train_tau=train_tau,
                                 trained_k=trained_k, seed=seed).check()
        prompts = parse_prompts(preview_prompts, trigger) if preview_every else None
        source = resume_source(resume_from)
        captions = covariance_captions_for(captions_file, covariance_captions)
        layer = clip_layer(clip)
        latents, weights, used = prepare_data(vae, model, images, masks, resolution, flip, seed)
        log.info("[perfusion] %s", used)
        with torch.inference_mode(False):
            host = training_host(model, clip, layer, gradient_checkpointing)
            inverse = inverse_covariance(host, captions).to(host.device)
            photos = sum(batch.shape[0] for batch in images)
            fields = {"encoder_fingerprint": host.encoder_fingerprint(), "clip_layer": layer,
                      "text_encoder": host.TEXT_ENCODER, "model_family": host.MODEL_FAMILY,
                      "info": {"steps": str(steps), "images": str(photos), "resolution": str(resolution)}}
            trainer = Trainer(host, trigger, superclass.strip(), inverse, settings, fields)
            if source is not None:
                resume(trainer, resume_from, source)
            latents = latents.detach().clone().to(host.device)
            weights = None if weights is None else weights.detach().clone().to(host.device)

            def draw(rng, n):
                index = [rng.randrange(latents.shape[0]) for _ in range(n)]
                return Sample(latents[index], None if weights is None else weights[index],
                              prompts_for(trigger, rng, n))

            previews = None if prompts is None else Previews(host, vae, trigger, prompts, latents.shape[1:], seed)
            progress = TrainingProgress(trainer, unique_id, checkpoint_every, file_name, previews, preview_every)
            result = run(trainer, draw, on_step=progress)
            concept = with_measured_gate(result.concept, host, captions)
        path = save_concept(concept, os.path.join(save_dir(), file_name))
        progress.finish()
        log.info("[perfusion] saved %s (%.1f KB)", path, path.stat().st_size / 1024)
        return {"ui": {"text": [f"saved {path.name}"]},
                "result": (concept, loss_chart(result.losses, trainer.first_logged))}


def with_measured_gate(concept, host: ComfyTrainingHost, captions: list[str]):
    """``concept`` with the gate measured for it (perfusion_ops/gate_choice.py), said in the console. A measurement
    that fails keeps the paper's gate: it must never cost the training it follows."""
    try:
        choice = choose_gate(concept, host.encode, host.encode_plain, caption_sample(captions))
    except Exception as err:  # noqa: BLE001 (any failure: the trained concept is saved all the same)
        log.warning("[perfusion] measuring the gate of '%s' failed (%s: %s): the paper's gate is kept",
                    concept.trigger, type(err).__name__, err)
        return replace(concept, info={**concept.info, "gate": "the paper's (not measured)"})
    log.info("[perfusion] %s", choice.describe(concept.trigger))
    return replace(concept, **choice.fields(), info={**concept.info, "gate": choice.summary})


class TrainingProgress:
    """Per-step callback: progress bar (and ComfyUI's interrupt), live loss and preview renders to the front end,
    checkpoints with the training state. :meth:`finish` after the concept is saved."""

    def __init__(self, trainer: Trainer, node_id, every: int, file_name: str, previews: Previews | None,
                 preview_every: int):
        self.trainer, self.node_id, self.every, self.previews, self.preview_every = (
            trainer, node_id, every, previews, preview_every)
        self.steps, self.start = trainer.settings.steps, trainer.done
        self.bar = comfy.utils.ProgressBar(self.steps)
        self.bar.update_absolute(self.start, self.steps)
        self.chart_every = max(1, self.steps // 25)
        stem = os.path.join(save_dir(), file_name[: -len(".safetensors")])
        self.checkpoint = f"{stem}{CHECKPOINT}.safetensors" if every else None
        self.image = f"{stem}.png"

    def __call__(self, step: int, loss: float) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        trainer = self.trainer
        message = {"node": self.node_id, "step": step, "steps": self.steps, "loss": loss}
        if step == self.start + 1:  # a run's first step: the losses before it (a resumed run) and where they start
            message |= {"earlier": trainer.losses[:-1], "first": trainer.first_logged}
        send("perfusion.train", message)
        rendered = self.previews is not None and (step % self.preview_every == 0 or step == self.steps)
        if rendered:
            try:
                renders = self.previews.render(trainer)
            except torch.cuda.OutOfMemoryError:  # a preview must never cost the training
                log.warning("[perfusion] out of memory rendering the previews at step %d: previews are off for the "
                            "rest of this run (no %s); training goes on", step, os.path.basename(self.image))
                self.previews, renders = None, None
            else:
                send("perfusion.preview", {"node": self.node_id, "step": step, "images": data_urls(renders)})
            if renders is None:  # outside the handler, whose traceback still holds the failed render's tensors
                comfy.model_management.soft_empty_cache()
        preview = None
        if rendered or step % self.chart_every == 0 or step == self.steps:  # the node's live preview
            renders = self.previews.images if self.previews is not None else []
            preview = ("JPEG", live_preview(trainer.losses, trainer.first_logged, renders), 512)
        self.bar.update_absolute(step, self.steps, preview)
        if self.checkpoint and step % self.every == 0:
            save_concept(trainer.concept(), self.checkpoint, torch.float32, trainer.state())

    def finish(self) -> None:
        """Once the concept is saved: the last renders as its preview image, and no checkpoint (the file supersedes
        it)."""
        if self.previews is not None and self.previews.images:
            atomic_write_bytes(self.image, png_bytes(side_by_side(self.previews.images)))
        if self.checkpoint and os.path.exists(self.checkpoint):
            os.remove(self.checkpoint)


def send(event: str, data: dict) -> None:
    """A message to the browser, when a server runs (not in headless in-process use)."""
    try:
        from server import PromptServer
    except ImportError:
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is not None:
        instance.send_sync(event, data)
