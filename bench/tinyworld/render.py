"""Procedural scenes and their captions: coloured, textured shapes at five positions on plain backgrounds.

Images are 32×32 RGB in [-1, 1] (float32, CHW), drawn at 64×64 and box-filtered down (anti-aliased edges).
A scene is one object (size, colour, texture, shape, position, background) or two objects (left and right, or top
and bottom: the world's "S1 on S2").
Captions use the core's neutral templates (App. G) around a description; any attribute may be left out of the
caption, and is then drawn at random, so "a photo of a square" means "some square" (an unnamed colour mostly the
shape's typical one: :func:`realise`). A position is said after its object ("a red square on the left") or before
it ("on the left a photo of a red square"). Under a causal text encoder only the second order puts "where" into the
object's own word, as attributes before a noun reach the noun in CLIP: it is what lets an object's word be attended
in its own place (``__main__.py`` measures both orders).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

SIZE = 32
_HI = 2 * SIZE
SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {  # the world's object colours, RGB 0..255
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230),
    "yellow": (235, 215, 40), "purple": (140, 50, 190), "orange": (245, 130, 20),
}
BACKGROUNDS = {"black": (15, 15, 15), "gray": (128, 128, 128), "white": (240, 240, 240)}
TEXTURES = ("plain", "striped", "dotted")
SIZES = {"small": 5.0, "large": 8.0}  # radius in 32-px units (two-object scenes use 6.5)
POSITIONS = {"left": (9.0, 16.0), "right": (23.0, 16.0), "top": (16.0, 9.0), "bottom": (16.0, 23.0),
             "center": (16.0, 16.0)}
POSITION_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                   "center": "in the center"}
# Novel colours the world never sees; the personal concepts use them (see __main__.py).
OUTLINE = (60, 30, 10)  # dark brown (distinct from every background)
OUTLINE_WIDTH = 1.5  # px at 32×32
NOVEL_COLOURS = {"teal": (20, 175, 165), "pink": (250, 120, 190)}
TEMPLATES = ("a photo of a {}", "a good photo of a {}", "the photo of a {}", "a good photo of the {}", "image of a {}",
             "image of the {}", "A photograph of {}", "A {} shown in a photo", "A photo of {}")


@dataclass(frozen=True)
class Thing:
    shape: str
    colour: str  # a key of COLOURS or NOVEL_COLOURS
    texture: str = "plain"
    size: str = "large"  # "small", "large" or "medium" (two-object scenes)
    position: str = "center"

    def rgb(self) -> tuple[int, ...]:
        """The colour's RGB: a world or novel colour name, or 'rgb:R,G,B'."""
        if self.colour.startswith("rgb:"):
            return tuple(int(v) for v in self.colour[4:].split(","))
        return COLOURS.get(self.colour) or NOVEL_COLOURS[self.colour]


@dataclass(frozen=True)
class Scene:
    things: tuple[Thing, ...]
    background: str = "gray"


def _radius(size: str) -> float:
    return {"medium": 6.5}.get(size, SIZES.get(size, 6.5))


_YY, _XX = np.mgrid[0:_HI, 0:_HI].astype(np.float32) / 2 + 0.25  # pixel centres in 32-px units


