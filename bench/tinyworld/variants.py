"""Prototypes of core changes, measured in the tiny world before they are proposed for ``perfusion_ops``.

``LeakAwareTrainer``: the gate's metric also covers what a causal text encoder copies of the trigger into the tokens
after it. The paper's C is the covariance of ordinary encodings, so ``q = C⁻¹ i`` rewards any encoding that shares
the trigger's unusual directions — and in a causal encoder every later token carries part of them (measured: s of
the first concept at the tokens after it up to 0.99, at the second trigger 0.49). Here C is augmented with the
covariance of the *other* tokens of captions that contain the trigger, encoded with the current embedding, and
re-estimated during training, so training and inference use the same, trigger-specific gate.
"""
from __future__ import annotations

import torch
from torch import Tensor

from perfusion_ops.covariance import CovarianceEstimator, ridge_inverse
from perfusion_ops.training import Trainer


class LeakAwareTrainer(Trainer):
    """``Trainer`` whose ``q = C'⁻¹ i`` uses ``C' = C + weight · C_leak``, ``C_leak`` the uncentered covariance of
    every non-trigger token of ``prompts`` (each holding the trigger once), re-estimated every ``every`` steps."""

    def __init__(self, host, trigger: str, superclass: str, covariance: Tensor, settings, fields: dict,
                 prompts: list[str], every: int = 25, weight: float = 1.0):
        super().__init__(host, trigger, superclass, ridge_inverse(covariance).float(), settings, fields)
        self.covariance, self.prompts, self.every, self.weight = covariance.double(), prompts, every, weight
        self.done = 0

    @torch.no_grad()
    def leak_covariance(self) -> Tensor:
        context, mask, slots = self.host.text.encode(self.prompts, self.trigger, self.params.embedding)
        for row, columns in enumerate(slots):
            mask[row, columns] = False  # the trigger's own encodings are what the gate should pick out
        leak = CovarianceEstimator(context.shape[-1])
        leak.update(context[mask])
        return leak.covariance()

    def step(self, draw) -> float:
        if self.done % self.every == 0:
            inverse = ridge_inverse(self.covariance + self.weight * self.leak_covariance()).float()
            self.params.inverse_covariance.copy_(inverse)
        self.done += 1
        return super().step(draw)
