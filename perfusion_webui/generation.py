"""One generation's Perfusion state (the activation, the A1111 hooks or Forge edits, the key-lock contexts, the
registered embeddings, the gate monitors) and the global key lock's encoded prompt pairs."""
from __future__ import annotations

import contextlib

from .activation import Activation
from .console import log
from .embeddings import Embeddings
from .hooks import HookedEdit
from .keylock import KeyContexts
from .monitor import GateMonitor


class Generation:
    """What is active for the current generation (module-level: the webui runs one generation at a time)."""

    def __init__(self):
        self.activation: Activation | None = None
        self.hooks: HookedEdit | None = None
        self.keys: KeyContexts | None = None
        self.embeddings = Embeddings()
        self.forge_edits: list = []
        self.monitors: list[GateMonitor] = []

    def edit(self):
        """A fresh joint edit of the active concepts, watched by a :class:`GateMonitor`."""
        edit = self.activation.edit()
        self.monitors.append(GateMonitor(edit))
        return edit

    @property
    def calls(self) -> int:
        hooks = self.hooks.calls if self.hooks is not None else 0
        return hooks + sum(e.calls for e in self.forge_edits)

    def clear(self) -> None:
        if self.activation is not None and self.monitors:
            log.info(f"edit applied in {self.calls} cross-attention layer calls; "
                     + "; ".join(m.report(self.activation.names) for m in self.monitors if m.contexts)
                     + ("" if any(m.contexts for m in self.monitors)
                        else "strength 0: the concepts are off" if not any(self.activation.strengths)
                        else "no text context reached it")
                     + ("" if self.keys is None else f"; global key lock: K context replaced in "
                     f"{self.keys.matched_rows} batch rows"))
        if self.hooks is not None:
            self.hooks.remove()
        self.hooks = None
        self.embeddings.remove()
        self.activation, self.keys = None, None
        self.forge_edits, self.monitors = [], []



def _crossattn(cond):
    return cond["crossattn"] if isinstance(cond, dict) else cond


def key_contexts(p, act: Activation, clip_skip: int) -> KeyContexts | None:
    """Encode every prompt of the batch and its key-lock version (triggers → superclass), the way the webui
    splits it (AND, [from:to:when] schedules), at the CLIP layer of ``clip_skip``, and pair the encodings for
    :class:`KeyContexts`."""
    if not act.global_lock:
        return None
    set_clip_skip = getattr(p.sd_model, "set_clip_skip", None)
    if set_clip_skip is not None:
        # Forge (and Neo) set the CLIP layer when they encode the prompts, after this activation: the first
        # generation after a Clip skip change would pair encodings of the old layer with the new real ones
        set_clip_skip(clip_skip)
    from modules import prompt_parser

    keys = KeyContexts()
    texts = []
    steps = max(int(getattr(p, "steps", 1) or 1), 1)
    for prompt in dict.fromkeys(p.prompts):
        _, subprompts, _ = prompt_parser.get_multicond_prompt_list([prompt])
        for sub in subprompts:
            for _, text in prompt_parser.get_learned_conditioning_prompt_schedules([sub], steps)[0]:
                key = act.key_prompt(text)
                if key != text:
                    texts.append((text, key))
    texts = list(dict.fromkeys(texts))
    if not texts:
        log.info("global key lock: no trigger word in the prompt, nothing to lock")
        return None
    try:  # encode as setup_conds does (A1111 runs it under autocast); each text alone, so no batch padding
        from modules import devices
        autocast = devices.autocast
    except (ImportError, AttributeError):
        autocast = contextlib.nullcontext
    with autocast():
        for text, key in texts:
            real, locked = (_crossattn(p.sd_model.get_learned_conditioning([t]))[0] for t in (text, key))
            if real.shape == locked.shape:
                keys.add(real, locked)
            else:
                log.info(f"global key lock: '{key}' encodes to another length than '{text}'; local lock there")
    return keys
