"""The joint edit of several applied concepts (Eq. 4) over every cross-attention layer they carry.

Hosts (ComfyUI nodes, webui hooks, training) only supply a callable ``W·`` per layer and path; this module
decides what each projection outputs. Key locking (Sec. 4.4): the K target output ``o_K = W_K e_sup`` comes
from the host's *current* ``W_K``, so a concept trained on one checkpoint follows another's keys.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .concept import Concept, ConceptError, check_gate
from .projection import EditedProjection, Projection, SharedContext
from .settings import EDIT_LOCKS, LOCAL, STRENGTH, TRAINED_K
from .stack import ConceptStack


@dataclass(frozen=True)
class AppliedConcept:
    """One concept as the user applied it: its gate (β, τ), how its K pathway is set, a strength in [0, 2]
    scaling its whole contribution (1: the paper's edit; 0: none; see :class:`ConceptStack`), and the part of the
    sampling schedule it acts in, ``start_at`` to ``end_at`` (fractions: 0 the first step, 1 the last)."""

    concept: Concept
    beta: float
    tau: float
    lock: str = LOCAL
    strength: float = 1.0
    start_at: float = 0.0
    end_at: float = 1.0

    def __post_init__(self):
        check_gate(self.beta, self.tau, what=f"concept '{self.concept.trigger}'")
        if self.strength not in STRENGTH:
            raise ConceptError(f"concept '{self.concept.trigger}': strength {self.strength} must be in {STRENGTH}")
        if not (0.0 <= self.start_at <= self.end_at <= 1.0):  # also refuses NaN
            raise ConceptError(f"concept '{self.concept.trigger}': start_at {self.start_at} and end_at "
                               f"{self.end_at} must satisfy 0 ≤ start_at ≤ end_at ≤ 1")
        if self.lock not in EDIT_LOCKS:
            raise ConceptError(f"unknown lock mode '{self.lock}' (choose {' or '.join(EDIT_LOCKS)})")
        if self.lock == TRAINED_K and not self.concept.trained_keys:
            raise ConceptError(
                f"concept '{self.concept.trigger}' was trained key-locked and has no trained K outputs; "
                "use lock mode 'local'"
            )

    @property
    def whole_schedule(self) -> bool:
        return self.start_at == 0.0 and self.end_at == 1.0


class JointEdit:
    """Eq. 4 for J applied concepts: one :class:`SharedContext`, one :class:`EditedProjection` per layer/path.

    A concept at strength 0 takes no part (``applied`` keeps it, ``active`` does not): the remainder of Eq. 10 would
    still remove its target input from every encoding, so the edit is built from the others alone and is exactly the
    edit without it. With no concept left, ``shared`` is None and every projection is the host's own. Each concept's
    gate is the one it was trained with: Eq. 3's, or first-opening over its ``gate_window``; ``joint_gates`` reads
    each gate from the concepts' joint coordinates instead of Eq. 4's similarity (:class:`ConceptStack`)."""

    def __init__(self, applied: list[AppliedConcept], gated: bool = True, joint_gates: bool = False):
        if not applied:
            raise ValueError("a joint edit needs at least one concept")
        layers = applied[0].concept.layers
        windows = {entry.concept.gate_window: entry.concept.trigger for entry in applied if entry.concept.gate_window}
        for entry in applied[1:]:
            if set(entry.concept.layers) != set(layers):
                raise ConceptError(
                    f"concepts '{applied[0].concept.trigger}' and '{entry.concept.trigger}' edit different "
                    "layers: they were trained for different model families"
                )
        if len(windows) > 1:
            (a, first), (b, second) = list(windows.items())[:2]
            raise ConceptError(f"concepts '{first}' and '{second}' were trained with first-opening gates over "
                               f"windows of {a} and {b} tokens: they were trained for different text encoders")
        self.applied, self.layers = list(applied), layers
        self.active = [entry for entry in applied if entry.strength > 0]
        self.shared = self.locked = None
        if not self.active:
            return
        concepts = [entry.concept for entry in self.active]
        stack = ConceptStack(
            torch.stack([c.target_input for c in concepts]),
            torch.stack([c.target_key for c in concepts]),
            torch.tensor([entry.beta for entry in self.active]),
            torch.tensor([entry.tau for entry in self.active]),
            gated=gated,
            strength=[entry.strength for entry in self.active],
            windows=[c.gate_window for c in concepts],
            joint_gates=joint_gates,
        )
        self.shared = SharedContext(stack, torch.stack([c.superclass_encoding for c in concepts]))
        self.locked = torch.tensor([entry.lock == LOCAL for entry in self.active])

    def targets(self, layer: str, kv: str) -> torch.Tensor:
        """Stored target outputs ``(J, out)`` of the active concepts' ``layer`` for ``kv`` 'k' or 'v' (zeros where
        K is locked)."""
        rows = []
        for entry in self.active:
            c = entry.concept
            if kv == "v":
                rows.append(c.value_outputs[layer])
            elif entry.lock == TRAINED_K:
                rows.append(c.key_outputs[layer])
            else:
                rows.append(torch.zeros_like(c.value_outputs[layer]))
        return torch.stack(rows)

    def projection(self, layer: str, kv: str, project: Projection) -> Projection:
        """The edited forward of ``layer``'s ``to_k`` (``kv='k'``) or ``to_v`` (``'v'``) around ``project``;
        ``project`` itself when every concept is at strength 0."""
        if not self.active:
            return project
        locked = self.locked if kv == "k" else None
        return EditedProjection(project, self.shared, self.targets(layer, kv), locked)


class ScheduledEdit:
    """The joint edit over a sampling run, where each concept acts only inside its ``start_at``–``end_at`` range.

    The host says which concepts are in range before each model call (:meth:`select`); every projection made by
    :meth:`projection` then computes the joint edit of those concepts alone — the others as at strength 0, so
    exactly the edit without them — and the host's own projection when none is in range. One :class:`JointEdit`
    per set of concepts in range is built on first use and kept."""

    def __init__(self, applied: list[AppliedConcept]):
        self.applied = list(applied)
        self.in_range = (True,) * len(self.applied)
        full = JointEdit(self.applied)  # also checks that the concepts agree
        self.layers = full.layers
        self._edits: dict[tuple[bool, ...], JointEdit] = {self.in_range: full}
        self._projections: dict[tuple, Projection] = {}

    @property
    def scheduled(self) -> bool:
        """Whether any concept acts in only part of the schedule (else :meth:`select` never changes anything)."""
        return not all(entry.whole_schedule for entry in self.applied)

    def select(self, in_range: tuple[bool, ...]) -> bool:
        """Set which concepts act in the coming model call; True if any of them does, at a strength above 0."""
        self.in_range = tuple(bool(flag) for flag in in_range)
        return any(flag and entry.strength > 0 for flag, entry in zip(self.in_range, self.applied))

    def edit(self) -> JointEdit:
        """The joint edit of the concepts in range now."""
        if self.in_range not in self._edits:
            self._edits[self.in_range] = JointEdit([entry if flag else replace(entry, strength=0.0)
                                                    for entry, flag in zip(self.applied, self.in_range)])
        return self._edits[self.in_range]

    def projection(self, layer: str, kv: str, project: Projection) -> Projection:
        """The edited forward of ``layer``'s ``to_k``/``to_v`` around ``project``, following :meth:`select`."""
        def forward(x):
            key = (self.in_range, layer, kv)
            if key not in self._projections:
                self._projections[key] = self.edit().projection(layer, kv, project)
            return self._projections[key](x)
        return forward
