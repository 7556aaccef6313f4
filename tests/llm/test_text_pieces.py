"""Detokenization and stop strings, on the tiny model's real tokenizer."""

import pytest

from services.llm.detokenizer import IncrementalDetokenizer
from services.llm.stop import StopStringMatcher


@pytest.mark.parametrize(
    "text",
    ["plain ascii text", "héllo wörld", "日本語のテキスト", "emoji 🎉🚀 and ZWJ 👩‍💻", "mixed é\n\tü 中 😀 end"],
)
def test_incremental_detokenization_matches_a_full_decode(tiny_llm, text):
    tokenizer = tiny_llm.tokenizer
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces), "no piece may carry half a character"


def test_an_incomplete_character_is_held_back_until_complete(tiny_llm):
    tokenizer = tiny_llm.tokenizer
    ids = tokenizer("🎉", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1, "the emoji spans several byte-level tokens"
    detok = IncrementalDetokenizer(tokenizer)
    assert [detok.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.push(ids[-1]) == "🎉"


def feed_all(matcher, chunks):
    return "".join(matcher.feed(c) for c in chunks)


def test_stop_string_ends_the_text_before_it():
    m = StopStringMatcher(("STOP",))
    assert feed_all(m, ["hello S", "TO", "P world"]) == "hello "
    assert m.stopped


def test_a_partial_stop_string_is_held_back_then_released():
    m = StopStringMatcher(("</end>",))
    assert m.feed("a </e") == "a "
    assert m.feed("nx") == "</enx"
    assert not m.stopped
    assert m.feed("b </") == "b "
    assert m.flush() == "</"


def test_earliest_of_several_stop_strings_wins():
    m = StopStringMatcher(("world", "lo w"))
    assert feed_all(m, ["hello world"]) == "hel"


def test_no_stop_strings_passes_text_through():
    m = StopStringMatcher(())
    assert m.feed("abc") == "abc" and m.flush() == ""
