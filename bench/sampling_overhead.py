"""Cost of Perfusion at sampling time: one KSampler step of the exact SD1.5 or SDXL UNet in the real ComfyUI host.

SD1.5 (default): the random-weight SD1.5 checkpoint (full UNet: 16 cross-attention layers), 32×32 latent. SDXL
(``--family sdxl``): ComfyUI's SDXL model built from SDXL's real configuration (70 cross-attention layers, 2.6 B
parameters, random weights, float32; tools/sdxl_models.py), 32×32 latent; its text encoders are shortened to 3
layers, which changes no timed work (the prompts are encoded before timing). CFG batch 2 (cond + uncond), Euler,
1 step. Variants: unpatched, J = 1 and J = 4 concepts applied (prompt holding every trigger word). Each round runs
every variant once, in turn (ComfyUI swaps the object patches on the shared model between them, outside the timed
call); the ratios are medians of per-round ratios of the process's CPU time (``time.process_time``, all threads),
which other processes on a shared machine disturb far less than wall time; wall-clock medians are printed too.
``apply_ms`` is the median wall time of one Apply node.

Run: .venv/bin/python bench/sampling_overhead.py [--family sdxl]   (after `bash tools/test.sh` set up the host)
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import machine, median_ratio, peak_rss_mb
from perfusion_ops.modules import cross_attention_layers
from tools import comfy_host, sdxl_models, smoke_checkpoint
from tools.factories import random_concept



def models(host, family: str):
    """(MODEL, CLIP, concept maker) of ``family``: the SD1.5 smoke checkpoint through ComfyUI's loader, or SDXL."""
    if family == "sdxl":
        if not sdxl_models.can_shorten_text_encoders():
            raise SystemExit(f"{host.label}: its CLIP cannot be built with short text encoders; run with "
                             "COMFYUI_PATH=.cache/comfyui-0.33.0/ComfyUI .cache/comfyui-0.33.0/venv/bin/python")
        model, clip = sdxl_models.sdxl_model(sdxl_models.FULL_UNET), sdxl_models.sdxl_clip()
        layers = cross_attention_layers(model.model.diffusion_model)

        def concept(seed, trigger):
            made = random_concept(seed=seed, trigger=trigger, layers=layers, width=2048)
            made.clip_layer = -2  # SDXL's default layer, as an SDXL concept records it
            return made
        return model, clip, concept
    name = host.layout.add_model("checkpoints", smoke_checkpoint.checkpoint_path("full"))
    host.refresh_models()
    model, clip = host.node("CheckpointLoaderSimple")().load_checkpoint(name)[:2]
    return model, clip, lambda seed, trigger: random_concept(seed=seed, trigger=trigger)


def main(family: str = "sd15", rounds: int = 6) -> None:
    host = comfy_host.start_in_process(Path(tempfile.mkdtemp(prefix="perfusion-bench-")))
    with torch.inference_mode():
        model, clip, make_concept = models(host, family)
        apply = host.node("PerfusionApply")()
        triggers = [f"concept{k}" for k in range(4)]
        concepts = [make_concept(k, t) for k, t in enumerate(triggers)]
        apply_times = []
        for _ in range(7):
            start = time.perf_counter()
            apply.apply(model, clip, concepts[0], 0.7, 0.15, "local")
            apply_times.append(1e3 * (time.perf_counter() - start))
        variants = {"plain": (model, clip)}
        for j in (1, 4):
            m, c = model, clip
            for concept in concepts[:j]:
                m, c = apply.apply(m, c, concept, 0.7, 0.15, "local")
            variants[f"J{j}"] = (m, c)
        latent = host.node("EmptyLatentImage")().generate(256, 256, 1)[0]
        encode = host.node("CLIPTextEncode")()

        def sampler(m, c):
            positive = encode.encode(c, "a photo of " + " and ".join(triggers) + " on a table")[0]
            negative = encode.encode(c, "blurry")[0]
            return lambda: host.nodes.common_ksampler(m, 0, 1, 7.0, "euler", "normal", positive, negative, latent)

        runs = {label: sampler(m, c) for label, (m, c) in variants.items()}
        seconds = {label: [] for label in runs}
        labels, wall = list(runs), {label: [] for label in runs}
        for round_ in range(rounds + 1):  # round 0 warms up; the order rotates so drift hits every variant
            for label in labels[round_ % 3:] + labels[:round_ % 3]:
                run = runs[label]
                host.model_management.load_models_gpu([variants[label][0]])  # patch swap, not timed
                start, cpu = time.perf_counter(), time.process_time()
                run()
                if round_:
                    seconds[label].append(time.process_time() - cpu)
                    wall[label].append(time.perf_counter() - start)
    print(f"machine: {machine()}; host: {host.label}; family: {family} ({len(concepts[0].layers)} cross-attention "
          "layers)")
    for label, s in seconds.items():
        print(f"{label:>6}: median {statistics.median(s):.3f} s CPU, {statistics.median(wall[label]):.3f} s wall "
              "per step (CFG batch 2, 32x32 latent)")
    print(f"peak_rss_mb={peak_rss_mb():.0f}")
    j1, j4 = (median_ratio(seconds, f"J{j}", "plain") for j in (1, 4))
    print(f"sampling_overhead J1={j1:.3f} J4={j4:.3f} apply_ms={statistics.median(apply_times):.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=("sd15", "sdxl"), default="sd15")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    main(args.family, args.rounds)
