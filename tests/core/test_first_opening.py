"""First-opening gates (``stack.first_opening``): Eq. 3's gate kept where it first opens in each text-encoder window,
against its closed form; the remainder e⊥ untouched; a second concept's trigger no longer opens the first's gate;
training takes the setting."""
import pytest
import torch

from dataclasses import replace

from perfusion_ops import ConceptError, ConceptStack, EditedProjection, SharedContext, first_opening
from perfusion_ops.edit import AppliedConcept, JointEdit
from perfusion_ops.training import TrainSettings, run
from test_edit_maths import D, OUT, concept_rows
from test_training import make
from tools.factories import random_concept, sample_encodings


def test_first_opening_is_each_gate_times_how_shut_the_earlier_gates_left_it():
    """g'_t = g_t Π_{u<t} (1 − g_u²), restarting at each window; a shorter last window; concepts independent."""
    g = torch.tensor([[0.1, 0.5], [0.9, 0.0], [0.8, 0.5], [0.2, 1.0], [0.5, 0.3]])
    shut = torch.tensor([[1.0, 1.0], [0.99, 0.75], [0.99 * 0.19, 0.75], [0.99 * 0.19 * 0.36, 0.75 * 0.75],
                         [0.99 * 0.19 * 0.36 * 0.96, 0.0]])
    assert torch.allclose(first_opening(g, 5), g * shut)
    assert torch.allclose(first_opening(g, 77), g * shut)  # one window longer than the prompt
    by_two = torch.tensor([[0.1, 0.5], [0.9 * 0.99, 0.0], [0.8, 0.5], [0.2 * 0.36, 0.75], [0.5, 0.3]])
    assert torch.allclose(first_opening(g, 2), by_two)
    ordinary = torch.full((76, 1), 0.07)  # β 0.4: a trigger late in a long prompt keeps most of its gate
    late = first_opening(torch.cat([ordinary, torch.tensor([[0.9]])]), 77)[-1]
    assert torch.allclose(late, torch.tensor(0.9 * (1 - 0.07**2) ** 76)) and late > 0.6
    batch = torch.stack([g, g.flip(0)])  # (B, T, J): each prompt on its own
    assert torch.allclose(first_opening(batch, 5)[1], first_opening(g.flip(0), 5))
    assert torch.equal(first_opening(g, 1), g)  # one-token windows: Eq. 3's gate


def leaky_prompt(cov, inputs, leak=1.1):
    """A causal encoder's prompt: ordinary tokens, trigger a at 2, tokens after it carrying a copy of it (s ≈ leak),
    and trigger b at 5 after a, as in 'on the left a sks and on the right a zwx'."""
    e = sample_encodings(cov, 8, seed=11).float() * 0.05
    e[2] = inputs[0]
    e[3:] += leak * inputs[0]
    e[5] += inputs[1]
    return e


def test_second_trigger_no_longer_opens_the_first_concepts_gate():
    cov, inputs, keys, _ = concept_rows(2, seed=3)
    inputs, keys = inputs.float(), keys.float()
    e = leaky_prompt(cov, inputs)
    paper = ConceptStack(inputs, keys, 0.7, 0.15)
    opened = ConceptStack(inputs, keys, 0.7, 0.15, windows=[77, 77])
    (rest, g, _), (rest_first, g_first, _) = paper.split(e[None]), opened.split(e[None])
    assert torch.equal(rest, rest_first)  # e⊥ (Eq. 10) does not depend on the gate
    assert g[0, 5, 0] > 0.9 and g[0, 3:, 0].min() > 0.9  # Eq. 3: a's gate open at b's trigger and after a
    assert g_first[0, 5, 0] < 0.01  # three tokens after a's trigger
    assert g_first[0, 3:, 0].max() <= 1 - g[0, 2, 0] ** 2  # at most what a's open trigger left of it
    # the ordinary tokens before a's trigger barely open it: there and at b's trigger for b, Eq. 3's gate stays
    assert torch.allclose(g_first[0, :3], g[0, :3], rtol=0.02)
    assert torch.allclose(g_first[0, 5, 1], g[0, 5, 1], rtol=0.02)


