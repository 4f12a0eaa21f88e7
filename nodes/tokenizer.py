"""Trigger words → learned vectors, on a copy of ComfyUI's SD1 tokenizer (the original stays untouched).

The prompt text is rewritten so each whole trigger word becomes ``embedding:perfusion~<word>~``; ComfyUI's own
embedding path then places the learned vector in the token list. That reuses the host's parsing of weights
``(word:1.3)``, punctuation and long prompts in every tree, and turns a word of several BPE pieces into one vector.
"""
from __future__ import annotations

import copy
import re
import types
from typing import NamedTuple

import torch

SENTINEL = "perfusion~"
TRIGGER_WORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_]*$")


def check_trigger(word: str) -> str:
    """A trigger must be one plain word (letters, digits, underscore): it is matched as a whole word."""
    word = word.strip()
    if not TRIGGER_WORD.match(word):
        raise ValueError(f"trigger word '{word}' must be one word of letters, digits or '_' (e.g. 'hugsy')")
    return word


class Trigger(NamedTuple):
    vector: torch.Tensor  # (N, 768) learned token embedding(s)
    superclass: str


def triggers_of(tokenizer) -> dict[str, Trigger]:
    """The trigger words (lower-cased) a possibly wrapped SD1 tokenizer maps to learned vectors."""
    inner = getattr(tokenizer, getattr(tokenizer, "clip", "clip_l"), None)
    return dict(getattr(inner, "perfusion_triggers", {}))


def replace_triggers(text: str, words: dict[str, str]) -> str:
    """``text`` with each whole-word, case-insensitive occurrence of a key of ``words`` replaced by its value.

    Words that merely contain a trigger, and ``embedding:<trigger>`` names, are left alone."""
    if not words:
        return text
    pattern = r"(?<![\w:~])(" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + r")(?![\w~])"
    return re.sub(pattern, lambda m: words[m.group(1).lower()], text, flags=re.IGNORECASE)


def with_triggers(tokenizer, triggers: dict[str, Trigger]):
    """A copy of an SD1 tokenizer whose CLIP-L part maps each trigger word to its learned vector(s).

    Earlier triggers of a wrapped tokenizer are kept (multi-concept); the same word is replaced."""
    outer = copy.copy(tokenizer)
    name = getattr(outer, "clip", "clip_l")
    inner = copy.copy(getattr(outer, name))
    new = {w.lower(): Trigger(t.vector.detach().float().cpu(), t.superclass) for w, t in triggers.items()}
    inner.perfusion_triggers = triggers_of(tokenizer) | new
    if inner.embedding_directory is None:  # the host only looks up embeddings when it has a directory list
        inner.embedding_directory = []
    inner.tokenize_with_weights = types.MethodType(_tokenize_with_weights, inner)
    inner._try_get_embedding = types.MethodType(_try_get_embedding, inner)
    setattr(outer, name, inner)
    return outer


def _tokenize_with_weights(self, text, *args, **kwargs):
    words = {w: f" embedding:{SENTINEL}{w}~" for w in self.perfusion_triggers}
    return type(self).tokenize_with_weights(self, replace_triggers(text, words), *args, **kwargs)


def _try_get_embedding(self, embedding_name: str):
    if not embedding_name.startswith(SENTINEL):
        return type(self)._try_get_embedding(self, embedding_name)
    word, _, leftover = embedding_name[len(SENTINEL):].partition("~")
    trigger = self.perfusion_triggers.get(word)
    if trigger is None:
        return None, leftover
    vector = trigger.vector
    return (vector[0] if vector.shape[0] == 1 else vector), (leftover if leftover.strip() else "")
