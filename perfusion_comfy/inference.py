"""Inference nodes: Load Concept, Apply (gated rank-1, multi-concept), Global Key Lock, Export Embedding."""
from __future__ import annotations

import logging
import os

import comfy.conds
import folder_paths

from perfusion_ops.concept_file import export_embedding, load_concept
from perfusion_ops.edit import AppliedConcept
from perfusion_ops.settings import BETA, EDIT_LOCKS, GLOBAL, LOCAL, PAPER_GATES, STRENGTH, TAU
from perfusion_ops.files import safe_file_name
from .folders import FOLDER
from .clip_layer import clip_layer, guard_clip_layer
from .keylock import KEYS
from .patching import apply_concept
from .tokenizer import check_trigger, concepts_of, replace_triggers, with_concepts

log = logging.getLogger("perfusion")
CATEGORY = "perfusion"
CONCEPT = "PERFUSION_CONCEPT"
# Apply's gate sources: the concept file's recommendation for a key lock (perfusion_ops/gate_choice.py), or the widgets
GATES = {"recommended (local lock)": LOCAL, "recommended (global lock)": GLOBAL, "beta and tau widgets": None}
OWN_GATE = "beta and tau widgets"  # what a workflow or API prompt from before the gate input meant


class PerfusionLoadConcept:
    DESCRIPTION = "Loads a Perfusion concept (.safetensors, a few dozen KB) from models/perfusion."
    CATEGORY = CATEGORY
    RETURN_TYPES = (CONCEPT,)
    RETURN_NAMES = ("concept",)
    OUTPUT_TOOLTIPS = ("The concept: trigger word, learned embedding and per-layer rank-1 edit targets.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"concept_name": (folder_paths.get_filename_list(FOLDER), {
            "tooltip": "A concept file in models/perfusion (or a 'perfusion:' path of extra_model_paths.yaml)."})}}

    def load(self, concept_name):
        path = folder_paths.get_full_path(FOLDER, concept_name)
        if path is None:
            raise FileNotFoundError(f"concept '{concept_name}' is not in models/perfusion")
        return (load_concept(path),)


class PerfusionApply:
    DESCRIPTION = (
        "Applies a concept: the CLIP maps its trigger word to the learned embedding and the MODEL gets the gated "
        "rank-1 edit of every cross-attention K/V projection (keys locked to the superclass). Chain several Apply "
        "nodes to combine concepts in one prompt; each keeps its own beta/tau."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP")
    OUTPUT_TOOLTIPS = ("The model with the concept's edit (joint with concepts applied before).",
                       "The CLIP that turns the trigger word into the learned embedding.")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "An SD1.x model (or one already patched by Perfusion Apply)."}),
            "clip": ("CLIP", {"tooltip": "The CLIP of the same checkpoint (or one already patched by Apply)."}),
            "concept": (CONCEPT, {"tooltip": "From Perfusion Load Concept or Perfusion Train Concept."}),
            "beta": BETA.widget(PAPER_GATES[LOCAL][0],
                                "Gate bias β (used with gate 'beta and tau widgets'). Lower = stronger concept (more "
                                "likeness), higher = more prompt freedom. Paper: 0.6–0.75 with the local key lock, "
                                "0.4–0.6 with the global key lock."),
            "tau": TAU.widget(PAPER_GATES[LOCAL][1], "Gate temperature τ (used with gate 'beta and tau widgets'): how "
                                                     "sharply the gate opens around β (paper: 0.15 at inference)."),
            "lock": (list(EDIT_LOCKS), {"default": LOCAL, "tooltip":
                     "local: the concept's keys follow its superclass in this model (key lock). trained-k: use "
                     "keys learned in training (only for concepts trained that way; less prompt-faithful)."}),
        }, "optional": {  # optional, and new ones last: API prompts and workflows saved before them still load
            "strength": STRENGTH.widget(1.0, "Scales the concept's whole edit: 0 = off (the trigger still gets the "
                                             "learned embedding), 1 = as trained, above 1 = exaggerated. Unlike beta "
                                             "it does not change where the gate opens."),
            "start_at": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                         "Where in the sampling schedule the concept starts to act (0 = the first step). Outside "
                         "start_at–end_at the model is the unedited one."}),
            "end_at": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                       "Where in the sampling schedule the concept stops acting (1 = the last step). Starting late "
                       "leaves the layout to the prompt; ending early leaves the fine detail to the model."}),
            "gate": (list(GATES), {"default": next(iter(GATES)), "tooltip":
                     "Where beta and tau come from. recommended: the concept file's, measured when it was trained "
                     "(where its trigger's similarity rises above every other word's; the training console prints "
                     "it) for the local key lock or for Perfusion Global Key Lock prompts. 'beta and tau widgets': "
                     "the two widgets (workflows from before this input use them)."}),
        }}

    def apply(self, model, clip, concept, beta, tau, lock, strength=1.0, start_at=0.0, end_at=1.0, gate=OWN_GATE):
        if gate not in GATES:
            raise ValueError(f"unknown gate '{gate}': choose one of {', '.join(GATES)}")
        if GATES[gate] is not None:
            beta, tau = concept.recommended(GATES[gate])
        # the model family first (width, layers): a concept of another family must not be told to change the layer
        patched = apply_concept(model, AppliedConcept(concept, beta, tau, lock, strength, start_at, end_at))
        concept.check_clip_layer(clip_layer(clip),
                                 f"set CLIP Set Last Layer to {concept.clip_layer} before Perfusion Apply")
        if GATES[gate] is not None:
            log.info("[perfusion] '%s': β %.2f, τ %.3f (%s)", concept.trigger, beta, tau, gate)
        trigger = check_trigger(concept.trigger)
        clip = clip.clone()
        clip.tokenizer = with_concepts(clip.tokenizer, {trigger: concept})
        guard_clip_layer(clip)
        return patched, clip


