"""Cost of the gated rank-1 edit on the 32 cross-attention K/V projections of SD1.5, on CPU.

One UNet forward feeds one context (CFG batch 2 × 77 tokens × 768) to the to_k/to_v of all 16 cross-attention
layers (768 → 320/640/1280). Plain: the 32 bare projections. Edited: the same 32 projections through the joint
edit of J concepts (e⊥ and gates computed once per context, then one addmm per projection). Each round uses a
fresh context, as each sampling step does, and alternates the variants.

Run: .venv/bin/python bench/edit_overhead.py
"""
from __future__ import annotations


import torch

from bench.common import alternate, machine, median_ratio, peak_rss_mb
from perfusion_ops.edit import AppliedConcept, JointEdit
from tools.factories import SD15_LAYERS, SD15_TEXT_WIDTH, random_concept


def main(rounds: int = 60) -> None:
    torch.manual_seed(0)
    modules = {
        (layer, path): torch.nn.Linear(SD15_TEXT_WIDTH, width, bias=False).requires_grad_(False)
        for layer, width in SD15_LAYERS.items() for path in "kv"
    }
    base = torch.randn(2, 77, SD15_TEXT_WIDTH)

    def plain():
        context = base.clone()
        return [module(context) for module in modules.values()]

    def edited_with(j: int):
        edit = JointEdit([AppliedConcept(random_concept(seed=s), 0.7, 0.15) for s in range(j)])
        projections = [edit.projection(layer, path, modules[layer, path]) for layer, path in modules]

        def run():
            context = base.clone()
            return [projection(context) for projection in projections]

        return run

    variants = {"plain": plain, **{f"J{j}": edited_with(j) for j in (1, 2, 4)}}
    with torch.inference_mode():
        times = alternate(variants, rounds)
    print(f"machine: {machine()}")
    for name, seconds in times.items():
        print(f"{name:>6}: median {1e3 * sorted(seconds)[len(seconds) // 2]:.3f} ms per UNet forward (32 projections)")
    print(f"peak_rss_mb={peak_rss_mb():.0f}")
    ratios = " ".join(f"J{j}={median_ratio(times, f'J{j}', 'plain'):.3f}" for j in (1, 2, 4))
    print(f"edit_overhead {ratios}")


if __name__ == "__main__":
    main()
