"""Global key lock (paper App. C): K sees the prompt with trigger words replaced by superclass words, V the prompt.

The superclass prompt's encoding rides in the conditioning as ``model_conds["perfusion_keys"]`` (a
``CONDCrossAttn``, so ComfyUI batches and pads it exactly like the text). The per-call wrapper (``model_call.py``)
moves it into ``transformer_options``, where an ``attn2_patch`` hands it to cross-attention as the K context while V
keeps the real context. Both are installed by Apply on its clone; without the conditioning key they pass everything
through.
"""
from __future__ import annotations

KEYS = "perfusion_keys"


def keylock_attn2_patch(n, context, value, extra_options):
    """attn2 patch: ``(n, K context, V context)``; the K context is the superclass prompt's encoding if present."""
    keys = extra_options.get(KEYS)
    if keys is None or keys.shape != context.shape:
        return n, context, value
    return n, keys.to(context.device, context.dtype), value


def install_keylock(model) -> None:
    """Install the attn2 patch on ``model`` (a clone) once; ``model_call.py`` moves the encoding into place."""
    patches = model.model_options["transformer_options"].get("patches", {}).get("attn2_patch", [])
    if keylock_attn2_patch not in patches:
        model.set_model_attn2_patch(keylock_attn2_patch)
