import pytest

from shared.errors import InvalidArgument, NotFound
from shared.registry import ModelRegistry, ModelSource, parse_source
from shared.settings import ModelEntry


def test_sources():
    assert parse_source("hf:Qwen/Qwen2.5-0.5B-Instruct@main") == ModelSource("hf", "Qwen/Qwen2.5-0.5B-Instruct", "main")
    assert parse_source("hf:gpt2") == ModelSource("hf", "gpt2", None)
    assert parse_source("builtin:tiny-llm") == ModelSource("builtin", "tiny-llm")
    assert parse_source("/models/llama").kind == "local"
    with pytest.raises(InvalidArgument):
        parse_source("hf:")


def test_registry_default_and_lookup():
    entries = [
        ModelEntry(name="sd", kind="diffusion", source="builtin:tiny-sd"),
        ModelEntry(name="a", kind="llm", source="builtin:tiny-llm"),
        ModelEntry(name="b", kind="llm", source="hf:org/b"),
    ]
    registry = ModelRegistry(entries, "llm")
    assert registry.names == ["a", "b"]
    assert registry.get("").name == "a"
    assert registry.get("b").source == "hf:org/b"
    with pytest.raises(NotFound, match="served llm models: a, b"):
        registry.get("sd")
