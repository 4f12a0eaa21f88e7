"""Choosing the inference gate from measured similarities (perfusion_ops/gate_choice.py), and the i EMA scaled to the
run's length (TrainSettings.run_ema_decay)."""
import math

import pytest
import torch

from perfusion_ops.gate_choice import OPEN, caption_sample, choose_gate, gate_from_gap
from perfusion_ops.stack import gate
from perfusion_ops.training import Sample, TrainSettings, Trainer
from tools.factories import random_concept
from toy_host import WIDTH, ToyHost

D = 768


def axis_concept(**fields):
    """A concept whose s(e) is e[0]: i = q = the first axis (C⁻¹ = I), so each test sets s by hand."""
    concept = random_concept(layers={"a": 4}, width=D, **fields)
    axis = torch.zeros(D)
    axis[0] = 1.0
    concept.target_input, concept.target_key = axis, axis.clone()
    return concept


def rows(values):
    """Encodings whose s are ``values`` (other coordinates random, s ignores them)."""
    out = torch.randn(*torch.as_tensor(values).shape, D, generator=torch.Generator().manual_seed(0))
    out[..., 0] = torch.as_tensor(values, dtype=torch.float32)
    return out


def fake_encoders(trigger_s, following_s, other_s):
    """``encode``: each held-out prompt is [BOS 0.0, trigger, following...]; ``encode_plain``: every prompt is
    other_s."""
    def encode(prompts, trigger, embedding):
        context = rows([[0.0, t, *following_s] for t in trigger_s[:len(prompts)]])
        return context, context[:, 1]

    def encode_plain(prompts):
        return rows([other_s] * len(prompts))
    return encode, encode_plain


def test_the_chosen_gate_opens_at_the_lowest_trigger_and_shuts_at_the_highest_other_token():
    beta_local, beta_global, tau = gate_from_gap(0.9, 0.4)
    assert beta_local == pytest.approx(0.65) and beta_global == pytest.approx(0.4 + 0.5 / 3)
    assert tau == pytest.approx(0.5 / (2 * math.log(19)))
    g = lambda s, beta: float(gate(torch.tensor(s), torch.tensor(beta), torch.tensor(tau)))  # noqa: E731
    assert g(0.9, beta_local) == pytest.approx(OPEN) and g(0.4, beta_local) == pytest.approx(1 - OPEN)
    assert g(0.9, beta_global) > OPEN and g(0.4, beta_global) > 1 - OPEN  # global: opens wider, shuts less


@pytest.mark.parametrize("low, high, tau", [(1.0, 0.94, 0.02), (3.0, -3.0, 0.5)])
def test_tau_stays_in_its_range(low, high, tau):
    assert gate_from_gap(low, high)[2] == tau  # unclamped: 0.010 and 1.02


@pytest.mark.parametrize("low, high", [(0.5, 0.5), (0.5, 0.7), (0.52, 0.5), (float("nan"), 0.2), (5.0, 2.5)])
def test_no_gap_gives_no_gate(low, high):
    assert gate_from_gap(low, high) is None


@pytest.mark.parametrize("following, shut", [([0.3, 0.2], 0.4), ([0.8, 0.6], 0.8)])
def test_choose_gate_keeps_it_shut_at_other_tokens_and_after_the_trigger(following, shut):
    """The gate must stay shut at the captions' tokens and at the tokens after the trigger (a causal encoder copies
    it there), whichever is higher."""
    concept = axis_concept()
    encode, encode_plain = fake_encoders([1.1, 0.9, 1.3], following, [0.1, 0.4, -0.2])
    choice = choose_gate(concept, encode, encode_plain, ["a caption", "another"], prompts=("a {}", "b {}", "c {}"))
    assert choice.chosen
    assert (choice.trigger_low, choice.other_high, choice.following_high) == pytest.approx((0.9, 0.4, max(following)))
    assert choice.shut_high == pytest.approx(shut) and choice.gap == pytest.approx(0.9 - shut)
    assert choice.trigger_mean == pytest.approx(1.1)
    assert (choice.beta_local, choice.beta_global) == pytest.approx(gate_from_gap(0.9, shut)[:2])
    assert choice.fields() == {"beta_local": choice.beta_local, "tau_local": choice.tau_local,
                               "beta_global": choice.beta_global, "tau_global": choice.tau_local}
    line = choice.describe("hugsy")
    assert "s at 'hugsy' 0.90–1.10" in line and "other tokens up to 0.40" in line, line
    assert f"after the trigger up to {max(following):.2f}" in line and f"β {(0.9 + shut) / 2:.2f}" in line, line
    assert choice.summary == f"measured: s at the trigger >= 0.900, at other tokens <= {shut:.3f}"


