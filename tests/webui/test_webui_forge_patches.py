"""The Forge route: attn2_patch + attn2_replace on a patcher clone, driven by a real transformer block.

Forge's ``UnetPatcher`` and its ``BasicTransformerBlock._forward`` copy ComfyUI's patch protocol; ComfyUI's
own ``ModelPatcher`` and ``BasicTransformerBlock`` from the test host run it here, so the patches meet the
real call sequence (attn2_patch, then to_q/to_k/to_v, then the replace, then to_out)."""
import pytest
import torch

from perfusion_ops.edit import AppliedConcept, JointEdit
from perfusion_webui import forge_patches
from perfusion_webui.hooks import HookedEdit
from perfusion_webui.keylock import KeyContexts
from test_webui_hooks import concepts, context_with_triggers
from webui_fixtures import SMALL_LAYERS, Wrapper, block_unet, comfy_attention

BLOCKS = {layer: forge_patches.block_key(layer) for layer in SMALL_LAYERS}


def test_block_keys():
    assert forge_patches.block_key("input_blocks.1.1.transformer_blocks.0.attn2") == ("input", 1, 0)
    assert forge_patches.block_key("middle_block.1.transformer_blocks.0.attn2") == ("middle", 0, 0)
    assert forge_patches.block_key("output_blocks.11.1.transformer_blocks.2.attn2") == ("output", 11, 2)
    with pytest.raises(ValueError):
        forge_patches.block_key("input_blocks.1.1.transformer_blocks.0.attn1")


@pytest.fixture(scope="module")
def host():
    attention = comfy_attention()
    import comfy.model_patcher
    unet = block_unet(SMALL_LAYERS, seed=60)
    patcher = comfy.model_patcher.ModelPatcher(Wrapper(unet), torch.device("cpu"), torch.device("cpu"))
    return attention, unet, patcher


def run_blocks(unet, options, e, seed=8):
    """Each block's forward as the UNet calls it: transformer_options carry the block's position."""
    out = {}
    for layer, width in SMALL_LAYERS.items():
        block = unet.get_submodule(layer[: -len(".attn2")])
        name, number, index = BLOCKS[layer]
        x = torch.randn(2, 16, width, generator=torch.Generator().manual_seed(seed))
        to = {**options, "block": (name, number), "block_index": index}
        out[layer] = block(x.clone(), context=e, transformer_options=to)
    return out


def applied():
    return [AppliedConcept(c, 0.65, 0.15) for c in concepts(2)]


def test_forge_patches_equal_the_hook_route_and_leave_the_original_alone(host):
    attention, unet, patcher = host
    e = context_with_triggers(concepts(2))
    edit = JointEdit(applied())
    plain = run_blocks(unet, patcher.model_options["transformer_options"], e)
    clone = patcher.clone()
    installed = forge_patches.install(clone, edit, attention.optimized_attention)
    patched = run_blocks(unet, clone.model_options["transformer_options"], e)
    assert installed.calls == len(SMALL_LAYERS)
    with HookedEdit(unet, JointEdit(applied())):
        hooked = run_blocks(unet, patcher.model_options["transformer_options"], e)
    again = run_blocks(unet, patcher.model_options["transformer_options"], e)
    for layer in SMALL_LAYERS:
        assert not torch.allclose(patched[layer], plain[layer])
        scale = hooked[layer].abs().max()
        assert torch.allclose(patched[layer], hooked[layer], rtol=0, atol=1e-5 * scale.item())
        assert torch.equal(again[layer], plain[layer])  # the original patcher never saw the edit
    assert "patches_replace" not in patcher.model_options["transformer_options"]
    assert not patcher.object_patches and not clone.object_patches  # to_k/to_v are never object-patched


