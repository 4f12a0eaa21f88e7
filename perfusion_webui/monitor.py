"""How far each concept's gate opened during a generation: the user's answer to "did my trigger fire?".

Observes the edit's :class:`SharedContext` (``observers``: once per context, shared by all projections) and keeps
the largest gate value per concept, so the log can say ``hugsy: gate peaked at 0.97 (trigger present)`` or warn
that a tagged concept never fired (trigger word missing from the prompt, CLIP skip, wrong checkpoint).
"""
from __future__ import annotations

import torch

from perfusion_ops.edit import JointEdit


class GateMonitor:
    def __init__(self, edit: JointEdit):
        self.shared = edit.shared
        self.strengths = [entry.strength for entry in edit.applied]
        self.peak = torch.zeros(len(edit.active))  # the stack holds the active concepts (strength > 0)
        self.contexts = 0
        if self.shared is not None:  # None: every concept at strength 0, nothing to watch
            self.shared.observers.append(self.observe)

    def observe(self, prepared) -> None:
        """Called once per newly prepared context (the cache hands the same one to all 32 projections)."""
        self.contexts += 1
        if prepared.gates.numel():
            gates = prepared.gates.detach().float().amax(0)
            if self.peak.device != gates.device:  # move once; the peak stays there: no sync per UNet call
                self.peak = self.peak.to(gates.device)
            self.peak = torch.maximum(self.peak, gates)

    def report(self, names: list[str]) -> str:
        if self.contexts == 0 and self.shared is not None:
            return "the edit saw no text context (nothing sampled?)"
        peaks = iter(self.peak.cpu().tolist())
        parts = []
        for name, strength in zip(names, self.strengths):
            if strength == 0:
                parts.append(f"{name}: strength 0 (off)")
                continue
            peak = next(peaks)
            note = "" if peak >= 0.5 else " — below 0.5: is the trigger word in the prompt?"
            parts.append(f"{name}: gate peaked at {peak:.2f}{note}")
        return "; ".join(parts)
