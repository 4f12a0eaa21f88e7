"""The concept file: one small safetensors file (never pickle), written atomically, validated on load.

Tensors (fp16 by default): ``embedding`` (N, T), ``i``, ``q``, ``e_sup`` (D,), ``o_v.<layer>`` (out,) per
cross-attention layer, and ``o_k.<layer>`` for trained-K concepts. Layer names are the diffusion model's module
paths (``input_blocks.1.1.transformer_blocks.0.attn2``), the same in ComfyUI and the webui's ldm.
Scalars and words live in the safetensors metadata (string → string). A ``-checkpoint`` file also carries the
:class:`TrainingState` that resuming needs (``state.step``, ``state.losses``, ``state.adam.<name>``; float32, format
version 2). What a file may hold — dtypes, shapes, counts, versions — is defined once, in ``envelope.py``; anything
outside it is refused, never cast or cut.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .concept import Concept, ConceptError, TrainingState
from .envelope import (FORMAT, FORMAT_VERSION, MAX_FILE_BYTES, MAX_HEADER_BYTES, MAX_TENSORS, STATE_SINCE,
                       TENSOR_DTYPES)
from .files import atomic_write_bytes

_DTYPE_NAMES = [str(t).removeprefix("torch.") for t in TENSOR_DTYPES.values()]
_DTYPES_SHOWN = f"{', '.join(_DTYPE_NAMES[:-1])} or {_DTYPE_NAMES[-1]}"  # for messages
_TENSORS = ("embedding", "i", "q", "e_sup")  # and o_v.<layer>, o_k.<layer>
_FLOATS = ("train_beta", "train_tau", "beta_local", "tau_local", "beta_global", "tau_global")
_WORDS = ("trigger", "superclass", "text_encoder", "encoder_fingerprint", "model_family")
_STATE = "state."  # prefix of the training state's tensors and metadata
_MOMENTS = _STATE + "adam."


def concept_to_bytes(concept: Concept, dtype: torch.dtype = torch.float16,
                     state: TrainingState | None = None) -> bytes:
    """Serialise a validated concept to safetensors bytes (tensors cast to ``dtype``, one of the envelope's), with its
    training ``state`` if given (always float32: Adam's second moments underflow in half precision)."""
    if dtype not in TENSOR_DTYPES.values():
        raise ValueError(f"concept files hold {_DTYPES_SHOWN} tensors, not {dtype}")
    concept.validate()
    tensors = {"i": concept.target_input, "q": concept.target_key, "e_sup": concept.superclass_encoding,
               **concept.learned}
    tensors = {name: t.detach().to("cpu", dtype).contiguous() for name, t in tensors.items()}
    version = 1  # what a concept without a state needs: packs that read only version 1 still load it
    metadata = {"format": FORMAT, "clip_layer": str(concept.clip_layer), "gate_window": str(concept.gate_window),
                "layers": json.dumps(concept.layers)}  # safetensors sorts tensor names; keep the UNet order
    if state is not None:
        state.validate(concept)
        version = STATE_SINCE
        metadata[_STATE + "step"] = str(state.step)
        extra = {_STATE + "losses": state.losses, **{_MOMENTS + name: m for name, m in state.moments.items()}}
        tensors |= {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in extra.items()}
    metadata |= {"format_version": str(version)}
    metadata |= {name: str(getattr(concept, name)) for name in _FLOATS + _WORDS}
    metadata |= {f"info.{key}": str(value) for key, value in concept.info.items()}
    return st_save(tensors, metadata=metadata)


def save_concept(concept: Concept, path: str | os.PathLike, dtype: torch.dtype = torch.float16,
                 state: TrainingState | None = None) -> Path:
    """Write ``concept`` (and its training ``state``, see :func:`concept_to_bytes`) to ``path`` atomically: an
    interrupted save leaves any earlier file intact."""
    return atomic_write_bytes(path, concept_to_bytes(concept, dtype, state))


def load_concept(path: str | os.PathLike, expected_width: int | None = None) -> Concept:
    """Read and validate a concept file; every failure is a :class:`ConceptError` naming the file.

    Tensors come back as float32. ``expected_width`` refuses a concept made for another text-encoder width. A
    training state in the file is validated too, and left out (see :func:`load_training_state`)."""
    concept, _ = load_training_state(path)
    if expected_width is not None:
        concept.check_width(expected_width)
    return concept


def load_training_state(path: str | os.PathLike) -> tuple[Concept, TrainingState | None]:
    """The concept of a file and its :class:`TrainingState`, or None where it has none (a finished concept);
    failures as in :func:`load_concept`."""
    path = Path(path)
    name = path.name
    if not path.is_file():
        raise ConceptError(f"concept file '{path}' does not exist")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ConceptError(f"'{name}' is {size / 2**20:.0f} MB: too large for a Perfusion concept "
                           "(a checkpoint or LoRA?)")
    return _parse(path.read_bytes(), name)


def concept_from_bytes(data: bytes, name: str = "concept") -> Concept:
    """Parse safetensors bytes into a validated :class:`Concept` (see :func:`load_concept`)."""
    return _parse(data, name)[0]


def _parse(data: bytes, name: str) -> tuple[Concept, TrainingState | None]:
    tensors, metadata = _read_safetensors(data, name)
    if metadata.get("format") != FORMAT:
        raise ConceptError(
            f"'{name}' is a safetensors file but not a Perfusion concept (no format '{FORMAT}' in its metadata); "
            "LoRAs and embeddings go in their own loaders"
        )
    try:
        version = int(metadata.get("format_version", ""))
    except ValueError:
        raise ConceptError(f"'{name}' has an unreadable format version") from None
    if version > FORMAT_VERSION:
        raise ConceptError(
            f"'{name}' was written by a newer comfyui-perfusion (format v{version}; this one reads up to "
            f"v{FORMAT_VERSION}): update the node pack"
        )
    if version < 1:
        raise ConceptError(f"'{name}' claims format version {version}: Perfusion concept files are versions 1 to "
                           f"{FORMAT_VERSION}")
    state_tensors = {key: tensors.pop(key) for key in list(tensors) if key.startswith(_STATE)}
    stray = [key for key in tensors if key not in _TENSORS and not key.startswith(("o_v.", "o_k."))]
    if stray:
        raise ConceptError(f"'{name}': tensor '{stray[0]}' is not part of a Perfusion concept")
    if (state_tensors or _STATE + "step" in metadata) and version < STATE_SINCE:
        raise ConceptError(f"'{name}': a training state needs format version {STATE_SINCE}, the file says {version}")
    missing = [key for key in _FLOATS + _WORDS if key not in metadata]
    missing += [key for key in _TENSORS if key not in tensors]
    if missing:
        raise ConceptError(f"'{name}' is missing fields: {', '.join(missing)}")
    try:
        scalars = {key: float(metadata[key]) for key in _FLOATS}
        clip_layer = int(metadata.get("clip_layer", "-1"))
        gate_window = int(metadata.get("gate_window", "0"))  # files from before first-opening gates: Eq. 3's
    except ValueError as err:
        raise ConceptError(f"'{name}' has an unreadable setting: {err}") from None
    outputs = {prefix: {k[len(prefix) + 1 :]: t for k, t in tensors.items() if k.startswith(prefix + ".")}
               for prefix in ("o_v", "o_k")}
    try:
        order = json.loads(metadata.get("layers", "[]")) or sorted(outputs["o_v"])
        if sorted(order) != sorted(outputs["o_v"]):
            raise ValueError("the layer list does not match the o_v tensors")
    except (ValueError, TypeError) as err:
        raise ConceptError(f"'{name}' has an inconsistent layer list: {err}") from None
    outputs["o_v"] = {layer: outputs["o_v"][layer] for layer in order}
    concept = Concept(
        embedding=tensors["embedding"],
        target_input=tensors["i"],
        target_key=tensors["q"],
        superclass_encoding=tensors["e_sup"],
        value_outputs=outputs["o_v"],
        key_outputs=outputs["o_k"] or None,
        clip_layer=clip_layer,
        gate_window=gate_window,
        info={k[5:]: v for k, v in metadata.items() if k.startswith("info.")},
        **{key: metadata[key] for key in _WORDS},
        **scalars,
    )
    try:
        concept.validate()
        return concept, _state(state_tensors, metadata, concept)
    except ConceptError as err:
        raise ConceptError(f"'{name}': {err}") from None


def _state(tensors: dict[str, torch.Tensor], metadata: dict[str, str], concept: Concept) -> TrainingState | None:
    """The validated training state of a file's ``state.*`` tensors and metadata, or None where it has none."""
    if not tensors and _STATE + "step" not in metadata:
        return None
    stray = [key for key in tensors if key != _STATE + "losses" and not key.startswith(_MOMENTS)]
    if stray:
        raise ConceptError(f"tensor '{stray[0]}' is not part of a training state")
    try:
        step = int(metadata.get(_STATE + "step", ""))
    except ValueError:
        raise ConceptError("the training state has an unreadable step count") from None
    moments = {key[len(_MOMENTS):]: t for key, t in tensors.items() if key.startswith(_MOMENTS)}
    losses = tensors.get(_STATE + "losses", torch.empty(0))
    return TrainingState(step, losses, moments).validate(concept)


def export_embedding(concept: Concept, path: str | os.PathLike) -> Path:
    """Write the learned trigger embedding as a standard textual-inversion file: ``emb_params`` (N, T) for one text
    encoder, ``clip_l`` and ``clip_g`` for SDXL's two (the layout SDXL embeddings use).

    ComfyUI (``embedding:<name>``) and the webui read this format; it carries no rank-1 edit."""
    parts = concept.embedding_parts()
    names = {"l": "emb_params"} if len(parts) == 1 else {"l": "clip_l", "g": "clip_g"}
    tensors = {names[key]: part.detach().to("cpu", torch.float32).contiguous() for key, part in parts.items()}
    metadata = {"trigger": concept.trigger, "superclass": concept.superclass, "source": FORMAT}
    return atomic_write_bytes(path, st_save(tensors, metadata=metadata))


def _read_safetensors(data: bytes, name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if data[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05") or data[:4] == b"PK\x03\x04":
        raise ConceptError(
            f"'{name}' is a PyTorch pickle (.pt/.ckpt/.bin); concepts are read from safetensors only, "
            "because loading a pickle can run arbitrary code"
        )
    if len(data) < 10:
        raise ConceptError(f"'{name}' is empty or truncated ({len(data)} bytes)")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > len(data) - 8:
        raise ConceptError(f"'{name}' is truncated or not a safetensors file (its header runs past the end)")
    if header_len > MAX_HEADER_BYTES:
        raise ConceptError(f"'{name}' has a {header_len // 1024} KB header: a Perfusion concept's is at most "
                           f"{MAX_HEADER_BYTES // 1024} KB (not a concept, or a damaged one)")
    try:
        header = json.loads(data[8 : 8 + header_len])
        metadata = header.get("__metadata__") or {}
        dtypes = {key: entry.get("dtype") for key, entry in header.items() if key != "__metadata__"}
    except RecursionError:  # json recurses per nesting level: a header of 10⁵ brackets must not escape as this
        raise ConceptError(f"'{name}' is corrupt or not a safetensors file "
                           "(its header is nested too deeply)") from None
    except (ValueError, UnicodeDecodeError, AttributeError) as err:
        raise ConceptError(f"'{name}' is corrupt or not a safetensors file ({err})") from None
    if len(dtypes) > MAX_TENSORS:
        raise ConceptError(f"'{name}' holds {len(dtypes)} tensors: a Perfusion concept holds at most {MAX_TENSORS}")
    for key, dtype in dtypes.items():  # checked before any tensor is read
        if dtype not in TENSOR_DTYPES:
            raise ConceptError(f"'{name}': tensor '{key}' is {dtype}: a Perfusion concept holds {_DTYPES_SHOWN} "
                               "tensors only")
    try:
        tensors = st_load(data)
    except SafetensorError as err:
        raise ConceptError(f"'{name}' is corrupt or not a safetensors file ({err})") from None
    return {key: t.float() for key, t in tensors.items()}, metadata
