"""The built-in caption corpus (stand-in for LAION captions) and user caption files."""
import collections
import os
import threading
import time

import pytest

from perfusion_ops.captions import MAX_BUILTIN, builtin_captions, caption_digest, caption_source, read_captions


@pytest.fixture(scope="module")
def corpus():
    return builtin_captions(20000, seed=0)


def _key(caption):
    return caption.lower().rstrip(".")


def _pct(values, p):
    values = sorted(values)
    return values[round(p * (len(values) - 1))]


# --- determinism and distinctness ------------------------------------------------------------------------------

def test_same_seed_same_captions():
    assert builtin_captions(2000, seed=7) == builtin_captions(2000, seed=7)


def test_different_seeds_differ():
    a, b = builtin_captions(2000, seed=0), builtin_captions(2000, seed=1)
    assert a != b
    assert len(set(a) & set(b)) < 200  # mostly different captions, not a reshuffle


def test_shorter_request_is_a_prefix():
    assert builtin_captions(300, seed=5) == builtin_captions(3000, seed=5)[:300]


def test_default_is_20000_distinct(corpus):
    assert builtin_captions() == corpus
    assert len(corpus) == 20000
    assert len({_key(c) for c in corpus}) == 20000  # distinct even ignoring case and a final full stop
    for c in corpus:
        assert isinstance(c, str) and c == c.strip() and "  " not in c and "\n" not in c


def test_generation_is_fast():
    t = time.perf_counter()
    builtin_captions(20000, seed=123)
    assert time.perf_counter() - t < 3.0  # typically ~0.3 s; generous bound against slow CI machines


@pytest.mark.parametrize("count", [0, -1, MAX_BUILTIN + 1])
def test_bad_count_raises(count):
    with pytest.raises(ValueError, match="count"):
        builtin_captions(count)


def test_small_counts():
    assert len(builtin_captions(1)) == 1
    assert len(set(builtin_captions(57, seed=3))) == 57


# --- variety: the corpus must look like a spread of real prompts, not one template ------------------------------

def test_length_spread(corpus):
    words = [len(c.split()) for c in corpus]
    assert min(words) >= 3
    assert _pct(words, 0.05) <= 5
    assert _pct(words, 0.95) >= 18
    assert _pct(words, 0.95) - _pct(words, 0.05) >= 12
    assert 7 <= _pct(words, 0.5) <= 14
    long_ones = sum(w > 40 for w in words)
    assert 0 < long_ones < 0.01 * len(words)  # a few long captions, but rare


def test_vocabulary_size(corpus):
    vocab = {w.strip(".,").lower() for c in corpus for w in c.split()}
    assert len(vocab) >= 700


def test_openings_are_varied(corpus):
    first = collections.Counter(c.split()[0].lower() for c in corpus)
    assert len(first) >= 150
    first_two = collections.Counter(" ".join(c.lower().split()[:2]) for c in corpus)
    assert len(first_two) >= 1500
    assert first_two.most_common(1)[0][1] < 0.05 * len(corpus)  # no opening dominates


def test_photo_of_is_rare(corpus):
    frac = sum(c.lower().startswith("a photo of") for c in corpus) / len(corpus)
    assert frac < 0.10
    generic = sum(c.lower().startswith(("a photo of", "a picture of", "an image of")) for c in corpus)
    assert generic < 0.10 * len(corpus)


def test_caption_and_prompt_styles_mixed(corpus):
    capitalised = sum(c[0].isupper() for c in corpus) / len(corpus)
    with_commas = sum("," in c for c in corpus) / len(corpus)
    assert 0.2 < capitalised < 0.6
    assert 0.2 < with_commas < 0.7


@pytest.mark.parametrize("probes, min_frac", [
    (("watercolor", "oil painting", "pixel art", "35mm film photo", "isometric 3d render", "pencil sketch"), 0.01),
    (("lighting", "light", "backlit", "candlelight", "god rays"), 0.05),
    (("close-up", "aerial view", "macro shot", "wide shot", "bokeh", "85mm lens", "portrait"), 0.03),
    ((" red ", " blue ", " green ", " yellow ", " golden ", " purple ", " white "), 0.05),
    (("wooden", "glass", "marble", "ceramic", "made of"), 0.03),
    (("two ", "three ", "several ", "a few ", "a group of ", "dozens of "), 0.05),
    ((" next to ", " on top of ", " behind ", " in front of ", " chasing ", " looking at ", " holding "), 0.05),
    ((" woman", " man ", " child", " chef", " astronaut", " girl", " boy"), 0.05),
    ((" cat", " dog", " fox", " owl", " horse", " penguin", " elephant"), 0.03),
    ((" beach", " forest", " city street", " kitchen", " desert", " mountain"), 0.03),
    (("at sunset", "at night", "in winter", "in the rain", "at golden hour", "in the morning"), 0.03),
    ((" reading ", " riding ", " running", " sleeping", " dancing", " swimming"), 0.03),
])
def test_category_coverage(corpus, probes, min_frac):
    hits = sum(any(p in f" {c.lower()} " for p in probes) for c in corpus)
    assert hits >= min_frac * len(corpus), (probes, hits)


