"""Train Concept measures where its concept's gate should open and saves that recommendation (perfusion_ops/
gate_choice.py), with a console line saying what it measured and chose; a failed measurement keeps the paper's gate
and the trained concept."""
from __future__ import annotations

import re

import pytest

import perfusion_ops.gate_choice
from perfusion_ops.concept_file import load_concept

from graphs import train_graph


def trained(comfy, checkpoint, photo, name):
    with comfy.capture_logs() as logs:
        concept, _ = comfy.run(train_graph(checkpoint, photo, name, "cat", name, steps=3), fresh=True)["train"]
    saved = load_concept(comfy.layout.folder("perfusion") / f"{name}.safetensors")
    assert saved.recommended("local") == pytest.approx(concept.recommended("local"), abs=1e-6)
    assert saved.recommended("global") == pytest.approx(concept.recommended("global"), abs=1e-6)
    return saved, logs


@pytest.mark.parametrize("min_gap", [-10.0, 10.0], ids=["gap", "no-gap"])
def test_training_saves_the_measured_gate_and_says_so(comfy, small_checkpoint, photo_name, monkeypatch, min_gap):
    """The gap a 3-step concept of a random model has is arbitrary, so the test sets the smallest gap that counts:
    -10 makes any a gap (the measured branch), 10 none (the paper's gate)."""
    monkeypatch.setattr(perfusion_ops.gate_choice, "MIN_GAP", min_gap)
    saved, logs = trained(comfy, small_checkpoint.name, photo_name, "gaty")
    line = next(line for line in logs if "gate for 'gaty'" in line)
    low, other, after = (float(x) for x in re.search(
        r"s at 'gaty' (-?[\d.]+)–.*other tokens up to (-?[\d.]+), after the trigger up to (-?[\d.]+)", line).groups())
    high = max(other, after)  # where the gate must stay shut
    info = re.search(r"s at the trigger >= (-?[\d.]+), at other tokens <= (-?[\d.]+)", saved.info["gate"]).groups()
    assert [float(x) for x in info] == pytest.approx([low, high], abs=0.006)
    if min_gap < 0:  # β in the middle of the gap, the global lock's below it, and the line names them
        assert saved.info["gate"].startswith("measured") and f"β {saved.beta_local:.2f}, τ" in line, line
        assert saved.beta_local == pytest.approx((low + high) / 2, abs=0.01)
        assert saved.beta_global == pytest.approx(high + (low - high) / 3, abs=0.01) and saved.tau_local > 0
    else:  # no gap: the paper's gate, and the line says how to choose another
        assert saved.info["gate"].startswith("the paper's (no gap)")
        assert "no gap: " in line and "set Apply's gate to 'beta and tau widgets'" in line, line
        assert saved.recommended("local") == pytest.approx((0.7, 0.15)) and saved.beta_global == pytest.approx(0.5)


def test_a_failed_measurement_keeps_the_paper_gate_and_the_concept(comfy, small_checkpoint, photo_name, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access (test)")

    monkeypatch.setattr(comfy.adapter.train, "choose_gate", broken)
    saved, logs = trained(comfy, small_checkpoint.name, photo_name, "gatefail")
    assert any("measuring the gate of 'gatefail' failed (RuntimeError: CUDA error" in line for line in logs), logs
    assert (saved.info["gate"] == "the paper's (not measured)"
            and saved.recommended("local") == pytest.approx((0.7, 0.15)))
