"""Install the core's joint edit on a clone of a ComfyUI model: one object patch per attn2 ``to_k``/``to_v``.

Patching ``.forward`` keeps each module and its ``weight`` key, so LoRA weight patches and low-VRAM casting still
apply: the patch calls the module's class ``forward`` on ``e⊥``. Patches live on a clone only; ComfyUI installs
them while that clone is loaded and restores the originals when another clone of the same model is loaded.
"""
from __future__ import annotations

from perfusion_ops import modules
from perfusion_ops.edit import AppliedConcept, ScheduledEdit
from .keylock import install_keylock
from .model_call import ModelCall, install_model_call

PATCH_KEY = "diffusion_model.{layer}.{module}.forward"


class PatchedForward:
    """The edited forward of one host projection, remembering the scheduled joint edit it belongs to."""

    def __init__(self, edit: ScheduledEdit, layer: str, kv: str, module):
        self.edit = edit
        self.projection = edit.projection(layer, kv, lambda x: type(module).forward(module, x))

    def __call__(self, x, *args, **kwargs):
        return self.projection(x)


def cross_attention_layers(model) -> dict[str, int]:
    """``{layer path: inner width}`` of every cross-attention (``attn2``) layer of a ModelPatcher's UNet."""
    return modules.cross_attention_layers(model.model.diffusion_model)


def text_width(model, layers: dict[str, int]) -> int:
    """Width of the text encodings the model's cross-attention takes (768 for SD1.x)."""
    return modules.text_width(model.model.diffusion_model, layers)


def applied_concepts(model) -> list[AppliedConcept]:
    """The concepts already applied to ``model`` by earlier Apply nodes (empty for a plain model)."""
    for patch in model.object_patches.values():
        if isinstance(patch, PatchedForward):
            return list(patch.edit.applied)
    return []


def apply_concept(model, entry: AppliedConcept):
    """A clone of ``model`` whose edit is the joint edit (Eq. 4) of its earlier concepts and ``entry``.

    An earlier concept with the same trigger word is replaced, so applying a concept twice never doubles it."""
    concept = entry.concept
    layers = cross_attention_layers(model)
    concept.check_width(text_width(model, layers))
    concept.check_layers(layers)
    trigger = concept.trigger.lower()
    entries = [e for e in applied_concepts(model) if e.concept.trigger.lower() != trigger] + [entry]
    edit = ScheduledEdit(entries)
    patched = model.clone()
    unet = model.model.diffusion_model
    for layer in edit.layers:
        attention = unet.get_submodule(layer)
        for path in "kv":
            module = getattr(attention, f"to_{path}")
            patched.add_object_patch(PATCH_KEY.format(layer=layer, module=f"to_{path}"),
                                     PatchedForward(edit, layer, path, module))
    sampling = model_sampling(patched)
    ranges = [(sampling.percent_to_sigma(e.start_at), sampling.percent_to_sigma(e.end_at)) for e in entries]
    install_model_call(patched, ModelCall(edit, ranges))
    install_keylock(patched)
    return patched


def model_sampling(model):
    """The model's σ schedule object, with a ModelSamplingDiscrete-style node's object patch if there is one."""
    if hasattr(model, "get_model_object"):  # trees since mid-2024
        return model.get_model_object("model_sampling")
    return model.object_patches.get("model_sampling", model.model.model_sampling)
