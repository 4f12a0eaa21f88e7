"""Trigger words in prompt text: whole words, any case, the longest first (so 'hugsy2' is not read as 'hugsy')."""
from __future__ import annotations

import re


def whole_words(words, not_after: str = "") -> re.Pattern:
    """Matches of any of ``words`` as group 1: not inside a longer word, and not right after a character of
    ``not_after`` (ComfyUI passes ':' to leave ``embedding:<name>`` alone; the webui's prompt editing
    ``[a:b:0.5]`` needs words after ':')."""
    alternatives = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    return re.compile(rf"(?<![\w{re.escape(not_after)}])({alternatives})(?!\w)", re.IGNORECASE)


def replace_words(text: str, words: dict[str, str], not_after: str = "") -> str:
    """``text`` with each whole-word occurrence of a (lower-case) key of ``words`` replaced by its value."""
    if not words:
        return text
    return whole_words(words, not_after).sub(lambda m: words[m.group(1).lower()], text)
