"""Trigger words → learned vectors, through the tokenizer's public entry point and token-list format only.

``clip.tokenize`` calls ``tokenizer.tokenize_with_weights(text, ...)``, which returns ``{key: [[(token, weight[,
word id]), ...] per 77-token chunk]}``, where a token is a vocabulary id or an embedding vector. Apply gives its CLIP
a :class:`TriggerTokenizer` that rewrites each whole trigger word into a *marker*: a word the CLIP vocabulary holds
as one token. The host tokenizes the rewritten prompt as it always does (weights such as ``(hugsy:1.3)``,
punctuation, chunks of long prompts, ``embedding:`` names), and every marker token is then swapped for a row of the
learned embedding. One marker is one token is one vector, so the chunks are exactly the host's own. A marker id
that the rest of the prompt also produces is caught by counting, and another marker is taken.
"""
from __future__ import annotations

import re

import torch

from perfusion_ops.words import replace_words, whole_words

TRIGGER_WORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_]*$")
TOKEN_KEY = "l"  # the CLIP-L token list, in SD1.x and SDXL tokenizers alike
# Rare fragments that CLIP's BPE vocabulary holds as single tokens; each is checked through the host's own
# tokenizer before use, and tests/comfy/test_tokenizer.py checks that all of them pass.
MARKERS = (
    "rctid", "aloils", "kubball", "nishings", "ssummit", "tenstein", "ramatta", "kineni", "thcentury", "elives",
    "entine", "adero", "aguchi", "adish", "ademy", "ddings", "tacular", "pathic", "sfest", "sbridge", "onstorm",
    "stingly", "therapper", "nhljets", "dairyfree", "foxtv", "bbcsport", "hahahha", "xchange", "njcaa", "rendous",
    "aaaah",
)


def check_trigger(word: str) -> str:
    """A trigger must be one plain word (letters, digits, underscore): it is matched as a whole word."""
    word = word.strip()
    if not TRIGGER_WORD.match(word):
        raise ValueError(f"trigger word '{word}' must be one word of letters, digits or '_' (e.g. 'hugsy')")
    return word


NOT_AFTER = ":"  # a word right after ':' is part of ComfyUI's embedding:<name> syntax, never a trigger


def replace_triggers(text: str, words: dict[str, str]) -> str:
    """``text`` with each whole-word occurrence of a (lower-case) key of ``words`` replaced by its value."""
    return replace_words(text, words, NOT_AFTER)


class TriggerTokenizer:
    """A ComfyUI tokenizer that maps trigger words to learned vectors; everything else is the wrapped tokenizer's.

    ``base`` is the host's own tokenizer object, shared and never modified; attributes this class does not define
    are read from it. ``concepts`` maps each trigger word (any case) to its concept."""

    def __init__(self, base, concepts: dict):
        self.base = base
        self.concepts = {word.lower(): concept for word, concept in concepts.items()}
        # the rows put into token lists, {word: {tokenizer key: rows}} (SDXL: a CLIP-L and a bigG row per vector),
        # kept so that the encoder-side check can recognise them by identity
        self.rows = {word: {key: list(part.detach().float().cpu()) for key, part in c.embedding_parts().items()}
                     for word, c in self.concepts.items()}
        self._owner = {id(row): word for word, keys in self.rows.items() for rows in keys.values() for row in rows}
        self._marker_ids: dict[str, int | None] = {}

    def __getattr__(self, name):
        if name.startswith("__") or name in ("base", "concepts", "rows", "_owner", "_marker_ids"):
            raise AttributeError(name)  # probes by copy/pickle before __init__ ran
        return getattr(self.base, name)

    def with_concepts(self, concepts: dict) -> "TriggerTokenizer":
        """A new tokenizer with these concepts added (the same trigger word is replaced); this one is unchanged."""
        return TriggerTokenizer(self.base, self.concepts | {w.lower(): c for w, c in concepts.items()})

    def triggers_in(self, tokens: dict) -> set[str]:
        """The trigger words whose vectors appear in a token list this tokenizer produced."""
        return {self._owner[id(e[0])] for chunks in tokens.values() for chunk in chunks for e in chunk
                if id(e[0]) in self._owner}

    def tokenize_with_weights(self, text: str, return_word_ids: bool = False, **kwargs):
        counts = {w: len(whole_words([w], NOT_AFTER).findall(text)) for w in self.concepts}
        present = [w for w, n in counts.items() if n]
        if not present:
            return self.base.tokenize_with_weights(text, return_word_ids, **kwargs)
        excluded: set[str] = set()
        while True:
            markers = self._assign_markers(present, excluded)  # {word: [marker per vector row]}
            tokens = self.base.tokenize_with_weights(
                replace_triggers(text, {w: " ".join(markers[w]) for w in present}), return_word_ids, **kwargs)
            # every key's list comes from the same vocabulary, so a marker has one id in all of them
            rows = {key: {self._marker_ids[m]: row for w in present for m, row in zip(markers[w], self.rows[w][key])}
                    for key in self.rows[present[0]]}
            found = _count(tokens.get(TOKEN_KEY, []), rows[TOKEN_KEY])
            clashes = {m for w in present for m in markers[w] if found[self._marker_ids[m]] != counts[w]}
            if not clashes:
                return {key: _swap(chunks, rows[key]) if key in rows else chunks for key, chunks in tokens.items()}
            excluded |= clashes  # the prompt itself produces this token: take another marker

    def _assign_markers(self, words: list[str], excluded: set[str]) -> dict[str, list[str]]:
        free = (m for m in MARKERS if m not in excluded and self._marker_id(m) is not None)
        try:
            return {w: [next(free) for _ in self.rows[w][TOKEN_KEY]] for w in words}
        except StopIteration:
            raise RuntimeError("Perfusion: no single-token marker word is left for the trigger words of this prompt "
                               "(too many trigger vectors, or not a CLIP BPE tokenizer)") from None

    def _marker_id(self, marker: str) -> int | None:
        """The one vocabulary id the host tokenizer gives ``marker`` alone, or None if it gives several."""
        if marker not in self._marker_ids:
            chunks = self.base.tokenize_with_weights(marker, True).get(TOKEN_KEY, [])
            ids = [e[0] for chunk in chunks for e in chunk if e[2] != 0]  # word id 0: start, end and padding
            self._marker_ids[marker] = ids[0] if len(ids) == 1 and isinstance(ids[0], int) else None
        return self._marker_ids[marker]


def _count(chunks, rows: dict[int, torch.Tensor]) -> dict[int, int]:
    counts = dict.fromkeys(rows, 0)
    for chunk in chunks:
        for entry in chunk:
            if isinstance(entry[0], int) and entry[0] in counts:
                counts[entry[0]] += 1
    return counts


def _swap(chunks, rows: dict[int, torch.Tensor]):
    """The token list with every marker id replaced by its vector row (weights and word ids kept)."""
    return [[(rows[e[0]], *e[1:]) if isinstance(e[0], int) and e[0] in rows else e for e in chunk]
            for chunk in chunks]


def concepts_of(tokenizer) -> dict:
    """``{trigger word (lower case): concept}`` of a tokenizer (empty for the host's own)."""
    return dict(tokenizer.concepts) if isinstance(tokenizer, TriggerTokenizer) else {}


def with_concepts(tokenizer, concepts: dict) -> TriggerTokenizer:
    """A tokenizer mapping the triggers of ``concepts`` (and those ``tokenizer`` already maps) to their vectors."""
    if isinstance(tokenizer, TriggerTokenizer):
        return tokenizer.with_concepts(concepts)
    return TriggerTokenizer(tokenizer, concepts)