def test_articles(corpus):
    text = " " + " ".join(_key(c) for c in corpus) + " "
    for bad in (" a apple ", " a owl ", " a elephant ", " an cat ", " an dog "):
        assert bad not in text
    assert " an apple" in text or " an old" in text


# --- user caption files ----------------------------------------------------------------------------------------

def test_read_captions_cleans(tmp_path):
    f = tmp_path / "caps.txt"
    f.write_text("# my captions\n\n  a cat on a mat  \n\t\nA café in Paris, 35mm\n   # indented comment\n"
                 "a cat on a mat\nlast line without newline", encoding="utf-8")
    assert read_captions(f) == ["a cat on a mat", "A café in Paris, 35mm", "last line without newline"]
    assert read_captions(str(f)) == read_captions(f)


def test_read_captions_crlf_and_bom(tmp_path):
    f = tmp_path / "win.txt"
    f.write_bytes("\ufeffa red bus\r\na blue boat\r\n".encode("utf-8"))
    assert read_captions(f) == ["a red bus", "a blue boat"]


@pytest.mark.parametrize("content", ["", "\n\n   \n", "# only\n  # comments\n\n"])
def test_read_captions_empty_file_raises(tmp_path, content):
    f = tmp_path / "empty_captions.txt"
    f.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match="empty_captions.txt"):
        read_captions(f)


def _fifo(path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this system")
    os.mkfifo(path)


@pytest.mark.parametrize("case,message", [
    ("missing", "cannot be opened"),
    ("directory", "not a regular file"),
    ("fifo", "not a regular file"),
    ("too large", "larger than"),
    ("not utf-8", "not UTF-8 text"),
    ("binary", "not UTF-8 text"),
])
def test_hostile_caption_files_are_refused_quickly_naming_only_the_file(tmp_path, case, message):
    """Errors say what is wrong with the file by its name, never where it lives; a FIFO is refused, not waited on."""
    path = tmp_path / "caps.txt"
    if case == "directory":
        path.mkdir()
    elif case == "fifo":
        _fifo(path)
    elif case == "too large":
        path.write_text("a cat on a mat\n" * 100, encoding="utf-8")
    elif case == "not utf-8":
        path.write_bytes("a café\n".encode("latin-1"))
    elif case == "binary":
        path.write_bytes(bytes(range(256)))
    result = {}

    def read():
        try:
            read_captions(path, name="caps.txt", max_bytes=1000)
        except Exception as err:  # noqa: BLE001  (the thread hands the error to the test)
            result["error"] = err

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # blocked in open(): give the FIFO a writer so the thread can end, then fail
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("reading the caption file blocked")
    error = result.get("error")
    assert isinstance(error, ValueError), repr(error)
    assert message in str(error) and "'caps.txt'" in str(error)
    assert str(tmp_path) not in str(error)


def test_caption_file_is_capped_at_the_requested_count(tmp_path):
    f = tmp_path / "caps.txt"
    f.write_text("".join(f"caption number {n}\n" for n in range(100)), encoding="utf-8")
    assert caption_source(str(f), count=10) == [f"caption number {n}" for n in range(10)]


def test_caption_source_prefers_file(tmp_path):
    f = tmp_path / "caps.txt"
    f.write_text("one caption\nanother caption\n", encoding="utf-8")
    assert caption_source(str(f)) == ["one caption", "another caption"]
    assert caption_source(str(f), count=5, seed=9) == ["one caption", "another caption"]


def test_caption_source_builtin_without_file():
    assert caption_source(None, count=50, seed=2) == builtin_captions(50, seed=2)
    assert caption_source("", count=50, seed=2) == builtin_captions(50, seed=2)  # empty widget string = no file


def test_caption_digest_names_the_exact_caption_list():
    captions = builtin_captions(50, seed=2)
    assert caption_digest(captions) == caption_digest(list(captions))
    others = (captions[:49], captions[::-1], builtin_captions(50, seed=3), [captions[0] + " ", *captions[1:]],
              ["a b", "c"], ["a", "b c"])
    digests = {caption_digest(c) for c in others}
    assert len(digests) == len(others) and caption_digest(captions) not in digests
