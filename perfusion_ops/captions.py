"""Caption sets for estimating the text-encoder covariance.

Perfusion's key-locking needs the uncentered covariance C of the CLIP text encoder's outputs over "typical
prompts"; the paper estimated it from 100K LAION captions. We cannot ship or download LAION, so when the user
gives no caption file we fall back on :func:`builtin_captions`: a stand-in corpus generated here from compact
word lists and sentence templates. It mixes photo-caption style ("A man in a red jacket walking a dog on a beach
at sunset.") with prompt style ("isometric 3d render of a tiny castle, soft shadows, highly detailed") and covers
objects, animals, people, scenes, styles, media, lighting, camera terms, colours, materials, counts and relations
between two subjects, at lengths from 3 words to a few dozen. Stdlib only; deterministic for a given seed.
A real caption file (``read_captions``) is always the better choice when one is available. A caption file is
read only if it is a regular file (a FIFO or a device would block or never end) of at most ``MAX_CAPTION_BYTES``,
and its errors name it by the name the caller gives, never by its folder.
"""
from __future__ import annotations

import hashlib
import operator
import os
import random
import stat
from pathlib import Path


def _words(s: str) -> list[str]:  # space-separated words, "_" standing for a space inside an entry
    return [w.replace("_", " ") for w in s.split()]


def _phrases(s: str) -> list[str]:  # "|"-separated phrases
    return [p.strip() for p in s.split("|")]


ANIMALS = _words("cat dog horse cow sheep goat pig rabbit fox wolf bear deer owl eagle parrot penguin duck swan "
                 "chicken lion tiger elephant giraffe zebra monkey panda koala kangaroo squirrel hedgehog mouse frog "
                 "turtle snake lizard dolphin whale octopus butterfly bee crab seal otter raccoon camel flamingo "
                 "hummingbird puppy kitten goldfish dragon unicorn corgi husky golden_retriever dachshund robin crow")
PEOPLE = _words("man woman boy girl child baby old_man old_woman teenager couple chef doctor nurse firefighter "
                "police_officer soldier astronaut knight wizard witch pirate samurai cowboy ballerina dancer musician "
                "guitarist singer painter farmer fisherman surfer skateboarder cyclist runner student teacher "
                "businessman scientist robot princess monk tourist grandmother toddler bride")
OBJECTS = _words("cup mug teapot vase bottle book lamp chair armchair table sofa clock guitar piano violin camera "
                 "laptop phone umbrella backpack hat boot bicycle car bus train truck motorcycle sailboat canoe "
                 "airplane helicopter hot_air_balloon kite candle mirror key necklace watch bowl basket suitcase "
                 "typewriter radio television globe telescope skateboard surfboard lantern teddy_bear chess_board "
                 "sneaker jar toy_robot apple banana orange lemon pear peach strawberry cherry tomato pumpkin "
                 "watermelon cake cupcake pizza burger sandwich taco croissant donut pie cookie pretzel egg")
PLACES = _words("house cabin castle lighthouse windmill church temple cathedral skyscraper bridge tower barn cottage "
                "palace pagoda tent treehouse greenhouse fountain statue tree palm_tree cactus sunflower rose tulip "
                "mushroom fern bonsai_tree waterfall volcano")
ADJ_ANY = _words("small tiny large giant cute beautiful majestic strange tall lonely mysterious")
ADJ_THING = _words("old ancient vintage modern futuristic rustic broken shiny dusty wet glowing colorful abandoned "
                   "elegant cozy worn round miniature antique handmade")
ADJ_PERSON = _words("happy young curious tired smiling proud grumpy friendly elderly bored")
ADJ_ANIMAL = _words("old happy sleepy curious playful tired grumpy wild friendly fluffy baby")
COLOURS = _words("red blue green yellow orange purple pink black white gray brown golden silver teal turquoise beige")
MATERIALS = _words("wooden glass metal ceramic plastic paper stone marble knitted leather copper porcelain crystal "
                   "bronze velvet")
