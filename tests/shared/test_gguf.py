"""GGUF sources: the prepare step converts them once (by content), serving loads the result, and files that
cannot be served are refused at prepare time with a clear error."""

from __future__ import annotations

import shutil

import pytest

from shared import gguf
from shared.errors import FailedPrecondition, InvalidArgument, NotFound
from shared.settings import ModelEntry, Settings


def entry(source: str, name: str = "m") -> ModelEntry:
    return ModelEntry(name=name, kind="llm", source=source)


@pytest.fixture
def settings(data_dir) -> Settings:
    return Settings.model_validate({"data_dir": data_dir})


def test_a_gguf_file_named_by_path_is_served_from_its_one_conversion(settings, smollm2, tmp_path):
    from shared.loaders import load_causal_lm, prepare

    packaged = ModelEntry.model_validate(smollm2)
    copy = tmp_path / "SmolLM2.Q4_1.gguf"
    shutil.copy(gguf.locate(packaged), copy)
    by_path = entry(f"gguf:{copy}", name="by-path")
    assert prepare(by_path, settings) == str(gguf.converted_folder(packaged, settings)), "same content, one folder"
    loaded = load_causal_lm(by_path, settings)
    assert loaded.model.config.model_type == "llama" and loaded.tokenizer.chat_template


def test_a_changed_file_is_not_served_from_the_old_conversion(settings, smollm2, tmp_path):
    packaged = ModelEntry.model_validate(smollm2)
    changed = tmp_path / "changed.gguf"
    shutil.copy(gguf.locate(packaged), changed)
    with changed.open("r+b") as file:
        file.seek(-16, 2)
        file.write(b"\x00" * 16)
    with pytest.raises(FailedPrecondition, match=r"has not been converted yet; run `python -m shared\.models prepare`"):
        gguf.converted_folder(entry(f"gguf:{changed}"), settings)


def test_a_corrupt_file_is_refused_at_prepare_time(settings, tmp_path):
    corrupt = tmp_path / "broken.gguf"
    corrupt.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(InvalidArgument, match=r"broken\.gguf is not a readable GGUF file"):
        gguf.prepare(entry(f"gguf:{corrupt}"), settings)


def test_an_architecture_transformers_cannot_read_is_refused_naming_the_supported_ones(settings, tmp_path):
    from gguf import GGUFWriter

    path = tmp_path / "rwkv.gguf"
    writer = GGUFWriter(str(path), "rwkv6")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(InvalidArgument, match=r"cannot read 'rwkv6' GGUF files; supported: .*llama.*qwen2"):
        gguf.prepare(entry(f"gguf:{path}"), settings)


def test_missing_files_and_packages_are_not_found(settings, tmp_path):
    with pytest.raises(NotFound, match="no GGUF file at"):
        gguf.prepare(entry(f"gguf:{tmp_path / 'absent.gguf'}"), settings)
    with pytest.raises(NotFound, match="package 'no_such_package' is not installed"):
        gguf.prepare(entry("gguf:package:no_such_package/x.gguf"), settings)


def test_gguf_entries_are_checked_in_the_config():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="gguf_file names a file of an hf: repository"):
        ModelEntry(name="m", kind="llm", source="/models/x", gguf_file="x.gguf")
    with pytest.raises(ValidationError, match="GGUF checkpoints are LLMs"):
        ModelEntry(name="m", kind="diffusion", source="gguf:/models/x.gguf")
