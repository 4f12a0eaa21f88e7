"""The one source of every user-facing setting's range, the lock modes and the paper's gate values.

The core's checks (``concept.check_gate``, ``edit.AppliedConcept``), the webui's prompt tags and the ComfyUI widgets
all read these, so a range is written once. Paper values: Sec. 4.4 (training gate β 0.75, τ 0.1; inference τ 0.15,
β 0.6–0.75 with the local key lock, 0.4–0.6 with the global one).
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Range:
    """A closed range of a float setting, optionally open at ``low`` (``low`` itself refused)."""

    low: float
    high: float
    low_open: bool = False
    step: float = 0.01  # the widget's arrow step
    precision: float = 0.001  # what the widget rounds to: a measured gate (τ 0.045) must survive being typed in

    def __contains__(self, value: float) -> bool:
        """True for a finite ``value`` inside the range (NaN and ±inf never are)."""
        above = self.low < value if self.low_open else self.low <= value
        return math.isfinite(value) and above and value <= self.high

    def __str__(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"

    def widget(self, default: float, tooltip: str) -> tuple[str, dict]:
        """ComfyUI's FLOAT input spec; an open low end starts at the widget's precision above it."""
        low = self.low + self.precision if self.low_open else self.low
        return ("FLOAT", {"default": default, "min": low, "max": self.high, "step": self.step,
                          "round": self.precision, "tooltip": tooltip})


BETA = Range(-1.0, 2.0)  # gate bias; s(i) = 1 at the concept itself
TAU = Range(0.0, 10.0, low_open=True)  # gate temperature; 0 would make the gate a hard step
STRENGTH = Range(0.0, 2.0, step=0.05)  # scale of a concept's whole edit; 0 takes no part

LOCAL, GLOBAL, TRAINED_K = "local", "global", "trained-k"
LOCKS = (LOCAL, GLOBAL, TRAINED_K)  # the key modes a user can ask for (prompt tags)
EDIT_LOCKS = (LOCAL, TRAINED_K)  # the edit's own: the global lock is the local one with a superclass K context

PAPER_GATES = {"train": (0.75, 0.1), LOCAL: (0.7, 0.15), GLOBAL: (0.5, 0.15)}  # (β, τ)
