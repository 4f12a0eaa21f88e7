"""Eq. 4 on a host projection: ``h = W e⊥ + Σ_j g_j(e) o_j``, with ``W e⊥`` computed by the host's own module.

One UNet forward feeds the same context to all 32 cross-attention K/V projections, so ``e⊥`` and the gates are
computed once per context (:class:`SharedContext`) and every projection only adds one thin ``addmm``.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from .stack import ConceptStack

Projection = Callable[[Tensor], Tensor]


class Prepared(NamedTuple):
    rows: Tensor  # (n + J, D) host dtype: the n remainders e⊥, then the J superclass encodings e_sup
    gates: Tensor  # (n, J) float32: the gates g of Eq. 3
    weights: Tensor  # (n, J) float32: what multiplies each o_j, strength · g
    count: int  # n, the number of token encodings in the context


class SharedContext:
    """Per-context work shared by all projections of one edit: ``e⊥`` rows, ``e_sup`` rows and gates.

    The ``e_sup`` rows ride along in the host call so that a key-locked projection gets ``o_K = W_K e_sup``
    (Sec. 4.4) from the host's *current* weights — LoRA patches and fine-tunes included — at no extra call.
    Entries are keyed on the context's storage and layout (``data_ptr``, shape, strides, dtype, device): autograd's
    saved-tensor hooks (gradient checkpointing) may hand the same tensor back as a new Python object. The key also
    holds the tensor's version counter, so a context changed in place is prepared afresh. Inference tensors
    (``torch.inference_mode``, ComfyUI's sampling) carry no version counter; for them the key is storage and
    layout alone. The entry keeps a strong reference to its context, so that storage cannot be freed and reused
    while cached; a few slots cover CFG runs that send cond and uncond separately.
    """

    def __init__(self, stack: ConceptStack, e_sup: Tensor, slots: int = 4):
        if e_sup.shape != stack.inputs.shape:
            raise ValueError("need one superclass encoding per concept, of the text width")
        self.stack = stack
        self.e_sup = e_sup.detach().float()
        self.slots = slots
        self._cache: OrderedDict[tuple, tuple[Tensor, Prepared]] = OrderedDict()
        self.observers: list[Callable[[Prepared], None]] = []  # told of each newly prepared context (monitors)

    def prepare(self, context: Tensor) -> Prepared:
        """``e⊥`` (Eq. 10) and gates (Eq. 3) of every token of ``context`` ``(..., D)``, computed once per context."""
        version = None if context.is_inference() else context._version
        key = (context.data_ptr(), tuple(context.shape), context.stride(), context.dtype, context.device, version)
        hit = self._cache.get(key)
        if hit is not None:
            return hit[1]
        e_perp, gates, weights = self.stack.split(context)
        flat = e_perp.reshape(-1, e_perp.shape[-1])
        rows = torch.cat([flat, self.e_sup.to(flat.device)]).to(context.dtype)
        n = flat.shape[0]
        prepared = Prepared(rows, gates.reshape(n, -1), weights.reshape(n, -1), n)
        self._cache[key] = (context, prepared)
        while len(self._cache) > self.slots:
            self._cache.popitem(last=False)
        for observe in self.observers:
            observe(prepared)
        return prepared


class EditedProjection:
    """One edited K or V projection: a drop-in for the host module's ``forward``.

    ``outputs`` (J, out) are the target outputs ``o_j`` of this layer and path. Where ``locked[j]`` is true,
    ``o_j`` is instead ``W e_sup,j`` from the host call (key locking); those rows of ``outputs`` are ignored.
    """

    def __init__(self, project: Projection, shared: SharedContext, outputs: Tensor, locked: Tensor | None = None):
        if outputs.ndim != 2 or outputs.shape[0] != len(shared.stack):
            raise ValueError(f"outputs must be (J={len(shared.stack)}, out), got {tuple(outputs.shape)}")
        self.project, self.shared = project, shared
        self.outputs = outputs.float()
        self.locked = None if locked is None or not bool(locked.any()) else locked.bool().reshape(-1, 1)
        self._device_copies: dict[torch.device, tuple[Tensor, Tensor | None]] = {}

    def _on(self, device: torch.device) -> tuple[Tensor, Tensor | None]:
        if self.outputs.requires_grad:  # trainable o_V: never cache a copy across autograd steps
            return self.outputs, self.locked
        if device not in self._device_copies:
            locked = None if self.locked is None else self.locked.to(device)
            self._device_copies[device] = (self.outputs.to(device), locked)
        return self._device_copies[device]

    def target_outputs(self, e_sup_outputs: Tensor) -> Tensor:
        """``o_j`` per concept, float32 ``(J, out)``: locked rows from ``W e_sup``, others as stored."""
        stored, locked = self._on(e_sup_outputs.device)
        if locked is None:
            return stored
        return torch.where(locked, e_sup_outputs.float(), stored)

    def __call__(self, context: Tensor) -> Tensor:
        prepared = self.shared.prepare(context)
        projected = self.project(prepared.rows)
        n = prepared.count
        targets = self.target_outputs(projected[n:])
        h = torch.addmm(projected[:n].float(), prepared.weights, targets)
        return h.to(projected.dtype).reshape(*context.shape[:-1], -1)

