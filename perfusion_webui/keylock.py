"""Global key lock (paper App. C) where the host has no K-context channel: find the K context by value.

With the global lock, K must see the prompt with each trigger word replaced by its superclass word, V the real
prompt. The webui encodes prompts itself and batches cond and uncond into one context, so there is no slot to
carry a second encoding to cross-attention. Instead the adapter encodes both prompts the way the webui does
(:meth:`KeyContexts.add`: real encoding → superclass encoding) and, when a context reaches cross-attention,
each batch row whose leading tokens equal a registered real encoding gets the superclass encoding there
(:meth:`KeyContexts.__call__`). Rows that match nothing (the negative prompt, another prompt) pass unchanged,
so a miss degrades to the local lock, never to a wrong edit.
"""
from __future__ import annotations

import torch
from torch import Tensor


class KeyContexts:
    """Pairs (real encoding ``(T, D)``, K encoding ``(T, D)``) and the lookup that applies them.

    Matching compares values after casting to the context's dtype and device, within ``atol`` (relative to the
    encoding's largest value) so that an fp16/autocast difference between our encode and the host's still
    matches; every token of the row must match, and two different prompts differ by far more after their
    first differing token (CLIP is causal, so only a shared prefix is equal). Results are cached per context tensor
    (the same context object feeds all 16 K projections of one UNet call)."""

    def __init__(self, atol: float = 1e-2, slots: int = 4):
        self.pairs: list[tuple[Tensor, Tensor]] = []
        self.atol, self.slots = atol, slots
        self._cache: dict[int, tuple[Tensor, Tensor]] = {}
        self.matched_rows = 0

    def __len__(self) -> int:
        return len(self.pairs)

    def add(self, real: Tensor, keys: Tensor) -> None:
        real, keys = real.detach(), keys.detach()
        if real.ndim == 3 and real.shape[0] == 1:
            real, keys = real[0], keys[0]
        if real.shape != keys.shape or real.ndim != 2:
            raise ValueError(f"real {tuple(real.shape)} and key {tuple(keys.shape)} encodings must both be (T, D)")
        self.pairs.append((real, keys))
        self._cache.clear()

    def __call__(self, context: Tensor) -> Tensor:
        hit = self._cache.get(id(context))
        if hit is not None and hit[0] is context:
            return hit[1]
        result = self._resolve(context)
        self._cache[id(context)] = (context, result)
        while len(self._cache) > self.slots:
            self._cache.pop(next(iter(self._cache)))
        return result

    def _resolve(self, context: Tensor) -> Tensor:
        if not self.pairs or context.ndim != 3:
            return context
        out = None
        for b in range(context.shape[0]):
            row = context[b]
            for real, keys in self.pairs:
                t = real.shape[0]
                if t > row.shape[0] or real.shape[1] != row.shape[1]:
                    continue
                real_here = real.to(row.device, row.dtype)
                scale = float(real_here.abs().max()) or 1.0
                if torch.allclose(row[:t], real_here, rtol=0, atol=self.atol * scale):
                    if out is None:
                        out = context.clone()
                    out[b, :t] = keys.to(row.device, row.dtype)
                    self.matched_rows += 1
                    break
        return context if out is None else out
