"""Shared set-up of the training benchmarks: the real ComfyUI host with a random-weight full SD1.5 checkpoint (or
ComfyUI's SDXL classes at full size), a Perfusion trainer on it, and a baseline step with the same trainable
parameter count."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

import perfusion_ops.training
from tools import comfy_host, sdxl_models, smoke_checkpoint

REPO = Path(__file__).resolve().parents[1]


def load_full_sd15():
    """(host, MODEL, CLIP) of the generated full SD1.5 checkpoint in the real host (CPU or the host's GPU)."""
    host = comfy_host.start_in_process(Path(tempfile.mkdtemp(prefix="perfusion-bench-")))
    name = host.layout.add_model("checkpoints", smoke_checkpoint.checkpoint_path("full"))
    host.refresh_models()
    with torch.inference_mode():
        model, clip = host.node("CheckpointLoaderSimple")().load_checkpoint(name)[:2]
    return host, model, clip


def load_full_sdxl():
    """(host, MODEL, CLIP) of ComfyUI's SDXL classes at full size with random weights (tools/sdxl_models.py), the
    UNet loaded onto the host's device."""
    host = comfy_host.start_in_process(Path(tempfile.mkdtemp(prefix="perfusion-bench-")))
    with torch.inference_mode():
        device = host.model_management.get_torch_device()
        model = sdxl_models.sdxl_model(sdxl_models.FULL_UNET, load_device=device)
        clip = sdxl_models.sdxl_clip(text_layers=None)
    return host, model, clip


class Steps:
    """One Perfusion optimizer step and one baseline step on identical inputs (call within inference_mode(False)).

    Baseline: textual inversion of the trigger embedding through the same differentiable CLIP, plus one learned
    bias vector added to every to_v output — the same parameter count as Perfusion (embedding + one o_V per
    layer) and the same UNet forward/backward, without the gated rank-1 edit (e⊥, gates, EMA, q = C⁻¹ i)."""

    def __init__(self, host, model, clip, batch: int, latent: int, checkpointing: bool = False):
        training, adapter = perfusion_ops.training, host.adapter
        self.training = training
        self.host = adapter.training_host.training_host(model, clip, adapter.clip_layer.clip_layer(clip),
                                                        checkpointing)
        settings = training.TrainSettings(steps=1, batch_size=batch, grad_accum=1)
        width = 2048 if self.host.MODEL_FAMILY == "sdxl" else 768
        self.trainer = training.Trainer(self.host, "hugsy", "teddy", torch.eye(width), settings)
        g = torch.Generator().manual_seed(0)
        device = self.host.device
        self.latents = torch.randn(batch, 4, latent, latent, generator=g).to(device)
        self.prompts = ["a photo of a hugsy"] * batch
        layers = self.host.layers
        self.embedding = torch.nn.Parameter(self.trainer.params.embedding.detach().clone())
        self.biases = {l: torch.nn.Parameter(torch.zeros(w, device=device)) for l, w in layers.items()}
        self.baseline_optimizer = torch.optim.AdamW([self.embedding, *self.biases.values()], weight_decay=0.0)
        self.baseline_forwards = {}
        for l in layers:
            k, v = self.host.project(l, "k"), self.host.project(l, "v")
            self.baseline_forwards[l, "k"] = k
            self.baseline_forwards[l, "v"] = lambda x, v=v, b=self.biases[l]: v(x) + b.to(x.dtype)

    def count(self) -> tuple[int, int]:
        """Trainable parameters: (Perfusion, baseline)."""
        perfusion = sum(p.numel() for p in self.trainer.params.parameters() if p.requires_grad)
        return perfusion, self.embedding.numel() + sum(b.numel() for b in self.biases.values())

    def draw(self, rng, n):
        return self.training.Sample(self.latents[:n], None, self.prompts[:n])

    def perfusion(self):
        with self.host.install(self.trainer.forwards()):
            return self.trainer.step(self.draw)

    def baseline(self):
        with self.host.install(self.baseline_forwards):
            noise = torch.randn_like(self.latents)
            t = torch.randint(0, 1000, (len(self.latents),), device=self.latents.device)
            context, _ = self.host.encode(self.prompts, "hugsy", self.embedding)
            noisy = self.training.add_noise(self.latents, noise, t, self.host.alphas_cumprod)
            loss = self.training.masked_noise_loss(self.host.predict_noise(noisy, t, context), noise, None)
            loss.backward()
            self.baseline_optimizer.step()
            self.baseline_optimizer.zero_grad(set_to_none=True)
            return float(loss.detach())
