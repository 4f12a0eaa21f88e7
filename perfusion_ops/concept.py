"""A trained Perfusion concept in memory, and the checks that make a bad one fail with a readable message.

The bounds it is checked against (vectors, widths, layers) are the envelope of ``envelope.py``."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .envelope import MAX_LAYERS, MAX_STEPS, MAX_VECTORS, MAX_WIDTH, MAX_WINDOW
from .settings import BETA, GLOBAL, LOCAL, PAPER_GATES, TAU

# Text encoders the format knows, by the width of the encodings they feed cross-attention. SDXL concatenates the
# hidden states of CLIP-L and OpenCLIP bigG (768 + 1280); its refiner uses bigG alone.
TEXT_ENCODERS = {"clip-l": 768, "open-clip-h": 1024, "clip-g": 1280, "clip-l+clip-g": 2048}
FAMILY_OF_WIDTH = {768: "SD1.x (CLIP-L)", 1024: "SD2.x (OpenCLIP-H)", 1280: "the SDXL refiner (OpenCLIP bigG)",
                   2048: "SDXL (CLIP-L + OpenCLIP bigG)"}
# How a trigger vector splits over the encoders behind one context width: (ComfyUI's tokenizer key, width), in the
# order their hidden states are concatenated. A width not listed is one encoder's, under key "l".
ENCODER_PARTS = {2048: (("l", 768), ("g", 1280))}
LAYER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")


class ConceptError(ValueError):
    """A concept that cannot be used; the message says why in words a user understands."""


@dataclass
class Concept:
    """Everything one Perfusion concept needs at inference, and its recommended settings.

    ``target_input`` is ``i`` (the EMA of the trigger's encodings, Sec. 4.4), ``target_key`` is ``q = C⁻¹ i``
    (stored so inference needs no C), ``superclass_encoding`` is ``e_sup`` (key locking recomputes
    ``o_K = W_K e_sup`` from the host's weights), ``value_outputs`` the learned ``o_V`` per cross-attention
    layer, ``key_outputs`` the ``o_K`` of a trained-K concept (paper's ablation, Fig. 9b) or None.
    ``gate_window``: 0 for Eq. 3's gate; else the text encoder's window the concept was trained with first-opening
    gates over (``stack.first_opening``), which inference then uses too.
    """

    trigger: str
    superclass: str
    embedding: Tensor  # (N, T) learned token embedding(s) of the trigger word
    target_input: Tensor  # i, (D,)
    target_key: Tensor  # q = C⁻¹ i, (D,)
    superclass_encoding: Tensor  # e_sup, (D,)
    value_outputs: dict[str, Tensor]  # layer name -> o_V, (out,)
    key_outputs: dict[str, Tensor] | None = None  # trained-K only
    train_beta: float = PAPER_GATES["train"][0]
    train_tau: float = PAPER_GATES["train"][1]
    beta_local: float = PAPER_GATES[LOCAL][0]
    tau_local: float = PAPER_GATES[LOCAL][1]
    beta_global: float = PAPER_GATES[GLOBAL][0]
    tau_global: float = PAPER_GATES[GLOBAL][1]
    text_encoder: str = "clip-l"
    encoder_fingerprint: str = ""
    model_family: str = "sd15"
    clip_layer: int = -1
    gate_window: int = 0
    info: dict[str, str] = field(default_factory=dict)

    @property
    def width(self) -> int:
        """``D``, the width of the text encodings this concept lives in."""
        return self.target_input.shape[-1]

    @property
    def layers(self) -> list[str]:
        return list(self.value_outputs)

    @property
    def trained_keys(self) -> bool:
        return self.key_outputs is not None

    @property
    def learned(self) -> dict[str, Tensor]:
        """What training learns, by the names concept files give those tensors (see :func:`learned_tensors`)."""
        return learned_tensors(self.embedding, self.value_outputs, self.key_outputs)

    def embedding_parts(self) -> dict[str, Tensor]:
        """The learned trigger vectors ``(N, T)`` split per text encoder, ``{tokenizer key: (N, width)}``: SDXL's
        2048-wide vectors are a CLIP-L row and a bigG row side by side, as the contexts they become."""
        parts, start = {}, 0
        for key, width in ENCODER_PARTS.get(self.embedding.shape[-1], (("l", self.embedding.shape[-1]),)):
            parts[key], start = self.embedding[:, start : start + width], start + width
        return parts

    def recommended(self, lock: str) -> tuple[float, float]:
        """Recommended inference ``(β, τ)`` for ``lock`` 'local' or 'global' (paper Sec. 4.4: τ 0.15,
        β 0.6–0.75 local, 0.4–0.6 global)."""
        return (self.beta_global, self.tau_global) if lock == GLOBAL else (self.beta_local, self.tau_local)

    def validate(self) -> "Concept":
        """Raise :class:`ConceptError` unless every field is present, finite and of consistent shape."""
        for name in ("trigger", "superclass"):
            word = getattr(self, name)
            if not isinstance(word, str) or not word.strip():
                raise ConceptError(f"the concept has an empty {name} word")
        if not isinstance(self.text_encoder, str) or not self.text_encoder:
            raise ConceptError("the concept names no text encoder")
        # a known encoder fixes the width; another (e.g. a test model's) must only be self-consistent
        width = TEXT_ENCODERS.get(self.text_encoder, self.target_input.shape[-1])
        for name in ("target_input", "target_key", "superclass_encoding"):
            _check_tensor(getattr(self, name), name, (width,))
        if self.embedding.ndim != 2:
            raise ConceptError(f"embedding must have shape (vectors, width), got {tuple(self.embedding.shape)}")
        if not 1 <= self.embedding.shape[0] <= MAX_VECTORS:
            raise ConceptError(f"the trigger has {self.embedding.shape[0]} embedding vectors: a concept holds 1 to "
                               f"{MAX_VECTORS}")
        _check_tensor(self.embedding, "embedding", tuple(self.embedding.shape))
        if self.text_encoder in TEXT_ENCODERS and self.embedding.shape[-1] != width:
            raise ConceptError(f"the trigger embedding is {self.embedding.shape[-1]} wide, but {self.text_encoder} "
                               f"takes {width}-wide token vectors")
        if not 1 <= len(self.value_outputs) <= MAX_LAYERS:
            raise ConceptError(f"the concept has value outputs (o_V) for {len(self.value_outputs)} layers: a concept "
                               f"edits 1 to {MAX_LAYERS}")
        if float(self.target_input @ self.target_key) <= 0:
            raise ConceptError("target input and key are inconsistent (i·C⁻¹i must be positive)")
        for outputs, path in ((self.value_outputs, "o_v"), (self.key_outputs or {}, "o_k")):
            for layer, tensor in outputs.items():
                if not LAYER_NAME.match(layer):
                    raise ConceptError(f"bad layer name '{layer}'")
                _check_tensor(tensor, f"{path}.{layer}", (-1,))
        if self.key_outputs is not None and set(self.key_outputs) != set(self.value_outputs):
            raise ConceptError("trained-K concept: key and value outputs cover different layers")
        for layer, tensor in (self.key_outputs or {}).items():
            if tensor.shape != self.value_outputs[layer].shape:
                raise ConceptError(f"trained-K concept: 'o_k.{layer}' has shape {tuple(tensor.shape)} but "
                                   f"'o_v.{layer}' {tuple(self.value_outputs[layer].shape)}")
        for kind in PAPER_GATES:
            beta, tau = (self.train_beta, self.train_tau) if kind == "train" else self.recommended(kind)
            check_gate(beta, tau, what=f"{kind} gate")
        check_window(self.gate_window)
        return self

    def check_width(self, width: int) -> None:
        """Refuse a concept made for a text encoder of another width than the host's ``width``."""
        if self.width != width:
            raise ConceptError(
                f"concept '{self.trigger}' was made for {FAMILY_OF_WIDTH.get(self.width, f'{self.width}-wide')} "
                f"text encodings, but this model's text encoder gives {FAMILY_OF_WIDTH.get(width, f'{width}-wide')}; "
                "use it with a checkpoint of the family it was trained on"
            )

    def check_clip_layer(self, layer: int, remedy: str) -> None:
        """Refuse encodings from another CLIP layer (clip skip) than the concept's: they never match ``i``, so the
        gate (Eq. 3) would never open. ``remedy`` says how the host's user changes the layer."""
        if layer != self.clip_layer:
            raise ConceptError(
                f"concept '{self.trigger}' was trained on CLIP layer {self.clip_layer} (clip skip {-self.clip_layer}) "
                f"but this CLIP uses layer {layer} (clip skip {-layer}): its gate would never open; {remedy}"
            )

    def check_layers(self, layer_widths: dict[str, int]) -> None:
        """Refuse a concept whose layers or output widths do not match the host's cross-attention layers."""
        missing = [layer for layer in self.value_outputs if layer not in layer_widths]
        if missing:
            raise ConceptError(
                f"concept '{self.trigger}' edits {len(self.value_outputs)} cross-attention layers, "
                f"{len(missing)} of which this model lacks (e.g. '{missing[0]}'): it was trained for another "
                f"model family ({self.model_family})"
            )
        for layer, tensor in self.value_outputs.items():
            if tensor.shape[0] != layer_widths[layer]:
                raise ConceptError(
                    f"layer '{layer}' is {layer_widths[layer]} wide in this model but {tensor.shape[0]} in concept "
                    f"'{self.trigger}': it was trained for another model family ({self.model_family})"
                )


def learned_tensors(embedding: Tensor, value_outputs: dict[str, Tensor],
                    key_outputs: dict[str, Tensor] | None) -> dict[str, Tensor]:
    """``{"embedding", "o_v.<layer>"…, "o_k.<layer>"…}``: the learned tensors of a concept (Sec. 4.4; ``o_k`` only for
    trained K) under their file names, which also name their optimizer state in a :class:`TrainingState`."""
    return {"embedding": embedding, **{f"o_v.{layer}": t for layer, t in value_outputs.items()},
            **{f"o_k.{layer}": t for layer, t in (key_outputs or {}).items()}}


@dataclass
class TrainingState:
    """What resuming a training run needs beyond its concept: the optimizer steps taken (``step``), the loss of each
    step since the optimizer started (``losses``: all of them, unless the run itself was resumed from a finished
    concept, which starts a fresh optimizer; so Adam has taken ``len(losses)`` steps), and Adam's moments of every
    learned tensor (``moments[name]`` stacks the first and second moment, shape ``(2, *shape)``).

    ``i`` is part of the concept itself; the random streams of a step depend only on the seed and the step number
    (``perfusion_ops.training``), so a resumed run needs no generator state to continue exactly."""

    step: int
    losses: Tensor  # (n,), 1 ≤ n ≤ step: the losses of steps step - n + 1 .. step
    moments: dict[str, Tensor]  # learned tensor name -> (2, *shape): exp_avg, exp_avg_sq

    def validate(self, concept: Concept) -> "TrainingState":
        """Raise :class:`ConceptError` unless this state fits ``concept`` and the envelope (``envelope.py``)."""
        if isinstance(self.step, bool) or not isinstance(self.step, int) or not 1 <= self.step <= MAX_STEPS:
            raise ConceptError(f"training state: {self.step!r} steps taken; a state records 1 to {MAX_STEPS}")
        if not isinstance(self.losses, Tensor) or self.losses.ndim != 1 or not 1 <= len(self.losses) <= self.step:
            raise ConceptError(f"training state: the loss history must hold the losses of 1 to {self.step} steps, got "
                               f"shape {tuple(getattr(self.losses, 'shape', ()))}")
        if not bool(torch.isfinite(self.losses).all()):
            raise ConceptError("training state: the loss history contains NaN or infinite values")
        learned = concept.learned
        if set(self.moments) != set(learned):
            odd = sorted(set(self.moments) ^ set(learned))[0]
            raise ConceptError(f"training state: optimizer moments must cover exactly the {len(learned)} learned "
                               f"tensors; '{odd}' is {'missing' if odd in learned else 'not one of them'}")
        for name, moments in self.moments.items():
            if not isinstance(moments, Tensor) or tuple(moments.shape) != (2, *learned[name].shape):
                raise ConceptError(f"training state: the moments of '{name}' must have shape "
                                   f"{(2, *learned[name].shape)}, got {tuple(getattr(moments, 'shape', ()))}")
            if not bool(torch.isfinite(moments).all()) or bool((moments[1] < 0).any()):
                raise ConceptError(f"training state: the moments of '{name}' are not finite, "
                                   "or the second is negative")
        return self


def check_gate(beta: float, tau: float, what: str = "gate") -> None:
    """Refuse absurd gate settings: β must be finite and in ``settings.BETA`` (s(i) = 1), τ in ``settings.TAU``."""
    if beta not in BETA:
        raise ConceptError(f"{what}: β = {beta} is outside {BETA} (the similarity of the concept to itself is 1)")
    if tau not in TAU:
        raise ConceptError(f"{what}: τ = {tau} must be in {TAU}; τ = 0 would make the gate a hard step")


def check_window(window: int) -> None:
    """Refuse a first-opening gate window other than 0 (Eq. 3's gate) or 1 to ``MAX_WINDOW`` tokens."""
    if isinstance(window, bool) or not isinstance(window, int) or not 0 <= window <= MAX_WINDOW:
        raise ConceptError(f"gate window {window!r} must be 0 (the paper's gate) or 1 to {MAX_WINDOW} tokens")


def _check_tensor(tensor: Tensor, name: str, shape: tuple[int, ...]) -> None:
    """``shape`` with -1 for any size; the last size (a width) must be in 1..MAX_WIDTH (the envelope)."""
    if not isinstance(tensor, Tensor):
        raise ConceptError(f"'{name}' is missing or not a tensor")
    if tensor.ndim != len(shape) or any(want != -1 and have != want for have, want in zip(tensor.shape, shape)):
        raise ConceptError(f"'{name}' has shape {tuple(tensor.shape)}, expected {shape}")
    if not 1 <= tensor.shape[-1] <= MAX_WIDTH:
        raise ConceptError(f"'{name}' has shape {tuple(tensor.shape)}: its width must be 1 to {MAX_WIDTH}")
    if not bool(torch.isfinite(tensor).all()):
        raise ConceptError(f"'{name}' contains NaN or infinite values (a diverged training run?)")