def test_a_replace_patch_already_there_gets_the_edited_k_and_v(host):
    attention, unet, patcher = host
    e = context_with_triggers(concepts(2))
    seen = []

    def other(q, k, v, extra_options):  # an IP-Adapter-style replace patch installed before ours
        seen.append((k.shape, v.shape))
        return attention.optimized_attention(q, k, v, extra_options["n_heads"]) * 0.5

    base = patcher.clone()
    for layer in SMALL_LAYERS:
        name, number, index = BLOCKS[layer]
        base.set_model_attn2_replace(other, name, number, index)
    clone = base.clone()
    forge_patches.install(clone, JointEdit(applied()), attention.optimized_attention)
    chained = run_blocks(unet, clone.model_options["transformer_options"], e)
    assert len(seen) == len(SMALL_LAYERS)
    direct = base.clone()
    forge_patches.install(direct, JointEdit(applied()), lambda q, k, v, heads: other(q, k, v, {"n_heads": heads}))
    reference = run_blocks(unet, direct.model_options["transformer_options"], e)
    for layer in SMALL_LAYERS:
        assert torch.allclose(chained[layer], reference[layer], rtol=0,
                              atol=1e-6 * reference[layer].abs().max().item())


def test_global_key_lock_through_the_attn2_patch(host):
    """The key-lock K context goes through Forge's own K channel (attn2_patch's returned context)."""
    attention, unet, patcher = host
    cs = concepts(2)
    e = context_with_triggers(cs, batch=2, tokens=20)
    superclass = e[0].clone()
    superclass[4] = cs[0].superclass_encoding  # the superclass word, and (causal CLIP) every token after it changes
    superclass[5:] += 0.2 * torch.randn(15, superclass.shape[-1], generator=torch.Generator().manual_seed(2))
    keys = KeyContexts()
    keys.add(e[0], superclass)
    edit_args = applied()
    clone = patcher.clone()
    forge_patches.install(clone, JointEdit(edit_args), attention.optimized_attention, key_context=keys)
    patched = run_blocks(unet, clone.model_options["transformer_options"], e)
    with HookedEdit(unet, JointEdit(edit_args), key_context=keys):
        hooked = run_blocks(unet, patcher.model_options["transformer_options"], e)
    unlocked = patcher.clone()
    forge_patches.install(unlocked, JointEdit(edit_args), attention.optimized_attention)
    local = run_blocks(unet, unlocked.model_options["transformer_options"], e)
    assert keys.matched_rows == 1  # row 0 matched once: the result is cached per context object
    for layer in SMALL_LAYERS:
        assert torch.allclose(patched[layer], hooked[layer], rtol=0, atol=1e-5 * hooked[layer].abs().max().item())
        assert not torch.allclose(patched[layer][0], local[layer][0])  # row 0 is locked ...
        assert torch.allclose(patched[layer][1], local[layer][1], rtol=0, atol=1e-6)  # ... the uncond row is not


def test_strength_zero_concepts_take_no_part_in_the_forge_route(host):
    """B at strength 0 is A alone, bit for bit; all at 0 installs nothing on the clone."""
    from dataclasses import replace

    attention, unet, patcher = host
    e = context_with_triggers(concepts(2))
    a, b = applied()

    def blocks_with(entries):
        clone = patcher.clone()
        installed = forge_patches.install(clone, JointEdit(entries), attention.optimized_attention)
        return run_blocks(unet, clone.model_options["transformer_options"], e), installed, clone

    alone, _, _ = blocks_with([a])
    with_off, _, _ = blocks_with([a, replace(b, strength=0.0)])
    assert all(torch.equal(with_off[layer], alone[layer]) for layer in SMALL_LAYERS)
    plain = run_blocks(unet, patcher.model_options["transformer_options"], e)
    off, installed, clone = blocks_with([replace(a, strength=0.0), replace(b, strength=0.0)])
    assert installed.calls == 0 and clone.model_options == patcher.model_options
    assert all(torch.equal(off[layer], plain[layer]) for layer in SMALL_LAYERS)
