"""Train Concept measures where its concept's gate should open and saves that recommendation (perfusion_ops/
gate_choice.py), with a console line saying what it measured and chose."""
from __future__ import annotations

import re

import pytest

from graphs import train_graph


def test_training_saves_the_measured_gate_and_says_so(comfy, small_checkpoint, photo_name):
    with comfy.capture_logs() as logs:
        concept, _ = comfy.run(train_graph(small_checkpoint.name, photo_name, "gaty", "cat", "gaty", steps=3),
                               fresh=True)["train"]
    line = next(line for line in logs if "gate for 'gaty'" in line)
    saved = comfy.pack.perfusion_ops.concept_file.load_concept(comfy.layout.folder("perfusion") / "gaty.safetensors")
    assert saved.recommended("local") == pytest.approx(concept.recommended("local"), abs=1e-6)
    assert saved.recommended("global") == pytest.approx(concept.recommended("global"), abs=1e-6)
    low, other, after = (float(x) for x in re.search(
        r"s at 'gaty' (-?[\d.]+)–.*other tokens up to (-?[\d.]+), after the trigger up to (-?[\d.]+)", line).groups())
    high = max(other, after)  # where the gate must stay shut
    info = re.search(r"s at the trigger >= (-?[\d.]+), at other tokens <= (-?[\d.]+)", saved.info["gate"]).groups()
    assert [float(x) for x in info] == pytest.approx([low, high], abs=0.006)
    if saved.info["gate"].startswith("measured"):  # a gap: β in its middle, and the line names it
        assert low - high >= 0.05 and f"β {saved.beta_local:.2f}" in line
        assert saved.beta_local == pytest.approx((low + high) / 2, abs=0.01) and saved.beta_global < saved.beta_local
    else:  # no gap: the paper's gate, and the line says what to do
        assert low - high < 0.05 + 0.01 and "no gap: " in line and "set beta on Apply" in line
        assert saved.recommended("local") == pytest.approx((0.7, 0.15)) and saved.beta_global == pytest.approx(0.5)
