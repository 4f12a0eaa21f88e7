"""The A1111 route: the joint edit through forward hooks on real ldm cross-attention modules (ComfyUI's own
``CrossAttention``, the same structure as the webui's), against the paper's closed form; removal; LoRA."""
from dataclasses import replace
import functools

import pytest
import torch
import torch.nn.functional as F

from perfusion_ops.edit import AppliedConcept, JointEdit
from tools.factories import SD15_LAYERS
from perfusion_webui.hooks import HookedEdit, hooked_modules
from perfusion_webui.keylock import KeyContexts
from webui_fixtures import SMALL_LAYERS, TEXT, attention_unet, comfy_attention, encodings, make_concept

@functools.lru_cache(maxsize=None)
def _concepts(j, layers):
    return [make_concept(seed=10 + n, layers=dict(layers), trigger=f"word{n}") for n in range(j)]


def concepts(j=2, layers=SMALL_LAYERS):
    """Random concepts with q = C⁻¹ i for one CLIP-like C."""
    return _concepts(j, tuple(layers.items()))


def applied_of(cs, betas=(0.7, 0.6), taus=(0.15, 0.2)):
    return [AppliedConcept(c, betas[n], taus[n]) for n, c in enumerate(cs)]


def context_with_triggers(cs, batch=2, tokens=20, seed=3):
    """Encodings drawn like CLIP-L's (N(0, C)); token 4 of row 0 is concept 0's i, token 9 concept 1's."""
    e = encodings(batch * tokens, seed).reshape(batch, tokens, TEXT)
    for n, c in enumerate(cs):
        e[0, 4 + 5 * n] = c.target_input
    return e


def closed_form(w, e, cs, applied, kv, layer, strengths=None):
    """Eq. 3/4/10 in float64 from the concept tensors, independent of the core's code."""
    w, e = w.double(), e.double()
    i = torch.stack([c.target_input for c in cs]).double()
    q = torch.stack([c.target_key for c in cs]).double()
    s = torch.ones(len(cs), dtype=torch.float64) if strengths is None else torch.tensor(strengths).double()
    if kv == "v":
        o = torch.stack([c.value_outputs[layer] for c in cs]).double()
    else:  # local key lock: o_K = W_K e_sup from the host's weights
        o = torch.stack([c.superclass_encoding for c in cs]).double() @ w.T
    coupling = q @ i.T  # M_ab = q_a·i_b
    coeffs = e @ q.T  # e·q_j
    e_perp = e - (coeffs * s) @ torch.linalg.solve(coupling.T, i)
    sim = coeffs / (i * q).sum(-1)
    beta = torch.tensor([a.beta for a in applied]).double()
    tau = torch.tensor([a.tau for a in applied]).double()
    gates = torch.sigmoid((sim - beta) / tau) * s
    return e_perp @ w.T + gates @ o


def assert_close(actual, expected, rel=2e-5):
    scale = expected.abs().max().item()
    assert torch.allclose(actual.double(), expected.double(), rtol=0, atol=rel * scale), \
        f"max error {(actual.double() - expected.double()).abs().max().item():.3g} vs scale {scale:.3g}"


@pytest.fixture(scope="module")
def unet():
    return attention_unet(SMALL_LAYERS)


def test_hooked_projections_equal_closed_form(unet):
    cs = concepts(2)
    applied = applied_of(cs)
    e = context_with_triggers(cs)
    with HookedEdit(unet, JointEdit(applied)) as hooked:
        for layer in SMALL_LAYERS:
            attn = unet.get_submodule(layer)
            for path in "kv":
                module = getattr(attn, f"to_{path}")
                out = module(e)
                assert out.shape == (2, 20, SMALL_LAYERS[layer])
                assert_close(out, closed_form(module.weight, e, cs, applied, path, layer))
        assert hooked.calls == len(SMALL_LAYERS)  # one per layer call (K and V together)
    gates_open = closed_form(attn.to_v.weight, e, cs, applied, "v", layer)[0, 4]
    assert_close(gates_open, cs[0].value_outputs[layer], rel=0.2)  # the trigger's V ≈ o_V (gate ≈ 1)


def test_attention_forward_uses_edited_k_and_v(unet):
    """The whole ldm CrossAttention.forward (q from x, attention, to_out) sees the edited K and V."""
    attention = comfy_attention()
    cs = concepts(2)
    applied = applied_of(cs)
    e = context_with_triggers(cs)
    layer = "middle_block.1.transformer_blocks.0.attn2"
    attn = unet.get_submodule(layer)
    x = torch.randn(2, 16, SMALL_LAYERS[layer], generator=torch.Generator().manual_seed(5))
    k = closed_form(attn.to_k.weight, e, cs, applied, "k", layer).float()
    v = closed_form(attn.to_v.weight, e, cs, applied, "v", layer).float()
    expected = attn.to_out(attention.optimized_attention(attn.to_q(x), k, v, attn.heads))
    plain = attn(x, context=e)
    with HookedEdit(unet, JointEdit(applied)):
        edited = attn(x, context=e)
    assert_close(edited, expected, rel=1e-4)
    assert not torch.allclose(edited, plain)


