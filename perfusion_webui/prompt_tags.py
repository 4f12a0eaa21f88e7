"""``<perfusion:NAME ...>`` prompt tags, as the webui's extra networks write them (``<lora:NAME:0.8>``).

Host-agnostic: no webui import. The webui splits a tag's text at ``:`` itself and hands the items to an
extra network; :func:`tag_from_items` reads those, :func:`parse_prompt` reads raw prompt text (tests, other
hosts), and :func:`format_tag` / :func:`format_infotext` / :func:`parse_infotext` write and read the forms
that go into a picture's generation parameters.

Syntax (items after the name may come in any order; a bare number is the strength)::

    <perfusion:NAME>                              file defaults (β, τ recommended for the lock)
    <perfusion:NAME:0.8>                          strength 0.8
    <perfusion:NAME:beta=0.6:tau=0.15>            gate bias β and temperature τ (paper Eq. 3)
    <perfusion:NAME:lock=global>                  global key lock (paper App. C); also local, trained-k

- ``NAME`` is a concept file's name without ``.safetensors`` (a sub-folder may be given: ``pets/hugsy``).
- ``strength`` s ∈ [0, 2], default 1: the concept's whole contribution to each K/V projection is scaled by s
  (s = 0 leaves the model exactly as without the tag; s = 1 is the paper's edit).
- ``beta`` ∈ [-1, 2] and ``tau`` ∈ (0, 10]: left out, the concept file's recommended values for the lock are used.
- ``lock``: ``local`` (default), ``global`` (K sees the prompt with the trigger word replaced by the superclass
  word; use a lower β, 0.4–0.6) or ``trained-k`` (concepts trained with a learned K only).

Several tags in one prompt combine into one joint edit (paper Eq. 4). The same name twice is an error.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from perfusion_ops.settings import BETA, LOCAL, LOCKS, STRENGTH, TAU

NETWORK = "perfusion"
TAG = re.compile(r"<perfusion:([^>]*)>")  # the webui's own pattern is <(\w+):([^>]+)>, case-sensitive
_ALIASES = {"beta": "beta", "b": "beta", "tau": "tau", "t": "tau", "strength": "strength", "s": "strength",
            "w": "strength", "weight": "strength", "lock": "lock"}
_NAME = re.compile(r"^[^:<>=\\]+$")


class TagError(ValueError):
    """A ``<perfusion:...>`` tag that cannot be used; the message quotes the tag and says why."""


@dataclass(frozen=True)
class PerfusionTag:
    """One parsed tag. ``beta``/``tau`` None mean: the concept file's recommended value for ``lock``."""

    name: str
    strength: float = 1.0
    beta: float | None = None
    tau: float | None = None
    lock: str = LOCAL

    def __post_init__(self):
        if not self.name or not _NAME.match(self.name) or self.name != self.name.strip():
            raise TagError(f"bad concept name {self.name!r} (a file name without ':', '<', '>', '=')")
        if self.strength not in STRENGTH:
            raise TagError(f"{self.name}: strength {self.strength} must be in {STRENGTH}")
        if self.beta is not None and self.beta not in BETA:
            raise TagError(f"{self.name}: beta {self.beta} must be in {BETA} (a concept's similarity to itself is 1)")
        if self.tau is not None and self.tau not in TAU:
            raise TagError(f"{self.name}: tau {self.tau} must be in {TAU}")
        if self.lock not in LOCKS:
            raise TagError(f"{self.name}: lock {self.lock!r} must be one of {', '.join(LOCKS)}")


def tag_from_items(items: list[str]) -> PerfusionTag:
    """A tag from the webui's items (the tag text split at ``:``): ``["hugsy", "0.8", "beta=0.6"]``."""
    items = [str(item).strip() for item in items]
    shown = f"<perfusion:{':'.join(items)}>"
    if not items or not items[0]:
        raise TagError(f"{shown}: no concept name")
    name, values = items[0], {}
    for item in items[1:]:
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = _ALIASES.get(key.strip().lower()) if sep else "strength"
        value = (value if sep else item).strip()
        if key is None:
            raise TagError(f"{shown}: unknown setting {item!r} (use beta=, tau=, strength=, lock=)")
        if key in values:
            raise TagError(f"{shown}: {key} is given twice")
        if key == "lock":
            values[key] = value.lower()
            continue
        try:
            values[key] = float(value)
        except ValueError:
            raise TagError(f"{shown}: {key} {value!r} is not a number") from None
    try:
        return PerfusionTag(name, **values)
    except TagError as err:
        raise TagError(f"{shown}: {err}") from None


