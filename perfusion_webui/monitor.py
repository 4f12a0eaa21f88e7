"""How far each concept's gate opened during a generation: the user's answer to "did my trigger fire?".

Wraps the edit's :meth:`SharedContext.prepare` (once per context, shared by all projections) and keeps the
largest gate value per concept, so the log can say ``hugsy: gate peaked at 0.97 (trigger present)`` or warn
that a tagged concept never fired (trigger word missing from the prompt, CLIP skip, wrong checkpoint).
"""
from __future__ import annotations

import torch

from perfusion_ops.edit import JointEdit


class GateMonitor:
    def __init__(self, edit: JointEdit):
        self.shared = edit.shared
        self.strengths = [entry.strength for entry in edit.applied]
        # the stack holds the active concepts (strength > 0) and hands out s·g: report the gate itself
        self._scale = torch.tensor([entry.strength for entry in edit.active], dtype=torch.float32)
        self.peak = torch.zeros(len(edit.active))
        self.contexts = 0
        self._last = None
        if self.shared is None:  # every concept at strength 0: nothing to watch
            return
        prepare = self.shared.prepare

        def monitored(context):
            prepared = prepare(context)
            if prepared is not self._last:  # a new context (the cache hands the same object to all 32 calls)
                self._last = prepared
                self.contexts += 1
                if prepared.gates.numel():
                    gates = prepared.gates.detach().float().amax(0)
                    if self.peak.device != gates.device:  # move once; the peak stays there: no sync per UNet call
                        self.peak, self._scale = self.peak.to(gates.device), self._scale.to(gates.device)
                    self.peak = torch.maximum(self.peak, gates / self._scale)
            return prepared

        self.shared.prepare = monitored

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
