"""A small deterministic sampler for preview images while training (host-agnostic; any ε-prediction model)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def ddim_sample(predict: Callable[[Tensor, Tensor, Tensor], Tensor], alphas_cumprod: Tensor, noise: Tensor,
                context: Tensor, uncond: Tensor, steps: int, guidance: float) -> Tensor:
    """Latents ``x_0`` from pure ``noise`` (B, C, h, w) by deterministic DDIM (Song et al. 2021, η = 0) over ``steps``
    evenly spaced timesteps from the last to 0, with classifier-free guidance: ``ε = ε(∅) + guidance·(ε(c) − ε(∅))``.

    ``predict(x_t, t, context)`` is the ε-model, ``alphas_cumprod`` its ᾱ_t; ``context`` (B, L, D) conditions each
    latent, ``uncond`` (1, L, D) is the unconditional context. Each step is one model call on the cond and uncond
    halves together, with the same context tensor every time (so per-context caches of an edit hit)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    count = len(noise)
    alphas = alphas_cumprod.float()
    timesteps = torch.linspace(len(alphas) - 1, 0, steps).round().long()
    both = torch.cat([uncond.to(context).expand(count, -1, -1), context])
    x = noise.float()
    for k, t in enumerate(timesteps):
        eps_uncond, eps_cond = predict(torch.cat([x, x]), t.repeat(2 * count), both).float().chunk(2)
        eps = eps_uncond + guidance * (eps_cond - eps_uncond)
        a = alphas[t].to(x.device)
        a_next = alphas[timesteps[k + 1]].to(x.device) if k + 1 < steps else torch.ones((), device=x.device)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return x
