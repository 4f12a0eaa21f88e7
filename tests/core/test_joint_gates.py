"""Joint gates (``ConceptStack(joint_gates=True)``): each gate reads the concept's coordinate in the basis of all
target inputs, c = M⁻¹ Q e, instead of Eq. 4's s_j. Against the rank-J closed form; equal to the paper's gate for
one concept and for metric-orthogonal ones; a trigger no longer opens a correlated concept's gate."""
import pytest
import torch

from perfusion_ops import ConceptStack
from perfusion_ops.edit import AppliedConcept, JointEdit
from test_edit_maths import OUT, concept_rows, correlated_concepts
from tools.factories import sample_encodings


def rows(a, b):
    """(I, Q, O) of two concepts, float64."""
    stack = lambda name: torch.stack([getattr(a, name).double(), getattr(b, name).double()])
    return stack("target_input"), stack("target_key"), torch.stack([a.value_outputs["layer"].double(),
                                                                     b.value_outputs["layer"].double()])


def edit(stack, w, outputs, e):
    """h = W e⊥ + Σ w_j o_j."""
    rest, _, weights = stack.split(e)
    return rest.double() @ w.T + weights.double() @ outputs


def test_linear_joint_gates_are_the_rank_j_closed_form():
    """With s in place of σ: h = W e + (Oᵀ − W Iᵀ) M⁻¹ Q e, so every i_j maps to o_j exactly; Eq. 4 adds the other
    concept's output at a trigger in proportion to their correlation."""
    cov, a, b = correlated_concepts(0.7)
    inputs, keys, outputs = rows(a, b)
    w = torch.randn(OUT, inputs.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(1)) / 28
    e = torch.cat([inputs, sample_encodings(cov, 32, seed=2)])
    joint = ConceptStack(inputs.float(), keys.float(), 0.7, 0.15, gated=False, joint_gates=True)
    h = edit(joint, w, outputs, e.float())
    closed = e @ w.T + (e @ keys.T) @ torch.linalg.inv(keys @ inputs.T).T @ (outputs - inputs @ w.T)
    assert torch.allclose(h, closed, atol=1e-4 * closed.abs().max())
    assert torch.allclose(h[:2], outputs, atol=1e-4 * outputs.abs().max())
    paper = edit(ConceptStack(inputs.float(), keys.float(), 0.7, 0.15, gated=False), w, outputs, inputs.float())
    leak = (keys[1] @ inputs[0]) / (keys[1] @ inputs[1])  # s_b(i_a)
    assert leak > 0.3 and torch.allclose(paper[0], outputs[0] + leak * outputs[1], atol=1e-3 * outputs.abs().max())


@pytest.mark.parametrize("j", [1, 3])
def test_joint_gates_are_the_papers_for_one_concept_and_for_orthogonal_ones(j):
    cov, inputs, keys, _ = concept_rows(j, seed=5)
    if j > 1:  # correlated target inputs made metric-orthogonal: Gram–Schmidt in the C⁻¹ metric
        inverse = keys.T @ torch.linalg.pinv(inputs.T)  # C⁻¹ on span{i}
        inputs[1:] += inputs[0]
        for n in range(1, j):
            for m in range(n):
                inputs[n] -= (inputs[n] @ inverse @ inputs[m]) / (inputs[m] @ inverse @ inputs[m]) * inputs[m]
        keys = inputs @ inverse.T
        assert (keys @ inputs.T - torch.diag(torch.diagonal(keys @ inputs.T))).abs().max() < 1e-8 * keys.abs().max()
    e = torch.cat([inputs, sample_encodings(cov, 64, seed=6)]).float()
    paper = ConceptStack(inputs.float(), keys.float(), 0.7, 0.15).split(e)
    joint = ConceptStack(inputs.float(), keys.float(), 0.7, 0.15, joint_gates=True).split(e)
    assert torch.equal(paper[0], joint[0])  # e⊥ does not depend on the gate
    assert torch.allclose(paper[1], joint[1], atol=1e-5)


def test_a_trigger_opens_no_other_concepts_joint_gate():
    """At i_a, Eq. 4 opens b's gate by σ((s_b(i_a) − β)/τ); joint gates give b σ(−β/τ) and a σ((1 − β)/τ)."""
    _, a, b = correlated_concepts(0.9)
    inputs, keys, _ = rows(a, b)
    paper = ConceptStack(inputs.float(), keys.float(), 0.7, 0.15).split(inputs.float())[1]
    joint = ConceptStack(inputs.float(), keys.float(), 0.7, 0.15, joint_gates=True).split(inputs.float())[1]
    assert paper[0, 1] > 0.5 or paper[1, 0] > 0.5  # the larger concept's trigger opens the other's gate
    shut, open_ = torch.sigmoid(torch.tensor(-0.7 / 0.15)), torch.sigmoid(torch.tensor(0.3 / 0.15))
    assert torch.allclose(joint, torch.tensor([[open_, shut], [shut, open_]]), atol=1e-4)
    applied = [AppliedConcept(a, 0.7, 0.15), AppliedConcept(b, 0.7, 0.15)]
    assert torch.equal(JointEdit(applied, joint_gates=True).shared.stack.split(inputs.float())[1], joint)
    assert torch.equal(JointEdit(applied).shared.stack.split(inputs.float())[1], paper)
