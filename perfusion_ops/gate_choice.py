"""Choosing a trained concept's inference gate (β, τ of Eq. 3) from where its similarity ``s`` opens it.

The gate ``g = σ((s − β)/τ)`` should be open where the trigger word is and shut at every other token. After
training, ``s(e) = (e·q)/(i·q)`` (Eq. 2) is measured at the trigger in held-out prompts (``s_trigger``: the lowest is
the one that must still open) and at every other token (the highest must stay shut): the tokens of prompts without
the trigger (captions, and the held-out prompts with the superclass word in its place) and the tokens *after* the
trigger in the held-out prompts, into which a causal text encoder copies it (a gate open there spreads the concept
over the rest of the prompt, and onto a second concept's trigger) — unless the concept has first-opening gates
(``stack.first_opening``), which the trigger itself shuts for those words. Between the two lies a gap:

- local key lock: β in its middle, τ so that the gate is ``OPEN`` at the lowest trigger and ``1 − OPEN`` at the
  highest other token: ``β = (lo + hi)/2``, ``τ = (hi − lo) / (2·logit(OPEN))``;
- global key lock: the same τ and β a third of the way up from the others (the K pathway is the superclass's, so a
  gate slightly open elsewhere costs less; the paper's global β range, 0.4–0.6, also lies below its local 0.6–0.75).

Where there is no gap (the trigger's ``s`` does not rise above every other token's, e.g. after too few steps) the
paper's values are kept and the choice says so.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .concept import Concept
from .settings import BETA, GLOBAL, LOCAL
from .stack import similarity

# Prompts training never sees (App. G's evaluation style: a new scene, a new style, a second object); "{}" is the word.
HELD_OUT = (
    "a {} on the beach", "a {} in the snow", "a watercolor painting of a {}", "a {} next to a red cube",
    "a {} on a wooden table in a kitchen", "a close-up photo of a {} at night", "a {} and a dog in a park",
    "a {} floating in space", "a pencil sketch of a {}",
)
OPEN = 0.95  # the gate at the lowest trigger similarity; 1 − OPEN at the highest other one
MIN_GAP = 0.05  # a narrower gap cannot be told from estimation noise: keep the paper's gate
TAU_RANGE = (0.02, 0.5)
GLOBAL_SHARE = 1 / 3  # where the global lock's β lies in the gap, from the others' side

Encode = Callable[[list[str]], Tensor]  # prompts -> (B, tokens, D), no trigger word in them


@dataclass(frozen=True)
class GateChoice:
    """The measured similarities and the gate chosen from them (``chosen`` False: the paper's values kept)."""

    trigger_low: float  # lowest s at the trigger over the held-out prompts
    trigger_mean: float
    other_high: float  # highest s at any token of the prompts without the trigger
    following_high: float  # highest s at a token after the trigger in the held-out prompts
    beta_local: float
    tau_local: float
    beta_global: float
    tau_global: float
    chosen: bool
    following_shut: bool = False  # first-opening gates: the trigger shuts the words after it

    @property
    def shut_high(self) -> float:
        """The highest s where the gate must stay shut: without the trigger, and after it unless already shut."""
        return self.other_high if self.following_shut else max(self.other_high, self.following_high)

    @property
    def gap(self) -> float:
        return self.trigger_low - self.shut_high

    def describe(self, trigger: str) -> str:
        """One console line: what was measured and what was chosen."""
        measured = (f"s at '{trigger}' {self.trigger_low:.2f}–{self.trigger_mean:.2f} (lowest–mean, held-out "
                    f"prompts), at other tokens up to {self.other_high:.2f}, after the trigger up to "
                    f"{self.following_high:.2f}" + (" (shut there by first-opening gates)" * self.following_shut))
        if not self.chosen:
            copied = not self.following_shut and self.other_high < self.trigger_low - MIN_GAP  # only the later words
            why = ("the words after the trigger carry it as strongly as the trigger itself "
                   "(the text encoder is causal)"
                   if copied else "the trigger does not stand out from other words yet: train more steps")
            return (f"gate for '{trigger}': {measured}; no gap: {why}. The paper's gate is kept (β "
                    f"{self.beta_local:g}, τ {self.tau_local:g} local; β {self.beta_global:g} global); to choose "
                    "another, set Apply's gate to 'beta and tau widgets'")
        return (f"gate for '{trigger}': {measured} → β {self.beta_local:.2f}, τ {self.tau_local:.3f} (local lock); "
                f"β {self.beta_global:.2f} (global lock)")

    def fields(self) -> dict[str, float]:
        """The concept's recommended-gate fields."""
        return {"beta_local": self.beta_local, "tau_local": self.tau_local,
                "beta_global": self.beta_global, "tau_global": self.tau_global}

    @property
    def summary(self) -> str:
        """How the recommendation was made, for the concept file's info."""
        source = "measured" if self.chosen else "the paper's (no gap)"
        return f"{source}: s at the trigger >= {self.trigger_low:.3f}, at other tokens <= {self.shut_high:.3f}"


def caption_sample(captions: list[str], count: int = 256) -> list[str]:
    """``count`` captions spread evenly over ``captions`` (deterministic: the same corpus gives the same gate)."""
    if len(captions) <= count:
        return list(captions)
    return [captions[k * len(captions) // count] for k in range(count)]


def gate_from_gap(trigger_low: float, other_high: float) -> tuple[float, float, float] | None:
    """``(β_local, β_global, τ)`` for the gap between the highest other ``s`` and the lowest trigger ``s``, or None
    where the gap is under ``MIN_GAP``."""
    gap = trigger_low - other_high
    if not gap >= MIN_GAP:  # also NaN
        return None
    tau = min(max(gap / (2 * math.log(OPEN / (1 - OPEN))), TAU_RANGE[0]), TAU_RANGE[1])
    beta_local, beta_global = other_high + gap / 2, other_high + GLOBAL_SHARE * gap
    return (beta_local, beta_global, tau) if beta_local in BETA and beta_global in BETA else None


@torch.no_grad()
def choose_gate(concept: Concept, encode: Callable[[list[str], str, Tensor], tuple[Tensor, Tensor]],
                encode_plain: Encode, captions: list[str], prompts: tuple[str, ...] = HELD_OUT,
                batch_size: int = 32) -> GateChoice:
    """Measure ``s`` of ``concept`` and choose its gate. ``encode(prompts, trigger, embedding)`` is the training
    host's (context and the trigger's encodings), ``encode_plain`` encodes prompts without the trigger; ``captions``
    is a sample of ordinary captions and ``prompts`` the held-out templates ("{}" is the word)."""
    held_out = [p.format(concept.trigger) for p in prompts]
    context, at_trigger = encode(held_out, concept.trigger, concept.embedding)
    context, at_trigger = context.float(), at_trigger.float().to(context.device)
    i, q = (t.float().to(context.device)[None] for t in (concept.target_input, concept.target_key))
    s = lambda e: similarity(e.float().to(i.device), i, q)[..., 0]  # noqa: E731
    s_context, s_trigger = s(context), s(at_trigger)
    slots = (context - at_trigger[:, None]).norm(dim=-1).argmin(1)  # the trigger's position
    following = torch.arange(s_context.shape[1], device=slots.device)[None] > slots[:, None]
    plain = captions + [p.format(concept.superclass) for p in prompts]
    s_other = torch.cat([s(encode_plain(plain[k:k + batch_size])).flatten() for k in range(0, len(plain), batch_size)])
    after = float(s_context[following].max()) if bool(following.any()) else -math.inf
    low, other = float(s_trigger.min()), float(s_other.max())
    following_shut = concept.gate_window > 0
    chosen = gate_from_gap(low, other if following_shut else max(other, after))
    if chosen is None:
        (beta_local, tau_local), (beta_global, tau_global) = concept.recommended(LOCAL), concept.recommended(GLOBAL)
    else:
        beta_local, beta_global, tau_local = chosen
        tau_global = tau_local
    return GateChoice(low, float(s_trigger.mean()), other, after, beta_local, tau_local, beta_global, tau_global,
                      chosen is not None, following_shut)
