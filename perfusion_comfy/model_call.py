"""What the pack does once per UNet call, in a wrapper around the model call: choose the concepts that act at this
point of the sampling schedule (Apply's ``start_at``/``end_at``), and hand the global key lock's superclass encoding
from the conditioning to the attn2 patch (``keylock.py``).

Where the tree has keyed wrappers (2025 on) this is an ``apply_model`` wrapper under the pack's own key, so other
packs' wrappers coexist with it; the 2024 tree has one unet-function-wrapper slot, which :class:`UnetFunctionWrapper`
shares by chaining to the wrapper it found there.
"""
from __future__ import annotations

from perfusion_ops.edit import ScheduledEdit
from .keylock import KEYS

try:
    from comfy.patcher_extension import WrappersMP
except ImportError:  # the 2024 tree
    WrappersMP = None

KEY = "perfusion"


class ModelCall:
    """The per-call work of one patched model: its scheduled edit, each concept's σ range (``percent_to_sigma`` of
    its ``start_at`` and ``end_at``, as ComfyUI's ControlNet and timestep-range nodes map fractions to σ)."""

    def __init__(self, schedule: ScheduledEdit, sigma_ranges: list[tuple[float, float]]):
        self.schedule, self.sigma_ranges = schedule, sigma_ranges

    def __deepcopy__(self, memo):  # ComfyUI deep-copies model options on every clone; this state is shared
        return self

    def before(self, sigma, conds: dict, transformer_options: dict) -> dict:
        """Select the concepts in range at ``sigma`` and move the key-lock encoding out of ``conds`` (in place);
        returns the transformer options for the call. Outside every range the key lock is off too."""
        acting = True
        if self.schedule.scheduled:  # one device sync per model call, only for concepts with a range
            value = float(sigma.flatten()[0])
            acting = self.schedule.select(tuple(low <= value <= high for high, low in self.sigma_ranges))
        keys = conds.pop(KEYS, None)
        if keys is not None and acting:
            transformer_options = {**transformer_options, KEYS: keys}
        return transformer_options


class UnetFunctionWrapper:
    """The 2024 tree's unet function wrapper: :meth:`ModelCall.before`, then the wrapper found before (if any)."""

    def __init__(self, call: ModelCall, previous=None):
        self.call, self.previous = call, previous

    def __deepcopy__(self, memo):
        return self

    def __call__(self, apply_model, args):
        c = dict(args["c"])
        c["transformer_options"] = self.call.before(args["timestep"], c, c.get("transformer_options", {}))
        args = {**args, "c": c}
        if self.previous is not None:
            return self.previous(apply_model, args)
        return apply_model(args["input"], args["timestep"], **c)


def keyed_wrapper(call: ModelCall):
    """The keyed ``apply_model`` wrapper of trees that have them."""
    def apply_model(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **conds):
        transformer_options = call.before(t, conds, transformer_options)
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **conds)
    return apply_model


def install_model_call(model, call: ModelCall) -> None:
    """Make ``call`` the per-call work of ``model`` (a clone), replacing the one an earlier Apply installed."""
    if WrappersMP is not None:
        model.remove_wrappers_with_key(WrappersMP.APPLY_MODEL, KEY)
        model.add_wrapper_with_key(WrappersMP.APPLY_MODEL, KEY, keyed_wrapper(call))
        return
    current = model.model_options.get("model_function_wrapper")
    previous = current.previous if isinstance(current, UnetFunctionWrapper) else current
    model.set_model_unet_function_wrapper(UnetFunctionWrapper(call, previous))