def test_all_sixteen_layers_hooked_and_removal_is_bit_identical():
    """At SD1.5 size: every one of the 16 cross-attention layers gets its K and V hooked; afterwards no hook
    is left and every output is bit-identical to before."""
    unet = attention_unet(SD15_LAYERS, seed=100, query_dim=32)  # real K/V widths, narrow queries: cheap
    cs = concepts(1, layers=SD15_LAYERS)
    e = context_with_triggers(cs, batch=1, tokens=77)
    x = {layer: torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(7))
         for layer, width in SD15_LAYERS.items()}
    before = {layer: unet.get_submodule(layer)(x[layer], context=e) for layer in SD15_LAYERS}
    hooked = HookedEdit(unet, JointEdit(applied_of(cs)))
    assert sorted(hooked_modules(unet)) == sorted(f"{layer}.to_{p}" for layer in SD15_LAYERS for p in "kv")
    during = {layer: unet.get_submodule(layer)(x[layer], context=e) for layer in SD15_LAYERS}
    assert hooked.calls == 16
    hooked.remove()
    hooked.remove()  # idempotent
    assert hooked_modules(unet) == []
    for layer in SD15_LAYERS:
        assert not torch.allclose(during[layer], before[layer])
        assert torch.equal(unet.get_submodule(layer)(x[layer], context=e), before[layer])
        attn = unet.get_submodule(layer)
        assert not attn.to_k._forward_hooks and not attn.to_k._forward_pre_hooks
        assert type(attn.to_k).forward is comfy_attention().ops.Linear.forward  # nothing swapped or patched
        assert "forward" not in vars(attn.to_k)


def test_install_fails_cleanly_on_a_missing_layer():
    partial = attention_unet(dict(list(SMALL_LAYERS.items())[:2]))
    with pytest.raises(AttributeError):
        HookedEdit(partial, JointEdit(applied_of(concepts(1))))
    assert hooked_modules(partial) == []


def test_non_context_calls_pass_through(unet):
    """A call whose last dimension is not the text width (not a context) is left alone."""
    cs = concepts(1)
    layer = next(iter(SMALL_LAYERS))
    attn = unet.get_submodule(layer)
    with HookedEdit(unet, JointEdit(applied_of(cs))) as hooked:
        module = attn.to_out[0]  # not hooked at all
        y = torch.randn(3, SMALL_LAYERS[layer])
        assert torch.equal(module(y), F.linear(y, module.weight, module.bias))
        assert hooked.calls == 0


def test_half_precision_host(unet):
    """fp16 weights and context: the output stays fp16 and matches the float64 closed form to fp16 precision."""
    layers = {"input_blocks.1.1.transformer_blocks.0.attn2": 64}
    half = attention_unet(layers, seed=3, dtype=torch.float16)
    cs = concepts(1, layers=layers)
    applied = applied_of(cs)
    e = context_with_triggers(cs, batch=1)
    layer = next(iter(layers))
    with HookedEdit(half, JointEdit(applied)):
        out = half.get_submodule(layer).to_v(e.half())
    assert out.dtype == torch.float16
    assert_close(out, closed_form(half.get_submodule(layer).to_v.weight.float(), e.half().float(), cs, applied,
                                  "v", layer),
                 rel=5e-3)


# ------------------------------------------------------------------------------------------- LoRA coexistence
class LinearLora:
    """The webui's built-in Lora extension, reduced to what matters here: it replaces ``torch.nn.Linear.forward``
    at class level. Functional mode adds ``up(down(x))`` in the forward; default mode merges ``up @ down`` into
    ``weight`` the first time the module runs (and keeps a backup)."""

    def __init__(self, deltas, functional):
        self.deltas, self.functional = deltas, functional  # module -> (down (r, in), up (out, r))
        self.original = torch.nn.Linear.forward
        self.merged = {}

    def forward(self, module, x):
        delta = self.deltas.get(module)
        if delta is None:
            return self.original(module, x)
        down, up = delta
        if self.functional:
            return self.original(module, x) + F.linear(F.linear(x, down), up)
        if module not in self.merged:
            with torch.no_grad():
                self.merged[module] = module.weight.clone()
                module.weight += up @ down
        return self.original(module, x)

    def __enter__(self):
        lora = self
        torch.nn.Linear.forward = lambda module, x: lora.forward(module, x)
        return self

    def __exit__(self, *exc):
        torch.nn.Linear.forward = self.original
        with torch.no_grad():
            for module, weight in self.merged.items():
                module.weight.copy_(weight)


