"""Figures with their standard errors: per-image scores pooled over independent runs, the β-sweep Pareto fronts
(Fig. 9b) and ``lock_gain`` between them, with a bootstrap standard error and a verdict.

A *point* is one method at one β on one model: per-image fidelity scores and per-image alignment scores (the
fraction of its prompt's checks an image passes). Runs are independent (own concept renderings, training seed and
sampling seeds); a pooled point is the mean over every image of every run, its standard error the sample standard
deviation over those images divided by √n.
"""
from __future__ import annotations

import numpy as np


def mean_se(values) -> tuple[float, float]:
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")


def front(points: list[dict], f: float) -> float:
    """The Pareto front of a β sweep: the best alignment among its points with fidelity ≥ f."""
    return max((p["alignment"] for p in points if p["fidelity"] >= f), default=float("nan"))


def front_gain(locked: list[dict], trained_k: list[dict], grid: int = 200) -> tuple[float, dict]:
    """lock_gain: the mean of front(locked) − front(trained-K) over the fidelities both fronts reach (Fig. 9b compares
    the curves, not one β; a sweep need not be monotone in fidelity). Also each front's highest fidelity."""
    top = {"locked": max(p["fidelity"] for p in locked), "trained-K": max(p["fidelity"] for p in trained_k)}
    lo, hi = min(p["fidelity"] for p in locked + trained_k), min(top.values())
    fs = np.linspace(lo, hi, grid)
    return float(np.mean([front(locked, f) - front(trained_k, f) for f in fs])), top


def summarise(fidelity, alignment) -> dict:
    """A point's means and standard errors from its per-image scores."""
    (f, f_se), (a, a_se) = mean_se(fidelity), mean_se(alignment)
    return {"fidelity": f, "fidelity_se": f_se, "alignment": a, "alignment_se": a_se, "images": len(alignment)}


def bootstrap_gain(locked: list[tuple], trained_k: list[tuple], rounds: int = 400, seed: int = 0) -> float:
    """Standard error of :func:`front_gain` by resampling every point's images (``(fidelity, alignment)`` arrays)."""
    rng = np.random.default_rng(seed)
    draw = lambda f, a: {"fidelity": f[rng.integers(0, len(f), len(f))].mean(),
                         "alignment": a[rng.integers(0, len(a), len(a))].mean()}
    gains = [front_gain([draw(*p) for p in locked], [draw(*p) for p in trained_k])[0] for _ in range(rounds)]
    return float(np.std(gains, ddof=1))


def verdict(gain: float, se: float, per_run: list[float], margin: float = 0.05) -> str:
    """Decided when the pooled gain is beyond 2 standard errors and every run agrees in sign; equal when the whole
    ±2 SE interval lies within ±``margin``; otherwise undecided."""
    if abs(gain) > 2 * se and all(np.sign(g) == np.sign(gain) for g in per_run):
        return f"key lock {'ahead of' if gain > 0 else 'behind'} trained-K at matched fidelity"
    if abs(gain) + 2 * se < margin:
        return f"no difference: |lock_gain| + 2 SE < {margin}"
    return "undecided"
