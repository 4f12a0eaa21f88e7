"""The gated rank-1 edit against the paper's closed forms (Eq. 1–4, 10; App. A, B)."""
import pytest
import torch

from tools.factories import random_concept, random_covariance, real_covariance, sample_encodings
from perfusion_ops import ConceptStack, EditedProjection, SharedContext, gate, similarity
from perfusion_ops.covariance import ridge_inverse
from perfusion_ops.edit import AppliedConcept, JointEdit, ScheduledEdit

D, OUT = 768, 320


def covariance():
    real = real_covariance()
    return real if real is not None else random_covariance(D, seed=7)


def concept_rows(j, seed=0, cov=None):
    """J target inputs drawn like encodings, their keys q = C⁻¹ i, and J random target outputs."""
    cov = covariance() if cov is None else cov
    inputs = sample_encodings(cov, j, seed)
    keys = inputs @ ridge_inverse(cov, ridge=0).T
    outputs = torch.randn(j, OUT, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return cov, inputs, keys, outputs


def edited(w, inputs, keys, outputs, beta=0.7, tau=0.15, gated=True, e_sup=None):
    stack = ConceptStack(inputs, keys, beta, tau, gated=gated)
    shared = SharedContext(stack, e_sup if e_sup is not None else torch.zeros_like(inputs))
    return EditedProjection(lambda x: x @ w.T, shared, outputs)


def test_linear_gate_equals_rome_closed_form():
    """Eq. 1 / App. A: with σ replaced by s, h = Ŵ e with Ŵ = W + Λ (C⁻¹ i)ᵀ, Λ = (o − W i) / (iᵀ C⁻¹ i)."""
    cov, inputs, keys, outputs = concept_rows(1)
    w = torch.randn(OUT, D, dtype=torch.float64) / D**0.5
    i, q, o = inputs[0], keys[0], outputs[0]
    w_hat = w + torch.outer((o - w @ i) / (i @ q), q)
    e = sample_encodings(cov, 64, seed=3)
    e[0] = i
    h = edited(w.float(), inputs.float(), keys.float(), outputs.float(), gated=False)(e.float())
    reference = e @ w_hat.T
    assert torch.allclose(h.double(), reference, rtol=1e-4, atol=1e-4 * reference.abs().max())
    assert torch.allclose(h[0].double(), o, rtol=1e-4, atol=1e-4)  # ROME maps i exactly to o


@pytest.mark.parametrize("j", [1, 2, 4])
def test_remainder_is_metric_orthogonal_to_every_target_input(j):
    """Eq. 10: q_j · e⊥ = 0 (e⊥ ⟂ i_j in the C⁻¹ metric), and e⊥ differs from e only within span{i}."""
    cov, inputs, keys, _ = concept_rows(j)
    stack = ConceptStack(inputs.float(), keys.float(), 0.7, 0.15)
    e = sample_encodings(cov, 200, seed=5).float()
    e_perp = stack.remainder(e)
    cosine = (e_perp.double() @ keys.T) / (e_perp.double().norm(dim=-1, keepdim=True) * keys.norm(dim=-1))
    assert cosine.abs().max() < 1e-4
    residual = e.double() - e_perp.double()  # must lie in span{i_j}
    coeffs = torch.linalg.lstsq(inputs.T, residual.T).solution
    assert torch.allclose(inputs.T @ coeffs, residual.T, atol=1e-3 * residual.abs().max())
    assert stack.remainder(inputs.float()).abs().max() < 1e-3 * inputs.abs().max()  # i_j itself vanishes


@pytest.mark.parametrize("j", [1, 3])
def test_saturated_gate_maps_each_target_input_to_its_output(j):
    cov, inputs, keys, outputs = concept_rows(j, seed=11)
    cross = similarity(inputs, inputs, keys) - torch.eye(j, dtype=torch.float64)
    assert cross.abs().max() < 0.4  # the concepts are distinct, so other gates stay shut at i_j
    w = torch.randn(OUT, D) / D**0.5
    h = edited(w, inputs.float(), keys.float(), outputs.float(), beta=0.7, tau=0.01)(inputs.float())
    assert torch.allclose(h.double(), outputs, atol=1e-3 * outputs.abs().max())


def test_single_concept_reduces_to_equation_3():
    """J = 1: h = W (e − i s(e)) + o σ((s(e) − β)/τ) with s(e) = e·C⁻¹i / i·C⁻¹i."""
    cov, inputs, keys, outputs = concept_rows(1, seed=2)
    w = torch.randn(OUT, D, dtype=torch.float64) / D**0.5
    e = sample_encodings(cov, 32, seed=9)
    e[:4] = inputs[0] * torch.tensor([[1.0], [0.8], [0.5], [2.0]], dtype=torch.float64)
    s = (e @ keys[0]) / (inputs[0] @ keys[0])
    reference = (e - s[:, None] * inputs[0]) @ w.T + torch.sigmoid((s - 0.6) / 0.15)[:, None] * outputs[0]
    h = edited(w.float(), inputs.float(), keys.float(), outputs.float(), beta=0.6, tau=0.15)(e.float())
    assert torch.allclose(h.double(), reference, rtol=1e-4, atol=1e-4 * reference.abs().max())


def test_shut_gate_leaves_outputs_unchanged():
    """A concept whose gate is shut adds nothing: where e is C⁻¹-orthogonal to i, h = W e exactly; and adding
    a shut concept B to A changes A's outputs only by W of the removed i_B component."""
    cov, inputs, keys, outputs = concept_rows(2, seed=4)
    w = torch.randn(OUT, D) / D**0.5
    e = sample_encodings(cov, 50, seed=8)
    e_orth = e - torch.outer(e @ keys[0] / (inputs[0] @ keys[0]), inputs[0])
    single = edited(w, inputs[:1].float(), keys[:1].float(), outputs[:1].float(), beta=0.7, tau=0.05)
    assert torch.allclose(single(e_orth.float()), e_orth.float() @ w.T, rtol=1e-4, atol=1e-4)

    shut = edited(w, inputs.float(), keys.float(), outputs.float(), beta=torch.tensor([0.7, 2.0]), tau=0.05)
    stack_b = ConceptStack(inputs.float(), keys.float(), torch.tensor([0.7, 2.0]), 0.05)
    gates = stack_b.split(e.float())[1]
    assert gates[:, 1].max() < 1e-6
    removed = (single.shared.stack.remainder(e.float()) - stack_b.remainder(e.float())) @ w.T
    assert torch.allclose(shut(e.float()), single(e.float()) - removed, atol=1e-4)


def test_gate_is_monotone_in_beta_and_sharp_in_tau():
    s = torch.linspace(-0.5, 1.5, 21)
    assert torch.all(gate(s, 0.6, 0.15) >= gate(s, 0.75, 0.15))
    assert gate(torch.tensor(1.0), 0.6, 0.01) > 0.999 and gate(torch.tensor(0.2), 0.6, 0.01) < 1e-6


@pytest.mark.parametrize("dtype,tolerance", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_host_dtype_precision_against_float64(dtype, tolerance):
    """Internals run in float32 whatever the host dtype: fp16/bf16 hosts stay within their own precision."""
    cov = real_covariance()
    if cov is None:
        pytest.skip("../shared/data/clip-vit-l14-text-covariance.safetensors is absent")
    _, inputs, keys, outputs = concept_rows(2, seed=21, cov=cov)
    w = (torch.randn(OUT, D) / D**0.5).to(dtype)
    e = sample_encodings(cov, 77, seed=22)
    e[3], e[9] = inputs[0], inputs[1] * 1.1
    e = e.to(dtype)
    module = torch.nn.Linear(D, OUT, bias=False).to(dtype)
    module.weight.data = w
    store = lambda t: t.to(torch.float16).float()  # concept tensors as the file stores them
    stack = ConceptStack(store(inputs), store(keys), 0.7, 0.15)
    h = EditedProjection(module, SharedContext(stack, torch.zeros(2, D)), store(outputs))(e)
    assert h.dtype == dtype

    i64, q64, o64, w64, e64 = (t.double() for t in (store(inputs), store(keys), store(outputs), w, e))
    m = q64 @ i64.T
    proj = e64 @ q64.T
    s = proj / torch.diagonal(m)
    reference = (e64 - proj @ torch.linalg.solve(m.T, i64)) @ w64.T + torch.sigmoid((s - 0.7) / 0.15) @ o64
    error = (h.double() - reference).norm() / reference.norm()
    assert error < tolerance

    big = e.double() / e.double().norm(dim=-1, keepdim=True) * 1e3
    assert torch.isfinite(EditedProjection(module, SharedContext(stack, torch.zeros(2, D)),
                                           store(outputs))(big.to(dtype))).all()


def test_gradients_reach_only_learned_outputs_and_embedding():
    """Training: the trigger embedding and o_V learn; W, the text encoder, i, q and key-locked o_K do not."""
    torch.manual_seed(0)
    concept = random_concept(layers={"layer": OUT})
    encoder = torch.nn.Linear(D, D)
    encoder.requires_grad_(False)
    embedding = torch.nn.Parameter(torch.randn(1, D))
    o_v = torch.nn.Parameter(concept.value_outputs["layer"].clone()[None])
    to_k, to_v = torch.nn.Linear(D, OUT, bias=False), torch.nn.Linear(D, OUT, bias=False)
    for module in (to_k, to_v):
        module.requires_grad_(False)
    edit = JointEdit([AppliedConcept(concept, 0.75, 0.1)])
    tokens = torch.cat([torch.randn(5, D), embedding, torch.randn(3, D)])
    context = encoder(tokens)[None]
    k = edit.projection("layer", "k", to_k)(context)
    v = EditedProjection(to_v, edit.shared, o_v)(context)
    (k.square().sum() + v.square().sum()).backward()
    assert embedding.grad is not None and embedding.grad.abs().sum() > 0
    assert o_v.grad is not None and o_v.grad.abs().sum() > 0
    assert all(p.grad is None for p in (*encoder.parameters(), to_k.weight, to_v.weight))
    assert not edit.shared.stack.inputs.requires_grad and not edit.shared.stack.keys.requires_grad


def test_context_work_is_shared_and_keyed_on_the_context():
    concept = random_concept(layers={"a": 8, "b": 16})
    edit = JointEdit([AppliedConcept(concept, 0.7, 0.15)])
    calls = []
    original = edit.shared.stack.split
    edit.shared.stack.split = lambda e: calls.append(e) or original(e)
    first, second = torch.randn(2, 77, D), torch.randn(2, 154, D)  # a long prompt: two 77-token chunks
    for layer, width in (("a", 8), ("b", 16)):
        for path in "kv":
            module = torch.nn.Linear(D, width, bias=False)
            assert edit.projection(layer, path, module)(first).shape == (2, 77, width)
            assert edit.projection(layer, path, module)(second).shape == (2, 154, width)
    assert len(calls) == 2  # one split per context, whatever the number of projections


def test_key_lock_takes_outputs_from_the_host_weights():
    """Locked K: o_K = W_K e_sup from the projection it wraps, so another checkpoint's W_K gives its own keys."""
    cov, inputs, keys, _ = concept_rows(1, seed=31)
    concept = random_concept(layers={"layer": OUT}, covariance=cov)
    edit = JointEdit([AppliedConcept(concept, 0.5, 0.01)])
    for seed in (1, 2):
        w = torch.randn(OUT, D, generator=torch.Generator().manual_seed(seed)) / D**0.5
        h = edit.projection("layer", "k", lambda x: x @ w.T)(concept.target_input[None])
        assert torch.allclose(h[0], concept.superclass_encoding @ w.T, rtol=1e-4, atol=1e-4)


def test_invalid_stacks_are_refused():
    _, inputs, keys, _ = concept_rows(2)
    with pytest.raises(ValueError, match="τ"):
        ConceptStack(inputs, keys, 0.7, 0.0)
    with pytest.raises(ValueError, match="linearly dependent"):
        ConceptStack(torch.cat([inputs[:1], inputs[:1]]), torch.cat([keys[:1], keys[:1]]), 0.7, 0.1)


def test_strength_scales_each_concept_term_from_host_to_full_edit():
    """strength 0 is the host projection bit for bit, 1 the paper's edit, and terms scale one concept at a time."""
    cov, inputs, keys, outputs = concept_rows(2, seed=41)
    w = torch.randn(OUT, D) / D**0.5
    e = sample_encodings(cov, 20, seed=42).float()
    e[3] = inputs[0].float()

    def run(strength):
        stack = ConceptStack(inputs.float(), keys.float(), 0.6, 0.15, strength=strength)
        return EditedProjection(lambda x: x @ w.T, SharedContext(stack, torch.zeros(2, D)), outputs.float())(e)

    host, full = e @ w.T, run(None)
    assert torch.equal(run([0.0, 0.0]), host) and torch.equal(run([1.0, 1.0]), full)
    only_a, only_b = run([1.0, 0.0]), run([0.0, 1.0])
    blend = host + 0.3 * (only_a - host) + 0.7 * (only_b - host)
    assert torch.allclose(run([0.3, 0.7]), blend, atol=1e-4)
    with pytest.raises(ValueError, match="one strength per concept"):
        ConceptStack(inputs.float(), keys.float(), 0.6, 0.15, strength=[1.0])


def correlated_concepts(correlation, seed=50):
    """Concepts A and B (q = C⁻¹ i each) whose target inputs have metric correlation ``correlation``
    (i_A·C⁻¹ i_B / (|i_A| |i_B|) in the C⁻¹ metric)."""
    cov = covariance()
    inverse = ridge_inverse(cov, ridge=0)
    a, b = (random_concept(seed=seed + n, layers={"layer": OUT}, covariance=cov, trigger=t)
            for n, t in enumerate(("conca", "concb")))
    i_a, other = a.target_input.double(), b.target_input.double()
    norm = lambda v: v / (v @ inverse @ v).sqrt()
    unit_a = norm(i_a)
    across = norm(other - (other @ inverse @ unit_a) * unit_a)  # metric-orthogonal to i_A
    i_b = (correlation * unit_a + (1 - correlation**2) ** 0.5 * across) * (other @ inverse @ other).sqrt()
    b.target_input, b.target_key = i_b.float(), (inverse @ i_b).float()
    assert abs(float(i_a @ inverse @ i_b / ((i_a @ inverse @ i_a) * (i_b @ inverse @ i_b)).sqrt())
               - correlation) < 1e-6
    return cov, a.validate(), b.validate()


@pytest.mark.parametrize("correlation", [0.0, 0.3, 0.7])
def test_a_strength_zero_concept_leaves_the_edit_exactly_as_without_it(correlation):
    """'0 leaves the model exactly as without the tag': B at strength 0 next to A is A alone, bit for bit, whatever
    their inputs' correlation (the remainder of Eq. 10 no longer spans i_B), and with every concept at 0 the
    projection is the host's own."""
    cov, a, b = correlated_concepts(correlation)
    w = torch.randn(OUT, D, generator=torch.Generator().manual_seed(8)) / D**0.5
    host = lambda x: x @ w.T
    e = sample_encodings(cov, 40, seed=9).float().reshape(2, 20, D)
    e[0, 3], e[1, 7] = a.target_input, b.target_input  # both gates open somewhere
    alone = JointEdit([AppliedConcept(a, 0.6, 0.15)])
    for applied in ([AppliedConcept(a, 0.6, 0.15), AppliedConcept(b, 0.5, 0.2, strength=0.0)],
                    [AppliedConcept(b, 0.5, 0.2, strength=0.0), AppliedConcept(a, 0.6, 0.15)]):
        joint = JointEdit(applied)
        for path in "kv":
            assert torch.equal(joint.projection("layer", path, host)(e), alone.projection("layer", path, host)(e))
    off = JointEdit([AppliedConcept(a, 0.6, 0.15, strength=0.0), AppliedConcept(b, 0.5, 0.2, strength=0.0)])
    assert all(off.projection("layer", path, host) is host for path in "kv")
    with_b = JointEdit([AppliedConcept(a, 0.6, 0.15), AppliedConcept(b, 0.5, 0.2)]).projection("layer", "v", host)(e)
    assert not torch.allclose(with_b, alone.projection("layer", "v", host)(e))  # B at strength 1 does change it


def test_an_in_place_change_of_the_context_is_seen():
    """The per-context cache keys on the tensor's version too: a context changed in place (same storage, same
    shape) gets fresh gates and remainders, not the ones of its old values."""
    concept = random_concept(layers={"a": 8})
    edit = JointEdit([AppliedConcept(concept, 0.7, 0.15)])
    module = torch.nn.Linear(D, 8, bias=False)
    projection = edit.projection("a", "v", module)
    with torch.no_grad():
        context = torch.randn(1, 77, D)
        before = projection(context)
        context[0, 5] = concept.target_input  # the trigger appears: its gate must open
        after = projection(context)
        fresh = projection(context.clone())
    assert torch.equal(after, fresh) and not torch.equal(after, before)


def test_a_scheduled_edit_is_the_joint_edit_of_the_concepts_in_range():
    """Concepts out of their start_at–end_at range take no part: the edit of those in range is the joint edit of them
    alone (bit for bit), with none in range it is the host projection, and it follows each select."""
    cov, a, b = correlated_concepts(0.3)
    w = torch.randn(OUT, D, generator=torch.Generator().manual_seed(3)) / D**0.5
    host = lambda x: x @ w.T
    e = sample_encodings(cov, 40, seed=4).float().reshape(2, 20, D)
    e[0, 3], e[1, 7] = a.target_input, b.target_input
    applied = [AppliedConcept(a, 0.6, 0.15, start_at=0.0, end_at=0.5), AppliedConcept(b, 0.5, 0.2, start_at=0.3)]
    scheduled = ScheduledEdit(applied)
    assert scheduled.scheduled and not ScheduledEdit([AppliedConcept(a, 0.6, 0.15)]).scheduled
    edits = {path: scheduled.projection("layer", path, host) for path in "kv"}
    want = {(True, True): JointEdit(applied), (True, False): JointEdit(applied[:1]),
            (False, True): JointEdit(applied[1:])}
    for flags in [(True, False), (False, True), (True, True), (False, False), (True, False)]:
        assert scheduled.select(flags) == any(flags)
        for path in "kv":
            expected = host(e) if not any(flags) else want[flags].projection("layer", path, host)(e)
            assert torch.equal(edits[path](e), expected), (flags, path)
    assert not ScheduledEdit([AppliedConcept(a, 0.6, 0.15, strength=0.0)]).select((True,))  # in range, strength 0


@pytest.mark.parametrize("start, end", [(0.6, 0.4), (-0.1, 1.0), (0.0, 1.5), (float("nan"), 1.0)])
def test_schedule_ranges_outside_zero_to_one_are_refused(start, end):
    concept = random_concept(layers={"a": 8})
    with pytest.raises(ValueError, match="start_at .* end_at"):
        AppliedConcept(concept, 0.7, 0.15, start_at=start, end_at=end)


@pytest.mark.parametrize("lock, trained, message", [
    ("sideways", False, "unknown lock mode 'sideways'"),
    ("trained-k", False, "was trained key-locked and has no trained K outputs; use lock mode 'local'"),
])
def test_lock_modes_a_concept_cannot_take_are_refused(lock, trained, message):
    concept = random_concept(layers={"a": 8}, trained_k=trained)
    with pytest.raises(ValueError, match=message):
        AppliedConcept(concept, 0.7, 0.15, lock=lock)


def test_prepared_context_keeps_the_gates_apart_from_the_strength_and_tells_observers_once():
    """Monitors read the gates of Eq. 3 themselves; the projection multiplies o_j by strength · gate. Observers hear
    of each newly prepared context once, not of the cache hits of the other 31 projections."""
    cov, inputs, keys, _ = concept_rows(2, seed=5)
    beta, tau = torch.tensor([0.6, 0.7]), torch.tensor([0.15, 0.2])
    stack = ConceptStack(inputs.float(), keys.float(), beta, tau, strength=[0.5, 1.5])
    shared = SharedContext(stack, torch.zeros_like(inputs).float())
    seen = []
    shared.observers.append(seen.append)
    e = sample_encodings(cov, 12, seed=6).float()
    prepared = shared.prepare(e)
    assert shared.prepare(e) is prepared and seen == [prepared]  # a cache hit: no second call
    want = gate(similarity(e, inputs.float(), keys.float()), beta, tau)
    assert torch.allclose(prepared.gates, want, atol=1e-6)
    assert torch.allclose(prepared.weights, want * torch.tensor([0.5, 1.5]), atol=1e-6)
