"""Gradient checkpointing on and off: the memory and time of one Perfusion training step at full SD1.5 size, on CPU.

Exact SD1.5 UNet and CLIP-L (random weights) in the real ComfyUI host, 512×512 training (64×64 latents), float32 on
CPU. Each variant runs in a process of its own, so its peak resident memory is its own: the step's extra memory is
the peak minus the memory after loading the model, i.e. what backward keeps (activations, gradients, optimizer state).
The time is the median of a few micro-steps after a warm-up.

    .venv/bin/python bench/checkpointing.py [--batch 1] [--repeats 2]

On a GPU the same activations are held in bf16 (autocast), about half the bytes; the README's default for
`gradient_checkpointing` is chosen from these figures.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def measure(batch: int, checkpointing: bool, repeats: int) -> dict:
    """In this process: load, then time micro-steps; memory from the process's resident set."""
    import torch

    from bench.common import machine, peak_rss_mb
    from bench.train_support import Steps, load_full_sd15

    host, model, clip = load_full_sd15()
    with torch.inference_mode(False):
        steps = Steps(host, model, clip, batch=batch, latent=64, checkpointing=checkpointing)
        loaded = peak_rss_mb()
        steps.perfusion()  # warm-up: the first step allocates the optimizer state
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            steps.perfusion()
            times.append(time.perf_counter() - start)
    return {"batch": batch, "checkpointing": checkpointing, "seconds": statistics.median(times),
            "loaded_mb": loaded, "peak_mb": peak_rss_mb(), "machine": machine(), "host": host.label}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--variant", choices=("on", "off"), help=argparse.SUPPRESS)  # the child process
    a = ap.parse_args(argv)
    if a.variant:
        print(json.dumps(measure(a.batch, a.variant == "on", a.repeats)))
        return 0
    rows = {}
    for variant in ("off", "on"):
        run = subprocess.run([sys.executable, __file__, "--variant", variant, "--batch", str(a.batch),
                              "--repeats", str(a.repeats)], capture_output=True, text=True)
        if run.returncode:
            print(run.stderr[-3000:], file=sys.stderr)
            return run.returncode
        rows[variant] = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"machine: {rows['off']['machine']}; host: {rows['off']['host']}")
    for variant, r in rows.items():
        print(f"checkpointing {variant:3}: {r['seconds']:.1f} s per micro-step (batch {r['batch']}, 512 px), "
              f"memory after loading {r['loaded_mb']:.0f} MB, peak {r['peak_mb']:.0f} MB, "
              f"step adds {r['peak_mb'] - r['loaded_mb']:.0f} MB")
    off, on = rows["off"], rows["on"]
    saved = (off["peak_mb"] - off["loaded_mb"]) / max(on["peak_mb"] - on["loaded_mb"], 1)
    print(f"checkpointing batch={a.batch} step_memory_ratio_off_on={saved:.2f} "
          f"time_ratio_on_off={on['seconds'] / off['seconds']:.2f} "
          f"step_mb_off={off['peak_mb'] - off['loaded_mb']:.0f} step_mb_on={on['peak_mb'] - on['loaded_mb']:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
