"""What a concept's card on the webui's Extra Networks tab says and inserts; no webui import (``cards_page.py`` puts
it into the webui's page classes).

A click on a LoRA card adds ``<lora:name:w>`` and the LoRA's activation text; a concept card adds the concept's tag
and its trigger word the same way. The user's preferences live in the card's user metadata (``<name>.json`` beside
the file, written by the webui's metadata editor): an activation text in place of the trigger word, a strength and
a gate bias β, each checked against the ranges the tags accept.
"""
from __future__ import annotations

from perfusion_ops.concept import Concept
from perfusion_ops.settings import BETA, GLOBAL, LOCAL, STRENGTH, Range

from .prompt_tags import PerfusionTag, format_tag

ACTIVATION = "activation text"  # the keys LoRA cards use for the same things, so the webui's editors read alike
STRENGTH_KEY = "preferred weight"
BETA_KEY = "preferred beta"


def preference(user_metadata: dict, key: str, allowed: Range) -> float | None:
    """The user's preferred value under ``key``, or None where it is unset, not a number, or outside ``allowed``
    (a hand-edited file never breaks the card; the editor refuses such values when saving)."""
    raw = user_metadata.get(key)
    if raw is None or str(raw).strip() == "":
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return value if value in allowed else None


def inserted_text(name: str, trigger: str, user_metadata: dict) -> str:
    """What a click on the card adds to the prompt: ``<perfusion:name[:strength][:beta=β]>`` then the activation
    text (the trigger word unless the user set another), as a LoRA card adds its tag and activation text. A
    strength of 1 and an unset β leave the tag bare: the concept file's recommended gate applies."""
    strength = preference(user_metadata, STRENGTH_KEY, STRENGTH)
    tag = PerfusionTag(name, strength=1.0 if strength is None else strength,
                       beta=preference(user_metadata, BETA_KEY, BETA))
    words = str(user_metadata.get(ACTIVATION) or trigger).strip()
    return f"{format_tag(tag)} {words}".strip()


def _size(n: int) -> str:
    return f"{n / 1024:.0f} KB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.1f} MB"


def description(concept: Concept | None, size: int, error: str | None = None) -> str:
    """The card's default description, plain text (the webui escapes it: A1111 v1.10.1 shows ``<b>`` as typed):
    trigger, superclass, recommended gate and size; for a file that cannot be used, why, so the card says it
    instead of the page failing."""
    if concept is None:
        return f"cannot be used: {error or 'unreadable file'}"
    beta, tau = concept.recommended(LOCAL)
    if concept.text_encoder != "clip-l":  # activation refuses it (the webui's TI path is SD1.x's)
        note = "; for ComfyUI only"
    else:
        note = "" if concept.clip_layer == -1 else f"; needs Clip skip {-concept.clip_layer}"
    return (f"trigger '{concept.trigger}', a {concept.superclass}; recommended β {beta:.2f}, τ {tau:.2f} "
            f"(local lock); {concept.model_family}, {_size(size)}{note}")


def details(concept: Concept) -> dict[str, str]:
    """The card's metadata popup: what the concept file says about itself."""
    shown = {
        "trigger": concept.trigger,
        "superclass": concept.superclass,
        "model family": concept.model_family,
        "text width": str(concept.width),
        "clip skip": str(-concept.clip_layer),
        "layers": str(len(concept.layers)),
        "keys": "trained (trained-k)" if concept.trained_keys else "locked",
        "recommended gate, local lock": "β {:.3f}, τ {:.3f}".format(*concept.recommended(LOCAL)),
        "recommended gate, global lock": "β {:.3f}, τ {:.3f}".format(*concept.recommended(GLOBAL)),
    }
    return {**shown, **{k: v for k, v in concept.info.items() if k not in shown}}


def search_terms(concept: Concept | None, short_hash: str) -> list[str]:
    """Words the tab's search box finds the card by, besides its path: trigger, superclass and short hash."""
    return [t for t in ((concept.trigger, concept.superclass) if concept else ()) + (short_hash,) if t]