MADE_OF = _words("wood glass clay paper ice stone gold crystal lego_bricks yarn chocolate marble candy origami_paper")
WEAR = _words("dress jacket raincoat sweater hoodie suit coat scarf t-shirt kimono uniform hat helmet cape apron")
HAIR = _words("long_curly_hair short_hair a_beard glasses freckles a_backpack red_hair a_ponytail a_tattoo "
              "sunglasses braids")
SCENES = _words("beach forest city_street kitchen living_room meadow mountain_valley desert lake park library cafe "
                "train_station rooftop garden river farm classroom harbor market alley cave jungle village island "
                "canyon waterfall bedroom museum highway lagoon vineyard glacier swamp castle_courtyard")
INDOORS = _words("kitchen living_room library cafe classroom bedroom museum bakery greenhouse train_station office "
                 "attic workshop cathedral barn restaurant bookshop spaceship castle_hall")
WHERE = _phrases(
    "on a beach|in a forest|on a city street|in a kitchen|in a living room|on a wooden table|in a field of flowers|"
    "on a snowy mountain|in the desert|by a lake|in a park|underwater|in space|on the moon|in a library|in a cafe|"
    "at a train station|on a rooftop|in a garden|next to a river|on a farm|in a classroom|in a bathroom|on a boat|"
    "in a subway car|at a busy market|in a neon-lit alley|in a cave|in a jungle|on a frozen lake|in an office|"
    "in front of a brick wall|on a white background|in a snowy village|at a music festival|on a rocky coast|"
    "in a bedroom|in a museum|on a country road|in a meadow|on a windowsill|in a small town|at the zoo|in a bakery|"
    "on a sand dune|in a greenhouse|on a bridge|in tokyo|in paris|in new york|in a medieval village|"
    "on an alien planet|in the clouds|on a sofa|in the snow|at the top of a hill|in a swimming pool")
WHEN = _phrases(
    "at sunset|at sunrise|at night|in the morning|at dusk|in winter|in autumn|in the rain|on a foggy morning|"
    "during a thunderstorm|in spring|on a summer afternoon|under a full moon|at golden hour|at noon|"
    "on a cloudy day|at christmas|after the rain|under a starry sky")
LIGHT = _phrases(
    "soft natural light|dramatic lighting|golden hour lighting|studio lighting|backlit|rim light|neon lights|"
    "candlelight|volumetric light|harsh midday sun|moody low-key lighting|cinematic lighting|overcast light|"
    "warm light|cold blue light|god rays|soft shadows")
STYLE = _phrases(
    "watercolor painting|oil painting|pencil sketch|charcoal drawing|35mm film photo|polaroid photo|digital art|"
    "isometric 3d render|low poly 3d model|pixel art|vector illustration|anime style illustration|"
    "comic book illustration|children's book illustration|claymation still|ukiyo-e woodblock print|"
    "stained glass window|mosaic|embroidery|paper cutout|concept art|matte painting|black and white photo|"
    "infrared photo|tilt-shift photo|long exposure photo|double exposure|cyberpunk illustration|steampunk drawing|"
    "art nouveau poster|art deco poster|impressionist painting|pop art print|minimalist line art|blueprint|"
    "tattoo design|flat design icon|3d render|gouache painting|linocut print|fantasy illustration|"
    "vintage postcard|cartoon|ink drawing|photograph|sculpture|chalk drawing on a sidewalk")
VIEWS = _phrases("close-up|wide shot|aerial view|macro shot|top-down view|low angle shot|portrait|side view|"
                 "eye-level shot|telephoto shot|drone shot|bird's-eye view|full body shot|rear view|overhead shot")
CAMERA = VIEWS + _phrases("fisheye lens|shallow depth of field|bokeh|85mm lens|f/1.8|50mm|wide angle lens")
QUALITY = _phrases(
    "highly detailed|8k|trending on artstation|sharp focus|award-winning|hyperrealistic|masterpiece|"
    "intricate details|4k wallpaper|professional photography|ultra realistic|high resolution|octane render|"
    "detailed texture|unsplash|hdr|film grain")
ACT_ANY = _phrases("sleeping|running|jumping|sitting|standing|resting|walking|swimming|looking at the camera|"
                   "playing|hiding|waiting")
