"""Prototypes measured in the tiny world before anything like them is proposed for the hosts.

``SlotContextHost``: each trigger confined to its own token. Every other token of the context comes from the prompt
with the trigger words replaced by their superclass words (what the global key lock encodes for K), so no later word
carries a copy of the trigger, in training and at inference, for K and V. Under a causal encoder the tokens before the
trigger are the same in both prompts, so this differs from the real prompt only at and after the trigger. It asks
whether a concept held by one token, with nothing leaking, composes in this world.
"""
from __future__ import annotations

import torch
from torch import Tensor

from perfusion_ops.words import replace_words

from .host import TinyWorldHost


class SlotContextHost(TinyWorldHost):
    """The tiny world's host with every trigger confined to its slot (see the module doc)."""

    def __init__(self, host: TinyWorldHost, superclasses: dict[str, str]):
        super().__init__(host.unet, host.text, host.alphas_cumprod)
        self.guidance, self.superclasses = host.guidance, {t.lower(): s for t, s in superclasses.items()}

    def _confined(self, context: Tensor, prompts: list[str], slot: Tensor) -> Tensor:
        """``context`` where ``slot`` (B, L) is true, the superclass prompts' encodings elsewhere."""
        plain = [replace_words(p, self.superclasses) for p in prompts]
        return torch.where(slot[..., None], context, self.text.encode(plain)[0].to(context))

    def encode(self, prompts, trigger, vector):
        context, at_trigger = super().encode(prompts, trigger, vector)
        slot = (context == at_trigger[:, None]).all(-1)
        return self._confined(context, prompts, slot), at_trigger

    @torch.no_grad()
    def context(self, prompts, concepts=()):
        context, slots = super().context(prompts, concepts)
        slot = torch.zeros(context.shape[:2], dtype=torch.bool)
        for per_prompt in slots.values():
            for row, cols in enumerate(per_prompt):
                slot[row, cols] = True
        return (self._confined(context, prompts, slot) if concepts else context), slots
