"""Constrained decoding on the engine: outputs that always parse, next to free rows that do not change."""

from __future__ import annotations

import json
import re
import threading

import jsonschema
import pytest

from services.llm.engine import FinishReason, Sequence
from services.llm.grammar import FormatSpec, GrammarCompiler
from services.llm.params import SamplingConfig
from shared.errors import InvalidArgument
from shared.loaders import load_causal_lm
from tests.llm.engine_helpers import PROMPTS, Collector, GatedCollector, encode, make_engine, run

# Every part bounded (strings, numbers, the whitespace xgrammar allows): a finished output is guaranteed
# well before max_new_tokens, whatever the random model prefers.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["alpha", "beta", "gamma"]},
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 999},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
    },
    "required": ["name", "kind", "ok", "n", "tags"],
    "additionalProperties": False,
}
REGEX = r"[a-c]{2,5}-[0-9]{1,3}"
GRAMMAR = 'root ::= answer " " digit\nanswer ::= "yes" | "no" | "maybe"\ndigit ::= [0-9]'
SAMPLED = dict(temperature=1.0, max_new_tokens=400)


@pytest.fixture(scope="module")
def loaded(settings):
    return load_causal_lm(settings.models[0], settings)


@pytest.fixture(scope="module")
def compiler(loaded):
    vocab = loaded.model.get_output_embeddings().weight.shape[0]
    compiler = GrammarCompiler(loaded.tokenizer, vocab, cache_size=4, max_compile_s=30, max_chars=4096)
    yield compiler
    compiler.shutdown()


@pytest.fixture(scope="module")
def engine(loaded, settings):
    engine = make_engine(loaded, settings, max_batch_size=64, max_waiting=128)
    engine.start()
    yield engine
    engine.shutdown()


def generate_all(engine, loaded, grammar, seeds, prompt=PROMPTS[2]):
    """Submit one constrained sequence per seed at once (they share steps); their (text, final event)."""
    collectors = []
    for seed in seeds:
        collectors.append(Collector())
        config = SamplingConfig(seed=seed, **SAMPLED)
        engine.submit(Sequence(encode(loaded, prompt), config, collectors[-1], grammar=grammar))
    return [c.wait(120) for c in collectors]


def test_every_sampled_output_of_a_json_schema_parses_and_validates(engine, loaded, compiler):
    grammar = compiler.compile(FormatSpec("json_schema", json.dumps(SCHEMA)))
    results = generate_all(engine, loaded, grammar, range(50))
    for text, final in results:
        assert final.finish_reason is FinishReason.EOS, (text, final)
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len({text for text, _ in results}) > 40, "seeds still choose among what the schema allows"


def test_json_object_regex_and_grammar_outputs_match_their_format(engine, loaded, compiler):
    for spec, check in (
        (FormatSpec("regex", REGEX), lambda t: re.fullmatch(REGEX, t)),
        (FormatSpec("grammar", GRAMMAR), lambda t: re.fullmatch(r"(yes|no|maybe) [0-9]", t)),
    ):
        for text, final in generate_all(engine, loaded, compiler.compile(spec), range(20)):
            assert final.finish_reason is FinishReason.EOS and check(text), (spec.kind, text)
    grammar = compiler.compile(FormatSpec("json_object"))
    config = SamplingConfig(max_new_tokens=400)  # greedy: a random model may not close an object sampled
    collector = Collector()
    engine.submit(Sequence(encode(loaded, PROMPTS[0]), config, collector, grammar=grammar))
    text, final = collector.wait()
    if final.finish_reason is FinishReason.EOS:
        assert isinstance(json.loads(text), dict)
    else:
        assert text.lstrip().startswith("{"), text


