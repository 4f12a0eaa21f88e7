"""Global key lock (paper App. C): K sees the prompt with trigger words replaced by superclass words, V the prompt.

The superclass prompt's encoding rides in the conditioning as ``model_conds["perfusion_keys"]`` (a
``CONDCrossAttn``, so ComfyUI batches and pads it exactly like the text). A wrapper around the model call moves it
into ``transformer_options``, where an ``attn2_patch`` hands it to cross-attention as the K context while V keeps the
real context. Both are installed by Apply on its clone; without the conditioning key they pass everything through.

The wrapper is a keyed ``apply_model`` wrapper where the tree has them (2025 on), so it coexists with other packs'
wrappers; the 2024 tree has one unet-function-wrapper slot, which :class:`KeylockWrapper` shares by chaining.
"""
from __future__ import annotations

try:
    from comfy.patcher_extension import WrappersMP
except ImportError:  # the 2024 tree
    WrappersMP = None

KEYS = "perfusion_keys"


def keylock_attn2_patch(n, context, value, extra_options):
    """attn2 patch: ``(n, K context, V context)``; the K context is the superclass prompt's encoding if present."""
    keys = extra_options.get(KEYS)
    if keys is None or keys.shape != context.shape:
        return n, context, value
    return n, keys.to(context.device, context.dtype), value


class KeylockWrapper:
    """Unet function wrapper: moves the key-lock context from the model conds into transformer_options.

    Chains to a wrapper installed before it. ``__deepcopy__`` returns self: ComfyUI deep-copies model_options
    on every clone, and this object holds only a reference to the previous wrapper."""

    def __init__(self, previous=None):
        self.previous = previous

    def __deepcopy__(self, memo):
        return self

    def __call__(self, apply_model, args):
        c = dict(args["c"])
        keys = c.pop(KEYS, None)
        if keys is not None:
            c["transformer_options"] = {**c.get("transformer_options", {}), KEYS: keys}
        args = {**args, "c": c}
        if self.previous is not None:
            return self.previous(apply_model, args)
        return apply_model(args["input"], args["timestep"], **c)


def keylock_apply_model(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                        **conds):
    """Keyed ``apply_model`` wrapper: the same move as :class:`KeylockWrapper`, from the model's keyword conds."""
    keys = conds.pop(KEYS, None)
    if keys is not None:
        transformer_options = {**transformer_options, KEYS: keys}
    return executor(x, t, c_concat, c_crossattn, control, transformer_options, **conds)


def install_keylock(model) -> None:
    """Install the wrapper and the attn2 patch on ``model`` (a clone) once."""
    options = model.model_options
    if WrappersMP is not None:
        if not model.get_wrappers(WrappersMP.APPLY_MODEL, KEYS):
            model.add_wrapper_with_key(WrappersMP.APPLY_MODEL, KEYS, keylock_apply_model)
    elif not isinstance(options.get("model_function_wrapper"), KeylockWrapper):
        model.set_model_unet_function_wrapper(KeylockWrapper(options.get("model_function_wrapper")))
    patches = options["transformer_options"].get("patches", {}).get("attn2_patch", [])
    if keylock_attn2_patch not in patches:
        model.set_model_attn2_patch(keylock_attn2_patch)
