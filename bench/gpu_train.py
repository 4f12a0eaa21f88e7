"""Perfusion training on a GPU at full size, bf16 autocast; batch 1 and 4, with and without gradient checkpointing.
SD1.5 (default): UNet and CLIP of the random-weight checkpoint, 512×512 (64×64 latents). ``--family sdxl``: ComfyUI's
SDXL UNet and both text encoders at full size (random weights), 1024×1024 (128×128 latents). Prints seconds per
micro-step, peak VRAM and the projected time of 400 steps at effective batch 16 (grad_accum = 16 / batch).

Run where a CUDA GPU is present: .venv/bin/python bench/gpu_train.py [--family sdxl] (SDXL: with the v0.33 tree,
COMFYUI_PATH=.cache/comfyui-0.33.0/ComfyUI .cache/comfyui-0.33.0/venv/bin/python bench/gpu_train.py --family sdxl)
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.common import machine
from bench.train_support import Steps, load_full_sd15, load_full_sdxl


def main(family: str = "sd15", repeats: int = 5) -> None:
    if not torch.cuda.is_available():
        print("gpu_train: no CUDA device; nothing measured")
        return
    host, model, clip = load_full_sdxl() if family == "sdxl" else load_full_sd15()
    latent = 128 if family == "sdxl" else 64
    print(f"machine: {machine()}; host: {host.label}; family: {family}, {8 * latent} px")
    rows = []
    for batch in (1, 4):
        for checkpointing in (False, True):
            with torch.inference_mode(False):
                steps = Steps(host, model, clip, batch=batch, latent=latent, checkpointing=checkpointing)
                steps.perfusion()  # warm-up (allocator, kernels)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    steps.perfusion()
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - start)
            seconds = statistics.median(times)
            peak_gb = torch.cuda.max_memory_allocated() / 2**30
            projected = 400 * (16 // batch) * seconds
            rows.append((batch, checkpointing, seconds, peak_gb, projected))
            print(f"batch {batch} checkpointing {checkpointing!s:5}: {seconds:.3f} s/micro-step, "
                  f"peak VRAM {peak_gb:.2f} GB, 400 steps x eff. batch 16: {projected / 60:.1f} min")
            del steps
            torch.cuda.empty_cache()
    fastest = min(rows, key=lambda r: r[4])
    lightest = min(rows, key=lambda r: r[3])
    print(f"gpu_train fastest_400_steps_min={fastest[4] / 60:.2f} (batch {fastest[0]}) "
          f"lowest_peak_vram_gb={lightest[3]:.2f} (batch {lightest[0]}, checkpointing {lightest[1]})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=("sd15", "sdxl"), default="sd15")
    main(parser.parse_args().family)