def test_a_trigger_copied_into_later_tokens_above_itself_leaves_no_gap():
    concept = axis_concept()
    encode, encode_plain = fake_encoders([0.6, 0.7], [0.65], [0.2])
    choice = choose_gate(concept, encode, encode_plain, ["x"], prompts=("a {}", "b {}"))
    assert not choice.chosen and choice.other_high == pytest.approx(0.2) and choice.gap < 0
    assert "no gap: the words after the trigger carry it as strongly as the trigger itself" in choice.describe("x")


def test_first_opening_concepts_need_the_gap_to_the_other_prompts_tokens_only():
    """The trigger shuts a first-opening gate for the words after it, so they do not close the gap."""
    concept = axis_concept()
    concept.gate_window = 77
    encode, encode_plain = fake_encoders([0.6, 0.7], [0.65], [0.2])
    choice = choose_gate(concept, encode, encode_plain, ["x"], prompts=("a {}", "b {}"))
    assert choice.chosen and choice.shut_high == pytest.approx(0.2) and choice.gap == pytest.approx(0.4)
    assert (choice.beta_local, choice.beta_global) == pytest.approx(gate_from_gap(0.6, 0.2)[:2])
    assert "after the trigger up to 0.65 (shut there by first-opening gates) → β 0.40" in choice.describe("x")


def test_without_a_gap_the_paper_gate_is_kept_and_the_line_says_what_to_do():
    concept = axis_concept()
    encode, encode_plain = fake_encoders([0.5, 0.6], [0.3], [0.55])
    choice = choose_gate(concept, encode, encode_plain, ["x"], prompts=("a {}", "b {}"))
    assert not choice.chosen
    assert (choice.beta_local, choice.tau_local) == concept.recommended("local")
    assert (choice.beta_global, choice.tau_global) == concept.recommended("global")
    assert "no gap: the trigger does not stand out from other words yet: train more steps" in choice.describe("hugsy")


def test_superclass_prompts_count_as_other_tokens():
    seen = []
    concept = axis_concept(superclass="teddy")
    encode, plain = fake_encoders([1.0], [0.2], [0.1])
    choose_gate(concept, encode, lambda p: seen.extend(p) or plain(p), ["a caption"], prompts=("a {} here",))
    assert seen == ["a caption", "a teddy here"]


def test_caption_sample_spreads_over_the_corpus():
    assert caption_sample([str(k) for k in range(10)], 4) == ["0", "2", "5", "7"]
    assert caption_sample([str(k) for k in range(300)], 256)[-1] == "298"  # spread to the end, not the first 256
    assert caption_sample(["a", "b"], 256) == ["a", "b"]


@pytest.mark.parametrize("steps, accum, decay", [(400, 4, 0.99), (30, 1, 0.01 ** (1 / 30)), (10, 3, 0.01 ** (1 / 30))])
def test_the_ema_decay_is_scaled_so_short_runs_leave_at_most_one_percent_of_e_sup(steps, accum, decay):
    settings = TrainSettings(steps=steps, grad_accum=accum)
    assert settings.run_ema_decay == pytest.approx(decay)
    assert settings.run_ema_decay ** (steps * accum) <= 0.01 + 1e-9


def test_training_tracks_i_with_the_scaled_decay():
    host = ToyHost()
    settings = TrainSettings(steps=2, batch_size=2, grad_accum=1)
    trainer = Trainer(host, "hugsy", "teddy", torch.eye(WIDTH), settings)
    i0 = trainer.params.target_input.clone()
    prompts = ["a photo of a hugsy"] * 2
    sample = Sample(torch.zeros(2, 4, 4, 4), None, prompts)
    with host.install(trainer.forwards()), torch.no_grad():
        _, encodings = host.encode(prompts, "hugsy", trainer.params.embedding)
        trainer.loss(sample, torch.zeros(2, 4, 4, 4), torch.tensor([1, 2]))
    assert torch.allclose(trainer.params.target_input, 0.1 * i0 + 0.9 * encodings.mean(0), atol=1e-6)
