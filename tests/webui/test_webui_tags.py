"""The ``<perfusion:...>`` tag parser (host-agnostic; the webui splits a tag's text at ':' the same way)."""
import pytest

from perfusion_webui.prompt_tags import (
    PerfusionTag, TagError, format_infotext, format_tag, parse_infotext, parse_prompt, parse_tag, restore_prompt,
    strip_tags, tag_from_items,
)


def test_plain_tag_uses_file_defaults():
    assert parse_tag("<perfusion:hugsy>") == PerfusionTag("hugsy", 1.0, None, None, "local")


@pytest.mark.parametrize("text, expected", [
    ("<perfusion:teddy:beta=0.6:tau=0.15>", PerfusionTag("teddy", beta=0.6, tau=0.15)),
    ("<perfusion:teddy:0.8>", PerfusionTag("teddy", strength=0.8)),
    ("<perfusion:teddy:tau=0.2:0.5:b=0.55>", PerfusionTag("teddy", 0.5, 0.55, 0.2)),  # any order, short keys
    ("<perfusion:teddy:lock=global:beta=0.45>", PerfusionTag("teddy", beta=0.45, lock="global")),
    ("<perfusion:teddy:LOCK=Trained-K>", PerfusionTag("teddy", lock="trained-k")),
    ("<perfusion:pets/hugsy v2:strength=1.5>", PerfusionTag("pets/hugsy v2", strength=1.5)),
    ("<perfusion: teddy : beta = 0.7 >", PerfusionTag("teddy", beta=0.7)),  # spaces around items
    ("<perfusion:teddy::0.5>", PerfusionTag("teddy", strength=0.5)),  # an empty item is ignored
    ("teddy:beta=-0.5:tau=10", PerfusionTag("teddy", beta=-0.5, tau=10.0)),  # bounds are inclusive
])
def test_settings(text, expected):
    assert parse_tag(text) == expected


@pytest.mark.parametrize("text, message", [
    ("<perfusion:>", "no concept name"),
    ("<perfusion::beta=0.5>", "no concept name"),
    ("<perfusion:teddy:beta=abc>", "not a number"),
    ("<perfusion:teddy:beta=2.5>", "beta 2.5 must be in"),
    ("<perfusion:teddy:tau=0>", "tau 0.0 must be in"),
    ("<perfusion:teddy:tau=nan>", "tau nan must be in"),
    ("<perfusion:teddy:strength=3>", "strength 3.0 must be in"),
    ("<perfusion:teddy:-0.1>", "strength -0.1 must be in"),
    ("<perfusion:teddy:gamma=1>", "unknown setting 'gamma=1'"),
    ("<perfusion:teddy:0.5:0.6>", "strength is given twice"),
    ("<perfusion:teddy:beta=0.5:b=0.6>", "beta is given twice"),
    ("<perfusion:teddy:lock=none>", "lock 'none' must be one of"),
    ("<perfusion:ted=dy>", "bad concept name"),  # a name cannot hold '=': the webui would read it as named
])
def test_errors_quote_the_tag(text, message):
    with pytest.raises(TagError) as info:
        parse_tag(text)
    assert message in str(info.value)
    assert "<perfusion:" in str(info.value)


def test_webui_items():
    """The webui hands ExtraNetworkParams.items: the tag text split at ':' (values may be numbers too)."""
    assert tag_from_items(["hugsy", "0.8", "beta=0.6"]) == PerfusionTag("hugsy", 0.8, 0.6)
    assert tag_from_items(["hugsy", 0.8]) == PerfusionTag("hugsy", 0.8)


def test_prompt_strip_and_multi_concept():
    prompt = "a photo of hugsy <perfusion:hugsy:beta=0.6> and cat1<perfusion:cat1:0.7>, <lora:style:0.5> beach"
    stripped, tags = parse_prompt(prompt)
    assert stripped == "a photo of hugsy  and cat1, <lora:style:0.5> beach"  # other networks stay
    assert [t.name for t in tags] == ["hugsy", "cat1"]
    assert tags[1].strength == 0.7
    assert strip_tags(prompt) == stripped
    assert parse_prompt("no tags here") == ("no tags here", [])
    assert strip_tags("bad <perfusion:x:beta=zz> tag") == "bad  tag"  # strip never fails
    with pytest.raises(TagError, match="tagged twice"):
        parse_prompt("<perfusion:hugsy> <perfusion:HUGSY:0.5>")
    assert parse_prompt("<Perfusion:hugsy>")[1] == []  # the network name is case-sensitive, as in the webui


@pytest.mark.parametrize("tag", [
    PerfusionTag("hugsy"), PerfusionTag("hugsy", 0.25, 0.6, 0.15, "global"), PerfusionTag("a b/c", beta=-1.0),
    PerfusionTag("t", tau=0.123456789, lock="trained-k"),
])
def test_format_round_trip(tag):
    assert parse_tag(format_tag(tag)) == tag


def test_format_leaves_defaults_out():
    assert format_tag(PerfusionTag("hugsy")) == "<perfusion:hugsy>"
    assert format_tag(PerfusionTag("hugsy", 0.5, 0.6, None, "global")) == "<perfusion:hugsy:0.5:beta=0.6:lock=global>"


def test_infotext_round_trip_and_paste():
    tags = [PerfusionTag("hugsy", beta=0.6), PerfusionTag("cat1", 0.5)]
    params = format_infotext(tags, {"hugsy": "0123456789ab", "cat1": "ba9876543210"})
    assert params == {"Perfusion": "<perfusion:hugsy:beta=0.6> <perfusion:cat1:0.5>",
                      "Perfusion hashes": "hugsy: 0123456789ab, cat1: ba9876543210"}
    assert parse_infotext(params) == (tags, {"hugsy": "0123456789ab", "cat1": "ba9876543210"})
    assert parse_infotext({}) == ([], {})
    # the pasted prompt kept its tags: only renames apply (a file found by hash under another name)
    prompt = "a photo of hugsy <perfusion:hugsy:beta=0.6> <perfusion:cat1:0.5>"
    assert restore_prompt(prompt, params, {"cat1": "pets/cat1"}) == \
        "a photo of hugsy <perfusion:hugsy:beta=0.6> <perfusion:pets/cat1:0.5>"
    # a prompt that lost its tags gets them back
    assert (restore_prompt("a photo of hugsy", params)
            == "a photo of hugsy <perfusion:hugsy:beta=0.6> <perfusion:cat1:0.5>")
    assert (restore_prompt("p <perfusion:hugsy:beta=0.6>", params)
            == "p <perfusion:hugsy:beta=0.6> <perfusion:cat1:0.5>")