ACT_PERSON = _phrases(
    "reading a book|riding a bicycle|drinking coffee|playing the guitar|dancing|cooking dinner|taking a photo|"
    "talking on the phone|carrying a basket|painting a picture|looking out the window|holding an umbrella|"
    "laughing|sitting on a bench|flying a kite|waiting for the bus|eating an ice cream|typing on a laptop|fishing|"
    "surfing a wave|skiing down a slope|waving|smiling|walking a dog|playing chess|writing a letter")
ACT_ANIMAL = _phrases("eating|yawning|curled up|hunting|drinking water|lying in the grass|peeking out|stretching|"
                      "flying|sniffing a flower|wearing a tiny hat|catching a ball")
NEAR = _phrases("next to|on top of|behind|in front of|under|beside|inside|near|surrounded by")
ACTIVE = _phrases("chasing|looking at|playing with|sitting on|hiding behind|hugging|standing next to|"
                  "leaning against|staring at|running away from|reaching for")
COUNTS = _phrases("two|two|three|three|four|five|several|several|a few|a few|many|a group of|a group of|"
                  "a pair of|dozens of|a row of")
DESIGNS = _phrases("logo|icon|sticker|poster|book cover|t-shirt print|emoji|album cover|coloring page|postage stamp")
PLURAL = {"child": "children", "mouse": "mice", "sheep": "sheep", "deer": "deer", "wolf": "wolves",
          "tomato": "tomatoes", "goldfish": "goldfish", "samurai": "samurai", "volcano": "volcanoes"}
MAX_BUILTIN = 200_000  # cap on builtin_captions(count); the grammar yields far more distinct captions than this
MAX_CAPTION_BYTES = 32 * 2**20  # MAX_BUILTIN captions of ~160 bytes: bounds memory and encoding time


def _plural(noun: str) -> str:
    head, _, last = noun.rpartition(" ")
    if last in PLURAL:
        last = PLURAL[last]
    elif last.endswith("man"):
        last = last[:-3] + "men"
    elif last.endswith(("s", "x", "ch", "sh")):
        last += "es"
    elif last.endswith("y") and last[-2] not in "aeiou":
        last = last[:-1] + "ies"
    else:
        last += "s"
    return f"{head} {last}" if head else last


def _a(phrase: str) -> str:  # prefix the indefinite article
    w = phrase.lower()
    return ("an " if w[0] in "aeiou" and not w.startswith(("uni", "eu", "one")) else "a ") + phrase


def _subject(r: random.Random, kind: str | None = None, count_p: float = 0.15, bare: bool = False,
             mods_p: float = 1.0) -> str:
    """A noun phrase: optional count, adjective, colour/material, and for people clothing or features."""
    kind = kind or r.choice(("person", "animal", "animal", "object", "object", "place"))
    noun = r.choice({"person": PEOPLE, "animal": ANIMALS, "object": OBJECTS, "place": PLACES}[kind])
    adjs = ADJ_ANY + {"person": ADJ_PERSON, "animal": ADJ_ANIMAL}.get(kind, ADJ_THING)
    mods = [r.choice(adjs)] if r.random() < 0.45 * mods_p else []
    if r.random() < {"person": 0, "animal": 0.2}.get(kind, 0.35) * mods_p:
        mods.append(r.choice(COLOURS + MATERIALS if kind == "object" else COLOURS))
    suffix = ""
    if kind == "person" and r.random() < 0.45 * mods_p:
        suffix = (f" in {_a(r.choice(COLOURS) + ' ' + r.choice(WEAR))}" if r.random() < 0.6
                  else f" with {r.choice(HAIR)}")
    if r.random() < count_p:
        return f"{r.choice(COUNTS)} {' '.join(mods + [_plural(noun)])}{suffix}"
    core = " ".join(mods + [noun])
    return (core if bare else _a(core)) + suffix


def _living(r: random.Random, **kw) -> tuple[str, str]:
    kind = r.choice(("person", "animal"))
    return _subject(r, kind, **kw), r.choice(ACT_ANY + (ACT_PERSON if kind == "person" else ACT_ANIMAL))