def shape_mask(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    """Boolean 64×64 mask of ``shape`` centred at (cx, cy) with 'radius' r (32-px units)."""
    dx, dy = _XX - cx, _YY - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.82 * r
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.15 * r
    if shape == "triangle":  # apex up; base at +0.75 r, half-width r at the base
        top, base = -r, 0.75 * r
        return (dy <= base) & (np.abs(dx) <= (dy - top) / (base - top) * r)
    raise ValueError(f"unknown shape {shape}")


def texture_dark(texture: str) -> np.ndarray:
    """Where the texture shows the darker shade (64×64 boolean); phase fixed to the image grid."""
    if texture == "plain":
        return np.zeros((_HI, _HI), bool)
    if texture == "striped":
        return (np.floor(_YY / 2) % 2) == 1  # 2-px horizontal stripes
    if texture == "dotted":
        fx, fy = (_XX % 4) - 2, (_YY % 4) - 2
        return fx * fx + fy * fy <= 1.0
    raise ValueError(f"unknown texture {texture}")


def render(scene: Scene, rng: np.random.Generator | None = None, jitter: float = 1.5, outline: bool = False,
           ) -> tuple[np.ndarray, np.ndarray]:
    """``(image (3, 32, 32) in [-1, 1], masks (objects, 32, 32) in [0, 1])``, a mask per object;
    ``rng`` jitters position and size.

    ``outline`` draws every object with a dark brown outline (the style of the fine-tuned world model)."""
    rng = rng or np.random.default_rng(0)
    canvas = np.empty((_HI, _HI, 3), np.float32)
    canvas[:] = BACKGROUNDS[scene.background]
    cover = np.zeros((len(scene.things), _HI, _HI), np.float32)
    for n, thing in enumerate(scene.things):
        cx, cy = POSITIONS[thing.position]
        cx, cy = cx + rng.uniform(-jitter, jitter), cy + rng.uniform(-jitter, jitter)
        r = _radius(thing.size) * (1 + rng.uniform(-0.08, 0.08) * (jitter > 0))
        mask = shape_mask(thing.shape, cx, cy, r)
        colour = np.array(thing.rgb(), np.float32)
        dark = texture_dark(thing.texture)
        if outline:
            canvas[shape_mask(thing.shape, cx, cy, r + OUTLINE_WIDTH) & ~mask] = OUTLINE
        canvas[mask] = colour
        canvas[mask & dark] = colour * 0.45
        cover[n, mask] = 1
    image = canvas.reshape(SIZE, 2, SIZE, 2, 3).mean((1, 3))
    masks = cover.reshape(-1, SIZE, 2, SIZE, 2).mean((2, 4))
    return (image.transpose(2, 0, 1) / 127.5 - 1).astype(np.float32), masks


# -- captions ------------------------------------------------------------------------------------------------
def describe(thing: Thing, words: dict[str, bool]) -> str:
    """'large red striped square' with the attributes whose ``words`` flag is set."""
    parts = []
    if words.get("size") and thing.size in SIZES:
        parts.append(thing.size)
    if words.get("colour"):
        parts.append(thing.colour)
    if words.get("texture"):
        parts.append(thing.texture)
    parts.append(thing.shape)
    return " ".join(parts)


def caption(scene: Scene, template: str, words: dict[str, bool], position_first: bool = False) -> str:
    """The caption of ``scene`` in ``template``; ``words`` says which attributes it names; ``position_first`` puts
    each position phrase before its object ("on the left a photo of a red square and on the right a blue circle")
    instead of after it ("a photo of a red square on the left and a blue circle on the right")."""
    where = lambda thing: POSITION_PHRASE[thing.position]
    if len(scene.things) == 1:
        thing = scene.things[0]
        text = template.format(describe(thing, words))
        if words.get("position"):
            text = f"{where(thing)} {text}" if position_first else f"{text} {where(thing)}"
    elif position_first:
        first, second = scene.things
        text = (f"{where(first)} {template.format(describe(first, words))} and {where(second)} a "
                f"{describe(second, words)}")
    else:
        first, second = scene.things
        text = template.format(f"{describe(first, words)} {where(first)} and a {describe(second, words)} "
                               f"{where(second)}")
    if words.get("background"):
        text += f" on a {scene.background} background"
    return text


@dataclass(frozen=True)
class Spec:
    """A caption's content: the scene with ``None`` for every attribute the caption leaves out."""

    things: tuple[tuple[str | None, ...], ...]  # per object: (shape, colour, texture, size, position)
    background: str | None


def random_spec(rng: random.Random, two_objects: float = 0.5, position_first: float = 0.5) -> tuple[Spec, str]:
    """A random caption of the world and what it specifies; each attribute is named with probability 0.75, a scene
    has two objects with probability ``two_objects``, positions come first with probability ``position_first``."""
    named = {k: rng.random() < 0.75 for k in ("size", "colour", "texture", "position", "background")}
    background = rng.choice(list(BACKGROUNDS))
    pick = lambda: (rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(TEXTURES))
    if rng.random() < two_objects:
        named["colour"] = True  # two objects: always say which is which
        first, second = rng.choice((("left", "right"), ("top", "bottom")))
        things = [Thing(*pick(), "medium", first), Thing(*pick(), "medium", second)]
    else:
        things = [Thing(*pick(), rng.choice(list(SIZES)), rng.choice(list(POSITIONS)))]
    scene = Scene(tuple(things), background)
    text = caption(scene, rng.choice(TEMPLATES), named, rng.random() < position_first)
    keep = lambda value, key: value if named[key] else None
    spec = Spec(tuple((t.shape, keep(t.colour, "colour"), keep(t.texture, "texture"),
                       t.size if t.size == "medium" else keep(t.size, "size"),
                       t.position if len(things) == 2 else keep(t.position, "position")) for t in things),
                keep(background, "background"))
    return spec, text


TYPICAL = {"circle": "red", "square": "blue", "triangle": "green", "diamond": "yellow"}  # see :func:`realise`


def realise(spec: Spec, rng: random.Random, typical: float = 0.0) -> Scene:
    """A scene matching ``spec``, each unnamed attribute drawn at random; an unnamed colour is the shape's
    ``TYPICAL`` one with probability ``typical``, so that a shape word carries a colour as SD's nouns carry an
    appearance (0: shape words carry none)."""
    fill = lambda value, choices: value if value is not None else rng.choice(list(choices))
    # no draw at typical 0, so the worlds built before it see the same random stream
    usual = lambda shape, colour: TYPICAL[shape] if colour is None and typical and rng.random() < typical else colour
    things = tuple(Thing(shape, fill(usual(shape, colour), COLOURS), fill(texture, TEXTURES), fill(size, SIZES),
                         fill(position, POSITIONS))
                   for shape, colour, texture, size, position in spec.things)
    return Scene(things, fill(spec.background, BACKGROUNDS))


def random_scene(rng: random.Random, two_objects: float = 0.5, position_first: float = 0.5) -> tuple[Scene, str]:
    """A random world scene and a caption of it."""
    spec, text = random_spec(rng, two_objects, position_first)
    return realise(spec, rng), text


def render_batch(scenes: list[Scene], seed: int, jitter: float = 1.5, outline: bool = False,
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``(images (B, 3, 32, 32), masks (B, 32, 32) of all objects)``; :func:`render` for each object's mask."""
    rng = np.random.default_rng(seed)
    out = [render(s, rng, jitter, outline) for s in scenes]
    return np.stack([o[0] for o in out]), np.stack([o[1].sum(0) for o in out])