class PerfusionGlobalKeyLock:
    DESCRIPTION = (
        "Encodes a prompt for the global key lock (paper App. C): the K pathway sees the prompt with every trigger "
        "word replaced by its superclass word, the V pathway sees the real prompt. Use it instead of CLIP Text "
        "Encode for the positive prompt, with the MODEL and CLIP from Perfusion Apply. Lower beta (0.4–0.6)."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("Conditioning of the real prompt carrying the superclass prompt for the K pathway.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": ("CLIP", {"tooltip": "The CLIP output of Perfusion Apply (it knows the trigger words)."}),
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                "tooltip": "The prompt, with trigger words, e.g. 'a hugsy dressed as a wizard'."}),
        }}

    def encode(self, clip, text):
        concepts = concepts_of(clip.tokenizer)
        if not concepts:
            raise ValueError("this CLIP has no Perfusion concepts: connect the CLIP output of Perfusion Apply")
        cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
        superclass_text = replace_triggers(text, {w: c.superclass for w, c in concepts.items()})
        keys, _ = clip.encode_from_tokens(clip.tokenize(superclass_text), return_pooled=True)
        if keys.shape != cond.shape:
            raise ValueError(
                "global key lock needs the superclass prompt to tokenize to as many chunks as the prompt; "
                f"got {keys.shape[1]} vs {cond.shape[1]} tokens: shorten the prompt"
            )
        return ([[cond, {"pooled_output": pooled, "model_conds": {KEYS: comfy.conds.CONDCrossAttn(keys)}}]],)


class PerfusionExportEmbedding:
    DESCRIPTION = "Writes the concept's learned trigger embedding to models/embeddings, for embedding:<name> prompts."
    CATEGORY = CATEGORY
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "export"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "concept": (CONCEPT, {"tooltip": "The concept whose trigger embedding to export."}),
            "name": ("STRING", {"default": "perfusion-concept", "tooltip":
                     "File name in models/embeddings (no folders); use it in prompts as embedding:<name>."}),
        }}

    def export(self, concept, name):
        folder = folder_paths.get_folder_paths("embeddings")[0]
        path = export_embedding(concept, os.path.join(folder, safe_file_name(name, folder=folder)))
        message = f"wrote {path}; use embedding:{os.path.splitext(os.path.basename(path))[0]} in prompts"
        return {"ui": {"text": [message]}}