def _tags(r: random.Random, lo: int = 0, hi: int = 4) -> str:  # ", tag, tag" prompt suffix
    pools = r.sample((LIGHT, CAMERA, CAMERA, QUALITY, QUALITY, STYLE, WHEN), min(r.randint(lo, hi), 7))
    return "".join(", " + t for t in dict.fromkeys(r.choice(pool) for pool in pools))  # at most one style, time


def _opt(r: random.Random, pool: list[str], p: float = 0.5) -> str:
    return " " + r.choice(pool) if r.random() < p else ""


def _there(r: random.Random) -> str:
    plural = r.random() < 0.4
    return f"there {'are' if plural else 'is'} {_subject(r, count_p=float(plural))}{_opt(r, WHERE, 0.9)}"


def _long(r: random.Random) -> str:
    s, act = _living(r, count_p=0.1)
    return (f"{s} {act} {r.choice(WHERE)} {r.choice(WHEN)}, with {_subject(r)} {r.choice(NEAR)} {_subject(r)} "
            f"and {_subject(r)} in the background, {r.choice(LIGHT)}, {r.choice(STYLE)}" + _tags(r, 1, 4))


# (weight, template): each template turns the generator into one caption; examples in the comments.
TEMPLATES = [
    (10, lambda r: _subject(r, bare=True, count_p=0.05) + _tags(r, 0, 2)),  # "red vintage bicycle, macro shot"
    (15, lambda r: "{} {}".format(*_living(r)) + _opt(r, WHERE, 0.8) + _opt(r, WHEN, 0.3)),  # a dog running on a beach
    (8, lambda r: f"{_subject(r)} {r.choice(NEAR)} {_subject(r)}{_opt(r, WHERE, 0.5)}"),  # a cat next to a teapot
    (6, lambda r: f"{_living(r)[0]} {r.choice(ACTIVE)} {_subject(r)}{_opt(r, WHERE, 0.6)}"),  # a fox chasing a kite
    (5, lambda r: f"{_living(r, count_p=0)[0]} and {_living(r, count_p=0)[0]} {r.choice(ACT_ANY)}"
                  + _opt(r, WHERE, 0.7)),  # a dog and a cat sleeping on a sofa
    (12, lambda r: _subject(r) + _opt(r, WHERE, 0.6) + _tags(r, 2, 7)),  # comma-separated prompt
    (10, lambda r: f"{_a(r.choice(STYLE))} of {_subject(r)}{_opt(r, WHERE, 0.6)}{_opt(r, WHEN, 0.3)}"
                   + _tags(r, 0, 2)),
    (6, lambda r: f"{r.choice(VIEWS)} of {_subject(r)}{_opt(r, WHERE, 0.7)}" + _tags(r, 0, 2)),  # aerial view of ...
    (6, lambda r: _subject(r, count_p=1.0) + _opt(r, WHERE, 0.9)),  # three red apples on a wooden table
    (4, _there),  # there are two boats on a frozen lake
    (5, lambda r: f"{_a(r.choice(ADJ_ANY + ADJ_THING))} {r.choice(SCENES)}{_opt(r, WHEN, 0.6)} with {_subject(r)} "
                  f"in the {r.choice(('foreground', 'background', 'distance', 'middle'))}"),
    (4, lambda r: f"{_subject(r, r.choice(('animal', 'object', 'place')), 0, mods_p=0)} made of "
                  f"{r.choice(MADE_OF)}" + _tags(r, 0, 3)),  # a giraffe made of origami paper, studio lighting
    (5, lambda r: f"{_subject(r, 'person', 0)} holding {_subject(r, 'object', 0)}{_opt(r, WHERE, 0.6)}"),
    (4, lambda r: "{} {} while {} is {}".format(*_living(r, count_p=0), *_living(r, count_p=0)) + _opt(r, WHERE, 0.5)),
    (4, lambda r: f"{r.choice(WHERE)} {r.choice(WHEN)}, " + "{} {}".format(*_living(r))),  # at night, a cat ...
    (3, lambda r: f"interior of {_a(r.choice(ADJ_THING) + ' ' + r.choice(INDOORS))} with {_subject(r, 'object')} and "
                  f"{_subject(r, 'object')}, {r.choice(LIGHT)}"),
    (4, _long),  # long descriptive caption with background and style
    (4, lambda r: f"{r.choice(DESIGNS)} of {_subject(r, count_p=0)}" + _tags(r, 0, 2)),  # sticker of a cute panda
    (4, lambda r: f"{r.choice(('a photo', 'a picture', 'an image'))} of {_subject(r)}{_opt(r, WHERE, 0.5)}"),  # rare
]


