"""The joint edit as UnetPatcher attention patches (the Forge route; no Forge import here).

Forge's ``UnetPatcher`` (like ComfyUI's ``ModelPatcher``, whose patch protocol it copied) runs, inside each
transformer block, every ``attn2_patch(n, context, value, extra_options) -> (n, context, value)`` and then,
if one is registered for the block, ``attn2_replace(q, k, v, extra_options)`` with ``k = to_k(context)``,
``v = to_v(value)`` already projected, in place of the attention itself. ``extra_options`` is one dict per
block call, shared by both.

- :class:`ContextPatch` (attn2_patch) records the contexts K and V will see, and for the global key lock
  returns the superclass prompt's encoding as the K context (the host's separate K channel).
- :class:`EditedAttention` (attn2_replace) recomputes K and V with the core's edit around the block's own
  ``to_k``/``to_v`` modules (so Forge's weight casts and LoRA — merged or online — apply to ``W e⊥``),
  then runs the attention, or hands the edited K/V to a replace patch that was there before (IP-Adapter
  style extensions), so both work together.

Nothing is object-patched: ``to_k``/``to_v`` keep their ``forward`` (object-patching them breaks Forge's
LoRA refresh). The patches live in the clone's ``model_options`` and vanish with it after the generation.
"""
from __future__ import annotations

import re
from typing import Callable

from torch import Tensor, nn

from perfusion_ops.edit import JointEdit

STASH = "perfusion_contexts"
Attention = Callable[..., Tensor]  # attention(q, k, v, heads) -> (B, N, heads*dim_head)
_LAYER = re.compile(r"^(input_blocks|middle_block|output_blocks)\.?(\d*)\.\d+\.transformer_blocks\.(\d+)\.attn2$")
_BLOCK = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}


def block_key(layer: str) -> tuple[str, int, int]:
    """``(block name, number, transformer index)``, the replace-patch key of a layer path
    (``input_blocks.1.1.transformer_blocks.0.attn2`` → ``("input", 1, 0)``)."""
    match = _LAYER.match(layer)
    if match is None:
        raise ValueError(f"not a UNet cross-attention layer path: {layer!r}")
    kind, number, index = match.groups()
    return _BLOCK[kind], int(number or 0), int(index)


def layer_of(extra_options: dict) -> tuple[str, int, int] | None:
    block = extra_options.get("block")
    if block is None:
        return None
    return block[0], int(block[1]), int(extra_options.get("block_index", 0))


class ContextPatch:
    """attn2_patch: remember this block's K and V contexts (the K one key-locked when asked)."""

    def __init__(self, keys: set[tuple[str, int, int]], key_context: Callable[[Tensor], Tensor] | None = None):
        self.keys, self.key_context = keys, key_context

    def __call__(self, n, context, value, extra_options):
        key = layer_of(extra_options)
        if key not in self.keys:
            return n, context, value
        value = context if value is None else value
        if self.key_context is not None:
            context = self.key_context(context)
        extra_options[STASH] = (key, context, value)
        return n, context, value


class EditedAttention:
    """attn2_replace of one layer: edited K/V from the recorded contexts, then attention (or the previous patch)."""

    def __init__(self, edit: JointEdit, layer: str, attention_module: nn.Module, attention: Attention, previous=None):
        self.key, self.attention, self.previous = block_key(layer), attention, previous
        self.project_k = edit.projection(layer, "k", attention_module.to_k)
        self.project_v = edit.projection(layer, "v", attention_module.to_v)
        self.calls = 0

    def __call__(self, q, k, v, extra_options):
        stash = extra_options.pop(STASH, None)
        if stash is not None and stash[0] == self.key:
            _, context, value = stash
            k, v = self.project_k(context), self.project_v(value)
            self.calls += 1
        if self.previous is not None:
            return self.previous(q, k, v, extra_options)
        return self.attention(q, k, v, extra_options["n_heads"])


class ForgeEdit:
    """What :func:`install` put on a patcher clone (for checks and counters)."""

    def __init__(self, context_patch: ContextPatch | None, replacements: dict[str, EditedAttention]):
        self.context_patch, self.replacements = context_patch, replacements

    @property
    def calls(self) -> int:
        return sum(r.calls for r in self.replacements.values())


def install(patcher, edit: JointEdit, attention: Attention, key_context=None) -> ForgeEdit:
    """Put the edit on ``patcher`` (a *clone*: Forge's ``UnetPatcher`` or ComfyUI's ``ModelPatcher``).

    ``attention(q, k, v, heads)`` is the host's attention (Forge: ``backend.attention.attention_function``).
    A replace patch already registered for a block (by block or by transformer block) is chained. With every
    concept at strength 0 nothing is installed."""
    if not edit.active:
        return ForgeEdit(None, {})
    unet = patcher.model.diffusion_model
    keys = {block_key(layer) for layer in edit.layers}
    context_patch = ContextPatch(keys, key_context)
    replace = patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    replacements = {}
    for layer in edit.layers:
        name, number, index = block_key(layer)
        previous = replace.get((name, number, index), replace.get((name, number)))
        replacements[layer] = EditedAttention(edit, layer, unet.get_submodule(layer), attention, previous)
        patcher.set_model_attn2_replace(replacements[layer], name, number, index)
    patcher.set_model_attn2_patch(context_patch)  # appended last: it sees the contexts the others made
    return ForgeEdit(context_patch, replacements)
