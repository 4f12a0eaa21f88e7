"""The covariance C of text encodings (paper App. C), its ridge inverse, and a disk cache per text encoder.

C is the uncentered covariance ``C = E[e eᵀ]`` over every token position of a caption set (BOS and padding
included: those are encodings the edited layers also see). Its scale does not matter to the gate — ``s``
divides by ``i·C⁻¹i`` — but which positions enter does. One C serves every concept of one text encoder.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from safetensors.torch import load_file, save

from .files import atomic_write_bytes

Encoder = Callable[[Sequence[str]], torch.Tensor]


class CovarianceEstimator:
    """Streaming ``C = (1/n) Σ e eᵀ`` over batches of encodings, accumulated in float64."""

    def __init__(self, dim: int):
        self.total = torch.zeros(dim, dim, dtype=torch.float64)
        self.count = 0

    def update(self, encodings: torch.Tensor) -> None:
        """Add every row of ``encodings`` ``(..., D)`` (all token positions) to the running sum."""
        rows = encodings.detach().reshape(-1, self.total.shape[0]).to("cpu", torch.float64)
        self.total += rows.T @ rows
        self.count += rows.shape[0]

    def covariance(self) -> torch.Tensor:
        """The estimate so far (float64, symmetric)."""
        if self.count == 0:
            raise ValueError("no encodings were added to the covariance estimate")
        c = self.total / self.count
        return (c + c.T) / 2


def ridge_inverse(covariance: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """``(C + λ I)⁻¹`` in float64 with ``λ = ridge · tr(C) / D``, via Cholesky.

    CLIP-L's C has condition number ~4·10³; a ridge of 1e-3 of the mean eigenvalue bounds it for C estimated
    from few captions without changing the well-estimated directions."""
    c = covariance.to(torch.float64)
    dim = c.shape[0]
    lam = ridge * torch.trace(c) / dim
    factor = torch.linalg.cholesky(c + lam * torch.eye(dim, dtype=torch.float64))
    return torch.cholesky_inverse(factor)


def estimate_covariance(
    encode: Encoder,
    captions: Sequence[str],
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, int]:
    """C from ``encode(captions batch) -> (B, tokens, D)``; returns ``(C, number of encodings)``.

    ``progress(done, total)`` is called after each batch (captions done so far)."""
    estimator = None
    for start in range(0, len(captions), batch_size):
        encodings = encode(captions[start : start + batch_size])
        estimator = estimator or CovarianceEstimator(encodings.shape[-1])
        estimator.update(encodings)
        if progress:
            progress(min(start + batch_size, len(captions)), len(captions))
    if estimator is None:
        raise ValueError("no captions to estimate the covariance from")
    return estimator.covariance(), estimator.count


def cached_covariance(
    cache_dir: str | os.PathLike,
    fingerprint: str,
    compute: Callable[[], tuple[torch.Tensor, int]],
    log: Callable[[str], None] = print,
) -> torch.Tensor:
    """C for the cache key ``fingerprint``: read from ``cache_dir`` or computed once and stored.

    The key names what C was estimated from (the caller's choice: the encoder's weight fingerprint, so a fine-tune
    with its own text encoder gets its own C, and the captions). C is stored in float32 and the first run returns
    the stored value too, so every run with one key gets the same C bit for bit."""
    path = Path(cache_dir) / f"covariance-{fingerprint}.safetensors"
    if path.is_file():
        return load_file(path)["covariance"].to(torch.float64)
    log(f"[perfusion] estimating the text covariance for encoder {fingerprint} (once; cached in {path})")
    covariance, count = compute()
    stored = covariance.float().contiguous()
    atomic_write_bytes(path, save({"covariance": stored}, metadata={"encodings": str(count)}))
    return stored.to(torch.float64)


def fingerprint(tensors: Iterable[torch.Tensor]) -> str:
    """A short hash of weights, equal for fp32 and fp16 copies of the same weights (rounded to fp16 first)."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().to("cpu", torch.float16).contiguous().view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]