def builtin_captions(count: int = 20000, seed: int = 0) -> list[str]:
    """Return ``count`` distinct generated captions (at least 3 words each), deterministic for ``seed``.

    A stand-in for the paper's LAION caption set (see the module docstring). About 40% are capitalised
    sentence-style captions, the rest lower-case prompts; distinctness ignores case and a trailing period.
    Raises ValueError for ``count < 1`` or ``count > MAX_BUILTIN``.
    """
    count = operator.index(count)
    if not 1 <= count <= MAX_BUILTIN:
        raise ValueError(f"builtin_captions: count must be in [1, {MAX_BUILTIN}], got {count}")
    r = random.Random(seed)
    weights, funcs = zip(*TEMPLATES)
    out, seen, misses = [], set(), 0
    while len(out) < count:
        text = r.choices(funcs, weights)[0](r)
        if text in seen or len(text.split()) < 3:
            misses += 1
            if misses > 20 * count + 10_000:  # grammar exhausted; does not happen up to MAX_BUILTIN
                raise ValueError(f"builtin_captions: the grammar cannot produce {count} distinct captions")
            continue
        seen.add(text)
        if r.random() < 0.4:  # caption style: capitalised sentence, often with a full stop
            text = text[0].upper() + text[1:] + ("." if r.random() < 0.6 else "")
        out.append(text)
    return out


def read_captions(path, name: str | None = None, max_bytes: int = MAX_CAPTION_BYTES) -> list[str]:
    """Read a UTF-8 caption file (a BOM is ignored), one caption per line.

    Strips whitespace, drops blank lines and ``#`` comment lines, and removes duplicates keeping the first
    occurrence. Reads only a regular file of at most ``max_bytes`` (opened without blocking, so a FIFO is refused
    instead of waiting for a writer). Every failure is a ValueError naming the file as ``name`` (default: the base
    name of ``path``), so a message never reveals where the file lives.
    """
    name = name or Path(path).name
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as err:
        raise ValueError(f"caption file '{name}' cannot be opened ({err.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError(f"caption file '{name}' is not a regular file")
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(max_bytes + 1)  # the size may change after fstat: bound the read itself
    if len(data) > max_bytes:
        raise ValueError(f"caption file '{name}' is larger than {max_bytes / 2**20:g} MB: split it or keep the "
                         "captions you want to estimate C from")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"caption file '{name}' is not UTF-8 text (invalid byte at offset {err.start})") from None
    caps = list(dict.fromkeys(s for s in (ln.strip() for ln in text.splitlines()) if s and not s.startswith("#")))
    if not caps:
        raise ValueError(f"caption file '{name}' has no captions (only blank or '#' comment lines)")
    return caps


def caption_source(path: str | None, count: int = 20000, seed: int = 0, name: str | None = None) -> list[str]:
    """Captions for the covariance estimate: the first ``count`` of the user's file when ``path`` is given (see
    :func:`read_captions`; ``name`` is how its errors call it), else ``count`` captions of the built-in corpus."""
    if path:
        return read_captions(path, name)[:count]
    return builtin_captions(count, seed)


def caption_digest(captions: list[str]) -> str:
    """A short hash of the caption list (order and text), to key a covariance estimated from exactly these captions."""
    digest = hashlib.sha256()
    for caption in captions:
        digest.update(caption.encode("utf-8") + b"\n")  # captions never hold a newline: the join is unambiguous
    return digest.hexdigest()[:16]