def test_edit_writes_the_first_concepts_output_only_at_its_trigger():
    """h = W e⊥ + Σ g'_j o_j, and b's trigger gets b's output alone."""
    cov, inputs, keys, outputs = concept_rows(2, seed=3)
    inputs, keys, outputs = inputs.float(), keys.float(), outputs.float()
    w = torch.randn(OUT, D, generator=torch.Generator().manual_seed(4)) / D**0.5
    e = leaky_prompt(cov, inputs)
    stack = ConceptStack(inputs, keys, 0.7, 0.15, windows=[77, 77])
    h = EditedProjection(lambda x: x @ w.T, SharedContext(stack, torch.zeros(2, D)), outputs)(e[None])[0]
    rest, g, _ = stack.split(e)
    assert torch.allclose(h, rest @ w.T + g @ outputs, atol=1e-4)
    assert torch.allclose(h[5], rest[5] @ w.T + g[5, 1] * outputs[1], atol=0.01 * outputs[0].abs().max())


def test_each_concept_keeps_the_gate_it_was_trained_with():
    """A concept file's gate_window chooses its gate in a joint edit: first-opening for one, Eq. 3's for the other."""
    cov, inputs, keys, _ = concept_rows(2, seed=3)
    inputs, keys = inputs.float(), keys.float()
    e = leaky_prompt(cov, inputs)[None]
    mixed = ConceptStack(inputs, keys, 0.7, 0.15, windows=[77, 0]).split(e)[1]
    assert torch.equal(mixed[..., 0], ConceptStack(inputs, keys, 0.7, 0.15, windows=[77, 77]).split(e)[1][..., 0])
    assert torch.equal(mixed[..., 1], ConceptStack(inputs, keys, 0.7, 0.15).split(e)[1][..., 1])
    a = replace(random_concept(seed=1, trigger="hugsy"), gate_window=77)
    b = random_concept(seed=2, trigger="kitto")
    assert JointEdit([AppliedConcept(a, 0.7, 0.15), AppliedConcept(b, 0.7, 0.15)]).shared.stack.window == 77
    assert JointEdit([AppliedConcept(b, 0.7, 0.15)]).shared.stack.window == 0
    other = replace(b, gate_window=75)
    with pytest.raises(ConceptError, match="'hugsy' and 'kitto' were trained with first-opening gates over windows "
                                           "of 77 and 75 tokens"):
        JointEdit([AppliedConcept(a, 0.7, 0.15), AppliedConcept(other, 0.7, 0.15)])


def test_bad_windows_are_refused():
    _, inputs, keys, _ = concept_rows(2)
    for windows in ([77], [-1, 0], [77, 75]):
        with pytest.raises(ValueError, match="one gate window per concept"):
            ConceptStack(inputs, keys, 0.7, 0.15, windows=windows)
    with pytest.raises(ValueError, match="sigmoid"):
        ConceptStack(inputs, keys, 0.7, 0.15, gated=False, windows=[77, 77])
    for window in (-1, 5000, 7.0, True):
        with pytest.raises(ConceptError, match="gate window"):
            TrainSettings(gate_window=window).check()
        with pytest.raises(ConceptError, match="gate window"):
            replace(random_concept(), gate_window=window).validate()


def test_training_uses_first_opening_gates_when_asked():
    """The toy host's encoder is causal: the loss differs with the setting, it still learns, and the concept says
    which gate it was trained with."""
    _, trainer, draw, fixed = make(steps=30, gate_window=8)
    _, paper, _, _ = make(steps=30)
    before = trainer.evaluate(*fixed)
    assert before != paper.evaluate(*fixed)
    assert run(trainer, draw).concept.gate_window == 8 and trainer.evaluate(*fixed) < 0.97 * before
