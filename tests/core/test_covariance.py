"""The covariance estimate, its ridge inverse, the per-encoder disk cache and the weight fingerprint."""
import pytest
import torch

from tools.factories import random_covariance, real_covariance
from perfusion_ops import CovarianceEstimator, cached_covariance, estimate_covariance, fingerprint, ridge_inverse


def test_streaming_estimate_equals_batch_formula_over_every_position():
    x = torch.randn(7, 77, 32, dtype=torch.float32)
    estimator = CovarianceEstimator(32)
    for chunk in x.split(3):
        estimator.update(chunk)
    rows = x.reshape(-1, 32).double()
    assert estimator.count == 7 * 77
    assert torch.allclose(estimator.covariance(), rows.T @ rows / rows.shape[0], rtol=1e-12, atol=1e-12)
    assert estimator.covariance().dtype == torch.float64


def test_estimate_from_an_encoder_reports_progress():
    projection = torch.randn(16, 16)
    encode = lambda captions: torch.stack([torch.randn(5, 16) @ projection for _ in captions])
    seen = []
    covariance, count = estimate_covariance(encode, [f"caption {k}" for k in range(10)], batch_size=4,
                                            progress=lambda done, total: seen.append((done, total)))
    assert count == 50 and covariance.shape == (16, 16)
    assert seen == [(4, 10), (8, 10), (10, 10)]
    with pytest.raises(ValueError, match="no captions"):
        estimate_covariance(encode, [])


def test_ridge_inverse_inverts_and_regularises():
    c = random_covariance(64, seed=1)
    assert torch.allclose(ridge_inverse(c, ridge=0) @ c, torch.eye(64, dtype=torch.float64), atol=1e-8)
    lam = 1e-2 * torch.trace(c) / 64
    assert torch.allclose(ridge_inverse(c, ridge=1e-2), torch.linalg.inv(c + lam * torch.eye(64, dtype=torch.float64)))
    singular = torch.ones(8, 8, dtype=torch.float64)  # rank 1: only the ridge makes it invertible
    assert torch.isfinite(ridge_inverse(singular)).all()


def test_real_clip_covariance_is_spd_and_ill_conditioned():
    c = real_covariance()
    if c is None:
        pytest.skip("../shared/data/clip-vit-l14-text-covariance.safetensors is absent")
    eig = torch.linalg.eigvalsh(c)
    assert eig.min() > 0 and 1e3 < eig.max() / eig.min() < 1e4
    assert torch.allclose(ridge_inverse(c, ridge=0) @ c, torch.eye(768, dtype=torch.float64), atol=1e-6)


def test_cache_computes_once_per_fingerprint(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return random_covariance(8, seed=len(calls)), 100

    first = cached_covariance(tmp_path, "aaaa", compute, log=lambda m: None)
    again = cached_covariance(tmp_path, "aaaa", compute, log=lambda m: None)
    other = cached_covariance(tmp_path, "bbbb", compute, log=lambda m: None)
    assert len(calls) == 2
    assert torch.equal(first, again) and not torch.allclose(first, other)  # a hit gives the first run's C exactly
    assert sorted(p.name for p in tmp_path.iterdir()) == ["covariance-aaaa.safetensors", "covariance-bbbb.safetensors"]


def test_fingerprint_ignores_storage_precision_but_not_weights():
    weights = [torch.randn(100, 16), torch.randn(16)]
    assert fingerprint(weights) == fingerprint([w.half() for w in weights])
    assert fingerprint(weights) != fingerprint([weights[0] * 1.01, weights[1]])
    assert len(fingerprint(weights)) == 16
