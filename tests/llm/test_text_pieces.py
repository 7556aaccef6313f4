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


@pytest.fixture(scope="module")
def metaspace_tokenizer():
    """A SentencePiece-style tokenizer (Metaspace: '▁' marks a word start, the decoder drops the first
    one's space), as Llama-2, Mistral and Gemma have; built offline with `tokenizers`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    corpus = ["Hello world, how are you today?", "the quick brown fox jumps over the lazy dog"] * 20
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>")


def test_metaspace_keeps_the_first_generated_tokens_leading_space(metaspace_tokenizer):
    tokenizer = metaspace_tokenizer
    prompt = tokenizer("Hello", add_special_tokens=False)["input_ids"]
    full = tokenizer("Hello world, how are you", add_special_tokens=False)["input_ids"]
    assert full[: len(prompt)] == prompt
    generated = full[len(prompt) :]
    expected = tokenizer.decode(full)[len(tokenizer.decode(prompt)) :]
    assert expected.startswith(" world")

    detok = IncrementalDetokenizer(tokenizer, prompt)
    streamed = "".join(detok.push(i) for i in generated) + detok.flush()
    assert streamed == expected

    unseeded = IncrementalDetokenizer(tokenizer)  # what the window without the prompt would stream
    assert "".join(unseeded.push(i) for i in generated).startswith("world")


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