@pytest.mark.parametrize("functional", [True, False], ids=["functional", "merged"])
def test_lora_delta_is_kept_under_the_edit(functional):
    """W e⊥ comes from the module as the Lora extension patched it: the edit acts on W + ΔW (K lock too), and
    removing the edit leaves exactly the LoRA-only output."""
    unet = attention_unet(SMALL_LAYERS, seed=40)
    cs = concepts(2)
    applied = applied_of(cs)
    e = context_with_triggers(cs)
    g = torch.Generator().manual_seed(9)
    deltas, original = {}, {}
    for layer, width in SMALL_LAYERS.items():
        for path in "kv":
            module = getattr(unet.get_submodule(layer), f"to_{path}")
            deltas[module] = (torch.randn(4, TEXT, generator=g) * 0.05, torch.randn(width, 4, generator=g) * 0.05)
            original[module] = module.weight.detach().clone()
    with LinearLora(deltas, functional):
        lora_only = {m: m(e) for m in deltas}
        with HookedEdit(unet, JointEdit(applied)):
            for layer in SMALL_LAYERS:
                for path in "kv":
                    module = getattr(unet.get_submodule(layer), f"to_{path}")
                    down, up = deltas[module]
                    out = module(e)
                    assert_close(out, closed_form(original[module] + up @ down, e, cs, applied, path, layer))
                    plain_w = closed_form(original[module], e, cs, applied, path, layer)
                    assert not torch.allclose(out.double(), plain_w, atol=1e-3)
        for module, expected in lora_only.items():
            assert torch.equal(module(e), expected)


# ------------------------------------------------------------------------------------------------- strength
def test_strength_zero_is_the_host_and_one_is_the_core(unet):
    cs = concepts(2)
    applied = applied_of(cs)
    e = context_with_triggers(cs)
    layer = "output_blocks.11.1.transformer_blocks.0.attn2"
    attn = unet.get_submodule(layer)

    def outputs_of(entries):
        with HookedEdit(unet, JointEdit(entries)) as hooked:
            return (attn.to_k(e), attn.to_v(e)), bool(hooked.handles)

    outputs, hooked = {}, {}
    for strengths in [(0.0, 0.0), (1.0, 1.0), (1.0, 0.0), (0.0, 1.0), (0.3, 0.7)]:
        entries = [replace(a, strength=s) for a, s in zip(applied, strengths)]
        outputs[strengths], hooked[strengths] = outputs_of(entries)
    host = (attn.to_k(e), attn.to_v(e))
    core, _ = outputs_of(applied)
    alone = [outputs_of([a])[0] for a in applied]
    assert not hooked[(0.0, 0.0)] and all(hooked[s] for s in hooked if s != (0.0, 0.0))
    for n in range(2):
        assert torch.equal(outputs[(0.0, 0.0)][n], host[n])  # s = 0: exactly the model without the tags
        assert torch.equal(outputs[(1.0, 1.0)][n], core[n])  # s = 1: exactly the core's edit
        # a concept at strength 0 is no concept: the other alone, bit for bit
        assert torch.equal(outputs[(1.0, 0.0)][n], alone[0][n]) and torch.equal(outputs[(0.0, 1.0)][n], alone[1][n])
    w = unet.get_submodule(layer).to_v.weight
    assert_close(outputs[(0.3, 0.7)][1], closed_form(w, e, cs, applied, "v", layer, strengths=[0.3, 0.7]))


# -------------------------------------------------------------------------------------------- global key lock
def test_global_key_lock_k_sees_the_superclass_prompt(unet):
    """K of the batch row carrying the real prompt gets the superclass prompt's encoding; V keeps the real one;
    the uncond row (no match) is untouched."""
    cs = concepts(1)
    applied = applied_of(cs)
    real = context_with_triggers(cs, batch=1, tokens=77)[0]
    superclass = real.clone()
    superclass[4] = cs[0].superclass_encoding  # the trigger position carries the superclass word ...
    # ... and changes what follows
    superclass[5:] += 0.05 * torch.randn(72, TEXT, generator=torch.Generator().manual_seed(1))
    uncond = encodings(77, 99)
    batch = torch.stack([real, uncond])
    keys = KeyContexts()
    keys.add(real, superclass)
    layer = next(iter(SMALL_LAYERS))
    attn = unet.get_submodule(layer)
    with HookedEdit(unet, JointEdit(applied), key_context=keys):
        k, v = attn.to_k(batch), attn.to_v(batch)
    expected_k = closed_form(attn.to_k.weight, torch.stack([superclass, uncond]), cs, applied, "k", layer)
    expected_v = closed_form(attn.to_v.weight, batch, cs, applied, "v", layer)
    assert_close(k, expected_k)
    assert_close(v, expected_v)
    assert keys.matched_rows == 1


def test_key_contexts_match_a_prefix_and_tolerate_autocast():
    real = torch.randn(77, TEXT)
    key = torch.randn(77, TEXT)
    keys = KeyContexts()
    keys.add(real[None], key[None])
    padded = torch.cat([real, torch.randn(77, TEXT)])[None].half()  # cond padded to 2 chunks, fp16 context
    out = keys(padded)
    assert out.dtype == torch.float16 and out.shape == padded.shape
    assert torch.equal(out[0, :77], key.half()) and torch.equal(out[0, 77:], padded[0, 77:])
    assert keys(padded) is out  # cached per context object
    other = torch.randn(1, 77, TEXT)
    assert keys(other) is other
    with pytest.raises(ValueError):
        keys.add(real, key[:70])
