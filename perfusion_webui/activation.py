"""One generation's Perfusion state, from its prompt tags: the concepts, their gates, the joint edit, the
trigger embeddings, the key-lock prompts and the infotext. Host-agnostic (no webui import)."""
from __future__ import annotations

from dataclasses import dataclass, field

from perfusion_ops.concept import FAMILY_OF_WIDTH, Concept, ConceptError
from perfusion_ops.edit import AppliedConcept, JointEdit
from perfusion_ops.words import replace_words, whole_words
from .prompt_tags import PerfusionTag, check_unique, format_infotext

from .library import ConceptLibrary


@dataclass
class Activation:
    tags: list[PerfusionTag]
    names: list[str]  # library names, in tag order
    concepts: list[Concept]
    applied: list[AppliedConcept]
    hashes: dict[str, str] = field(default_factory=dict)

    @property
    def strengths(self) -> list[float]:
        return [tag.strength for tag in self.tags]

    @property
    def global_lock(self) -> bool:
        return any(tag.lock == "global" for tag in self.tags)

    def edit(self) -> JointEdit:
        """The joint edit (Eq. 4) of all concepts of the prompt, each with its β, τ and strength."""
        return JointEdit(self.applied)

    def triggers(self) -> dict[str, Concept]:
        """Trigger word → concept, for registering the learned embeddings."""
        return {c.trigger: c for c in self.concepts}

    def key_prompt(self, prompt: str) -> str:
        """``prompt`` as K sees it under the global lock: each global-lock trigger word (whole word, any case)
        replaced by its superclass word. Local-lock triggers stay."""
        words = {c.trigger.lower(): c.superclass for t, c in zip(self.tags, self.concepts) if t.lock == "global"}
        return replace_words(prompt, words)

    def infotext(self) -> dict[str, str]:
        return format_infotext(self.tags, self.hashes)

    def triggers_in(self, texts: list[str]) -> list[str]:
        """The trigger words (whole word, any case) that occur in any of ``texts``, in tag order."""
        found = {m.group(1).lower() for text in texts for m in whole_words(self.triggers()).finditer(text)}
        return [c.trigger for c in self.concepts if c.trigger.lower() in found]


def activate(tags: list[PerfusionTag], library: ConceptLibrary, layer_widths: dict[str, int],
             text_width: int, clip_layer: int | None = None) -> Activation:
    """Load and check every tagged concept against the host model; raise :class:`ConceptError` with the
    reason (missing file, wrong model family, CLIP-skip mismatch, two concepts with one trigger)."""
    check_unique(tags)
    names, concepts, applied, hashes = [], [], [], {}
    triggers: dict[str, str] = {}
    for tag in tags:
        path = library.resolve(tag.name)
        name = next((n for n, p in library.files().items() if p == path), tag.name)
        concept = library.load(path)
        if concept.text_encoder != "clip-l":  # an SDXL checkpoint passes the width and layer checks, not the TI path
            raise ConceptError(f"'{name}' is a concept for {FAMILY_OF_WIDTH.get(concept.width, concept.text_encoder)}:"
                               " the webui extension takes SD1.x concepts only (use it in ComfyUI)")
        concept.check_width(text_width)
        concept.check_layers(layer_widths)
        if clip_layer is not None:
            concept.check_clip_layer(clip_layer, f"set 'Clip skip' to {-concept.clip_layer} (file '{name}')")
        other = triggers.get(concept.trigger.lower())
        if other is not None:
            raise ConceptError(f"concepts '{other}' and '{name}' share the trigger word '{concept.trigger}'")
        triggers[concept.trigger.lower()] = name
        default_beta, default_tau = concept.recommended("global" if tag.lock == "global" else "local")
        beta = default_beta if tag.beta is None else tag.beta
        tau = default_tau if tag.tau is None else tag.tau
        lock = "trained-k" if tag.lock == "trained-k" else "local"
        applied.append(AppliedConcept(concept, beta, tau, lock, tag.strength))
        names.append(name)
        concepts.append(concept)
        hashes[tag.name] = library.short_hash(path)
    return Activation(list(tags), names, concepts, applied, hashes)
