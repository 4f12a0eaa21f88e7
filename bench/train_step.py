"""Cost of one Perfusion training step against a baseline step, exact SD1.5 UNet (random weights), on CPU.

Batch 2, 32×32 latents, in the real ComfyUI host. Perfusion: the node's training step (differentiable CLIP,
EMA of i, gated rank-1 edit of all 32 K/V projections, ε-loss, backward, AdamW). Baseline: the same CLIP and
UNet forward/backward with the same trainable parameter count (see ``train_support.Steps``). The two are
alternated; the ratio is the median of per-round ratios.

Run: .venv/bin/python bench/train_step.py
"""
from __future__ import annotations

import statistics
import time

import torch

from bench.common import machine, median_ratio, peak_rss_mb
from bench.train_support import Steps, load_full_sd15


def main(rounds: int = 4) -> None:
    host, model, clip = load_full_sd15()
    with torch.inference_mode(False):
        steps = Steps(host, model, clip, batch=2, latent=32)
        perfusion_count, baseline_count = steps.count()
        seconds = {"perfusion": [], "baseline": []}
        for round_ in range(rounds + 1):  # round 0 warms up; the order alternates
            order = ("perfusion", "baseline") if round_ % 2 else ("baseline", "perfusion")
            for name in order:
                start = time.perf_counter()
                getattr(steps, name)()
                if round_:
                    seconds[name].append(time.perf_counter() - start)
    print(f"machine: {machine()}; host: {host.label}")
    print(f"trainable parameters: perfusion {perfusion_count}, baseline {baseline_count}")
    for name, s in seconds.items():
        print(f"{name:>9}: median {statistics.median(s):.2f} s per step (batch 2, 32x32 latents)")
    print(f"train_step ratio={median_ratio(seconds, 'perfusion', 'baseline'):.3f} peak_rss_mb={peak_rss_mb():.0f}")


if __name__ == "__main__":
    main()
