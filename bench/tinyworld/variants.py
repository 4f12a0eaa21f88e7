"""Prototypes of core changes, measured in the tiny world before they are proposed for ``perfusion_ops``.

``LeakMetric`` / ``LeakAwareTrainer``: the gate's metric also covers what a causal text encoder copies of the
trigger into the tokens after it. The paper's C is the covariance of ordinary encodings, so ``q = C⁻¹ i`` rewards
any encoding that shares the trigger's unusual directions, and in a causal encoder every later token carries part
of them (measured in the CLIP world: s of the first concept up to 0.99 at the tokens after it, 0.49 at the second
trigger). ``C' = C + weight · C_leak`` adds the covariance of the *other* tokens of prompts that contain the trigger,
encoded with the current embedding and re-estimated during training, so training and inference use the same,
trigger-specific gate. This is the code of the proposed core diff (``.cache/tinyworld/core-change.diff``, written by
hand beside it): once the core has ``LeakMetric`` and ``Trainer(leak=...)``, this module goes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from perfusion_ops.covariance import CovarianceEstimator, ridge_inverse
from perfusion_ops.training import Trainer


@dataclass
class LeakMetric:
    """``q = C'⁻¹ i`` with ``C' = C + weight · C_leak``; ``prompts`` each hold the trigger once, with text after it."""

    covariance: Tensor  # C, (D, D)
    prompts: list[str]
    weight: float = 1.0
    every: int = 25

    @torch.no_grad()
    def leak_covariance(self, host, trigger: str, embedding: Tensor) -> Tensor:
        context, encodings = host.encode(self.prompts, trigger, embedding)
        others = (context != encodings[:, None]).any(-1) & (context != 0).any(-1)  # not the trigger, not padding
        leak = CovarianceEstimator(context.shape[-1])
        leak.update(context[others])
        return leak.covariance()

    def inverse(self, host, trigger: str, embedding: Tensor) -> Tensor:
        c = self.covariance.double() + self.weight * self.leak_covariance(host, trigger, embedding)
        return ridge_inverse(c).float()


class LeakAwareTrainer(Trainer):
    """``Trainer`` whose training gate uses :class:`LeakMetric`, refreshed every ``leak.every`` steps."""

    def __init__(self, host, trigger: str, superclass: str, settings, fields: dict, leak: LeakMetric):
        super().__init__(host, trigger, superclass, ridge_inverse(leak.covariance).float(), settings, fields)
        self.leak, self.steps_done = leak, 0

    def step(self, draw) -> float:
        if self.steps_done % self.leak.every == 0:
            self.params.inverse_covariance.copy_(self.leak.inverse(self.host, self.trigger, self.params.embedding))
        self.steps_done += 1
        return super().step(draw)