def test_constrained_unconstrained_and_adapter_rows_share_a_batch_and_free_rows_are_unchanged(
    loaded, settings, adapters, compiler
):
    fresh = load_causal_lm(settings.models[0], settings)  # adapters wrap the model: keep `loaded` clean
    engine = make_engine(fresh, settings)
    engine.start()
    try:
        free = [(PROMPTS[0], None), (PROMPTS[1], adapters[0]), (PROMPTS[3], None)]
        alone = [run(engine, fresh, prompt, adapter=adapter, max_new_tokens=20)[0] for prompt, adapter in free]
        grammar = compiler.compile(FormatSpec("json_schema", json.dumps(SCHEMA)))
        gate = GatedCollector()  # holds the engine so everything below is admitted into one step
        engine.submit(Sequence(encode(fresh, "x"), SamplingConfig(max_new_tokens=2, ignore_eos=True), gate))
        assert gate.holding.wait(60)
        together = []
        for i, (prompt, adapter) in enumerate(free):
            together.append(Collector())
            config = SamplingConfig(max_new_tokens=20, ignore_eos=True)
            engine.submit(Sequence(encode(fresh, prompt), config, together[-1], adapter=adapter))
            constrained = Collector()
            together.append(constrained)
            engine.submit(
                Sequence(encode(fresh, prompt), SamplingConfig(seed=i, **SAMPLED), constrained, grammar=grammar)
            )
        gate.release()
        texts = [c.wait()[0] for c in together]
        assert texts[0::2] == alone
        for text in texts[1::2]:
            jsonschema.validate(json.loads(text), SCHEMA)
    finally:
        engine.shutdown()


def test_a_grammar_ends_its_row_even_when_eos_is_ignored(engine, loaded, compiler):
    grammar = compiler.compile(FormatSpec("regex", "(ab|cd)"))
    collector = Collector()
    config = SamplingConfig(max_new_tokens=50, ignore_eos=True)
    engine.submit(Sequence(encode(loaded, PROMPTS[1]), config, collector, grammar=grammar))
    text, final = collector.wait()
    assert text in ("ab", "cd") and final.finish_reason is FinishReason.EOS


def test_a_cached_format_is_not_compiled_again_and_the_cache_is_bounded(compiler):
    before = compiler.compiles
    first = compiler.compile(FormatSpec("regex", "x[0-9]+"))
    assert compiler.compile(FormatSpec("regex", "x[0-9]+")) is first
    assert compiler.compiles == before + 1
    for i in range(5):
        compiler.compile(FormatSpec("regex", f"y{i}"))
    assert compiler.compile(FormatSpec("regex", "x[0-9]+")) is not first, "the LRU (4) dropped the oldest"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (FormatSpec("json_schema", "{not json"), "not valid JSON"),
        (FormatSpec("json_schema", "[1, 2]"), "must be a JSON object"),
        (FormatSpec("json_schema", json.dumps({"type": "strange"})), "json_schema cannot be used"),
        (FormatSpec("regex", "(unclosed"), "regex cannot be used"),
        (FormatSpec("grammar", "root ::= undefined_rule"), "grammar cannot be used"),
        (FormatSpec("regex", "a" * 5000), r"5000 characters; the limit is 4096 \(llm.max_grammar_chars\)"),
    ],
)
def test_bad_formats_are_refused_naming_what_is_wrong(compiler, spec, message):
    with pytest.raises(InvalidArgument, match=message):
        compiler.compile(spec)


def test_a_compile_past_its_time_limit_is_refused_and_not_retried(loaded):
    vocab = loaded.model.get_output_embeddings().weight.shape[0]
    compiler = GrammarCompiler(loaded.tokenizer, vocab, cache_size=4, max_compile_s=0.5, max_chars=4096)
    busy = threading.Event()
    compiler._pool.submit(busy.wait, 60)  # the one compile worker is taken: this compile cannot finish in time
    try:
        for _ in range(2):
            with pytest.raises(InvalidArgument, match=r"longer than 0.5 s to compile \(llm.max_grammar_compile_s\)"):
                compiler.compile(FormatSpec("regex", "slow"))
    finally:
        busy.set()
        compiler.shutdown()