def parse_tag(text: str) -> PerfusionTag:
    """One tag from its text, with or without the ``<perfusion:`` ``>`` around it."""
    text = text.strip()
    match = TAG.fullmatch(text)
    return tag_from_items((match.group(1) if match else text).split(":"))


def parse_prompt(prompt: str) -> tuple[str, list[PerfusionTag]]:
    """``(prompt without its perfusion tags, the tags in order)``; raises :class:`TagError` on a bad tag
    or on the same concept named twice. Other tags (``<lora:...>``) are left in the prompt."""
    tags: list[PerfusionTag] = []

    def take(match: re.Match) -> str:
        tags.append(tag_from_items(match.group(1).split(":")))
        return ""

    stripped = TAG.sub(take, prompt)
    check_unique(tags)
    return stripped, tags


def strip_tags(prompt: str) -> str:
    """``prompt`` without any ``<perfusion:...>`` tag (valid or not)."""
    return TAG.sub("", prompt)


def check_unique(tags: list[PerfusionTag]) -> None:
    seen: set[str] = set()
    for tag in tags:
        key = tag.name.lower()
        if key in seen:
            raise TagError(f"concept '{tag.name}' is tagged twice in one prompt; give it once")
        seen.add(key)


def _number(value: float) -> str:
    text = repr(float(value))  # shortest exact form: reads back to the same float
    return text[:-2] if text.endswith(".0") else text


def format_tag(tag: PerfusionTag) -> str:
    """The canonical text of a tag (defaults left out), which :func:`parse_tag` reads back to an equal tag."""
    items = [tag.name]
    if tag.strength != 1.0:
        items.append(_number(tag.strength))
    if tag.beta is not None:
        items.append(f"beta={_number(tag.beta)}")
    if tag.tau is not None:
        items.append(f"tau={_number(tag.tau)}")
    if tag.lock != LOCAL:
        items.append(f"lock={tag.lock}")
    return f"<{NETWORK}:{':'.join(items)}>"


# --------------------------------------------------------------------------------------------- infotext
INFOTEXT_TAGS = "Perfusion"  # generation-parameter keys
INFOTEXT_HASHES = "Perfusion hashes"


def format_infotext(tags: list[PerfusionTag], hashes: dict[str, str]) -> dict[str, str]:
    """Generation parameters for ``tags``: ``{"Perfusion": "<perfusion:a> <perfusion:b:beta=0.5>",
    "Perfusion hashes": "a: 0123456789ab, b: ..."}``. Names lose ``:`` and ``,`` in the hash list."""
    params = {INFOTEXT_TAGS: " ".join(format_tag(tag) for tag in tags)}
    listed = [f"{name.replace(':', '').replace(',', '')}: {digest}" for name, digest in hashes.items()]
    if listed:
        params[INFOTEXT_HASHES] = ", ".join(listed)
    return params


def parse_infotext(params: dict[str, str]) -> tuple[list[PerfusionTag], dict[str, str]]:
    """``(tags, {name: hash})`` from pasted generation parameters; missing keys give empty results, a
    malformed tag raises :class:`TagError`."""
    text = params.get(INFOTEXT_TAGS, "") or ""
    tags = [tag_from_items(m.group(1).split(":")) for m in TAG.finditer(text)]
    hashes = {}
    for part in (params.get(INFOTEXT_HASHES, "") or "").split(","):
        name, sep, digest = part.rpartition(":")
        if sep and name.strip() and digest.strip():
            hashes[name.strip()] = digest.strip()
    return tags, hashes


def restore_prompt(prompt: str, params: dict[str, str], rename: dict[str, str] | None = None) -> str:
    """The prompt after pasting: tags named in ``params`` but missing from ``prompt`` are appended, and tag
    names in ``rename`` (old → new, e.g. a file found by its hash under another name) are replaced."""
    tags, _ = parse_infotext(params)
    rename = rename or {}

    def renamed(match: re.Match) -> str:
        items = match.group(1).split(":")
        if items and items[0].strip() in rename:
            items[0] = rename[items[0].strip()]
        return f"<{NETWORK}:{':'.join(items)}>"

    prompt = TAG.sub(renamed, prompt)
    present = {tag_from_items(m.group(1).split(":")).name.lower() for m in TAG.finditer(prompt)}
    missing = [tag for tag in tags if rename.get(tag.name, tag.name).lower() not in present]
    for tag in missing:
        tag = PerfusionTag(rename.get(tag.name, tag.name), tag.strength, tag.beta, tag.tau, tag.lock)
        prompt = f"{prompt.rstrip()} {format_tag(tag)}".strip()
    return prompt
