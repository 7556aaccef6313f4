"""Adapters exported merged (a Hugging Face folder) or as GGUF, through the fine-tune service, and loaded back:
by `from_pretrained`, and by the LLM service (a local folder and a `gguf:` source) next to base + adapter."""

from __future__ import annotations

import re
import subprocess
import sys

import grpc
import pytest
import torch
from peft import LoraConfig, PeftModel, PromptEncoderConfig, get_peft_model

from modelworks.finetune.v1 import finetune_pb2 as pb
from modelworks.finetune.v1 import finetune_pb2_grpc
from modelworks.llm.v1 import llm_pb2, llm_pb2_grpc
from services.finetune.export.merge import export_adapter
from shared.adapters import AdapterInfo, AdapterStore
from shared.loaders import load_causal_lm, prepare
from shared.settings import Settings
from tests.conftest import TEST_SERVER_CONFIG
from tests.finetune.conftest import spawn_two_key_server
from tests.finetune.test_limits import as_key
from tests.harness import spawn_service

pytestmark = pytest.mark.timeout(900)  # the first tests' setup runs four exports (a process each) and starts a server

PROMPT = torch.tensor([[1, 286, 80, 340, 1237]])
QUESTION = "def parse(text):"


def save_adapter(settings, name: str, method: str, seed: int) -> str:
    """A random adapter of `method` for tiny-llm in the adapter store, strong enough to change greedy text."""
    model = load_causal_lm(settings.models[0], settings).model
    torch.manual_seed(seed)
    if method == "p_tuning":
        config = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=64)
    else:
        config = LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
            init_lora_weights=False,
            use_dora=method == "dora",
            use_rslora=method == "rslora",
        )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for parameter_name, parameter in peft_model.named_parameters():
            if "lora_B" in parameter_name:
                parameter.normal_(0, 0.5)
            elif "lora_magnitude_vector" in parameter_name:
                parameter.mul_(torch.empty_like(parameter).uniform_(0.5, 1.5))
    info = AdapterInfo(name=name, kind="llm", base_model="tiny-llm", method=method)
    AdapterStore(settings.adapters_dir).save(info, peft_model.save_pretrained)
    return name


@pytest.fixture(scope="module")
def exported(settings):
    """One adapter of each mergeable method, and p-tuning (which cannot be merged)."""
    return {method: save_adapter(settings, f"export-{method}", method, seed) for seed, method in enumerate(
        ("lora", "dora", "rslora", "p_tuning"))}  # fmt: skip


def logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(PROMPT).logits


@pytest.mark.parametrize("method", ["lora", "dora", "rslora"])
def test_a_merged_export_equals_base_plus_adapter_for_every_mergeable_method(settings, exported, method):
    from transformers import AutoModelForCausalLM

    info = export_adapter(settings, exported[method], "merged", dtype="float32", name=f"merged-{method}-lib")
    assert info.format == "merged" and info.dtype == "float32" and "model.safetensors" in info.files
    assert {"tokenizer.json", "config.json"} <= info.files.keys()
    merged = AutoModelForCausalLM.from_pretrained(settings.exports_dir / info.name)
    base = load_causal_lm(settings.models[0], settings).model
    expected = logits(PeftModel.from_pretrained(base, settings.adapters_dir / exported[method]).eval())
    assert not any("lora" in name for name, _ in merged.named_parameters()), "a plain model, no peft layers"
    torch.testing.assert_close(logits(merged), expected, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def exports(finetune_stub, exported):
    """Through the service: merged float32, merged float16, and GGUF F16 and Q8_0 of the LoRA adapter."""
    made = {}
    for key, fields in {
        "merged": {"format": pb.EXPORT_FORMAT_MERGED, "dtype": "float32"},
        "merged16": {"format": pb.EXPORT_FORMAT_MERGED, "dtype": "float16", "name": "export-lora-merged16"},
        "f16": {"format": pb.EXPORT_FORMAT_GGUF, "gguf_type": "F16"},
        "q8": {"format": pb.EXPORT_FORMAT_GGUF, "gguf_type": "Q8_0"},
    }.items():
        made[key] = finetune_stub.ExportAdapter(pb.ExportAdapterRequest(adapter=exported["lora"], **fields))
    return made


def llm_config(settings, exports) -> dict:
    """tiny-llm (for base + adapter) and each export as a model of its own."""
    exports_dir = settings.exports_dir
    models = [
        *TEST_SERVER_CONFIG["models"],
        *(
            {"name": key, "kind": "llm", "source": str(exports_dir / exports[key].name), "dtype": "float32"}
            for key in ("merged", "merged16")
        ),
        *(
            {
                "name": key,
                "kind": "llm",
                "source": f"gguf:{exports_dir / exports[key].name / (exports[key].name + '.gguf')}",
                "dtype": "float32",
            }
            for key in ("f16", "q8")
        ),
    ]
    return {**TEST_SERVER_CONFIG, "data_dir": str(settings.data_dir), "models": models}


@pytest.fixture(scope="module")
def llm_with_exports(settings, exports, tmp_path_factory):
    config = llm_config(settings, exports)
    served = Settings.model_validate(config)
    for entry in served.models:
        if entry.source.startswith("gguf:"):
            prepare(entry, served)
    server = spawn_service("llm", tmp_path_factory.mktemp("llm-exports"), config, timeout=180)
    with grpc.insecure_channel(server.address) as channel:
        yield llm_pb2_grpc.LLMServiceStub(channel)
    server.stop()


def gguf_metadata(path) -> dict:
    """A GGUF file's metadata, without the vocabulary's long lists."""
    from gguf import GGUFReader

    lists = {"tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"}
    return {k: f.contents() for k, f in GGUFReader(path).fields.items() if k not in lists}


def greedy(stub, model: str, adapter: str = "", n: int = 24) -> llm_pb2.GenerateResponse:
    sampling = llm_pb2.SamplingParams(max_new_tokens=n, ignore_eos=True, logprobs=True)
    return stub.Generate(llm_pb2.GenerateRequest(model=model, prompt=QUESTION, adapter=adapter, sampling=sampling))


def token_ids(reply: llm_pb2.GenerateResponse) -> list[int]:
    return [t.id for t in reply.logprobs]


def test_the_service_lists_reads_and_describes_its_exports(finetune_stub, exports, settings):
    listed = {e.name: e for e in finetune_stub.ListExports(pb.ListExportsRequest()).exports}
    gguf = listed[exports["f16"].name]
    assert (gguf.format, gguf.gguf_type, gguf.adapter, gguf.base_model) == (
        pb.EXPORT_FORMAT_GGUF, "F16", "export-lora", "tiny-llm"
    )  # fmt: skip
    (file,) = gguf.files
    downloaded = b"".join(c.chunk for c in finetune_stub.ReadExport(pb.ReadExportRequest(name=gguf.name)))
    assert downloaded == (settings.exports_dir / gguf.name / file.path).read_bytes() and len(downloaded) == file.bytes
    assert downloaded[:4] == b"GGUF"
    metadata = gguf_metadata(settings.exports_dir / gguf.name / file.path)
    # names llama.cpp knows (llama-cpp-python 0.3.36 loads these files; an unknown pre-tokenizer it refuses)
    assert (metadata["general.architecture"], metadata["tokenizer.ggml.model"]) == ("llama", "gpt2")
    assert metadata["tokenizer.ggml.pre"] == "gpt-2" and metadata["tokenizer.chat_template"]
    assert exports["q8"].total_bytes < 0.7 * exports["f16"].total_bytes, "Q8_0 is about half of F16 for the weights"


def test_a_merged_export_gives_the_greedy_text_of_base_plus_adapter(llm_with_exports):
    expected = greedy(llm_with_exports, "tiny-llm", "export-lora").text
    assert expected != greedy(llm_with_exports, "tiny-llm").text, "the adapter changes the text"
    assert token_ids(greedy(llm_with_exports, "merged")) == token_ids(
        greedy(llm_with_exports, "tiny-llm", "export-lora")
    )
    assert greedy(llm_with_exports, "merged").text == expected


def test_an_f16_gguf_export_loads_back_through_gguf_with_the_same_text_and_tokenizer(llm_with_exports):
    """The F16 GGUF holds exactly the merged float16 weights: the same text as that merged folder."""
    f16, merged16 = greedy(llm_with_exports, "f16"), greedy(llm_with_exports, "merged16")
    assert token_ids(f16) == token_ids(merged16) and f16.text == merged16.text
    assert f16.usage.prompt_tokens == merged16.usage.prompt_tokens
    chat = llm_pb2.GenerateRequest(
        model="f16",
        messages=[llm_pb2.ChatMessage(role="user", content="hello")],
        sampling=llm_pb2.SamplingParams(max_new_tokens=2),
    )
    base_chat = llm_pb2.GenerateRequest(model="tiny-llm", messages=chat.messages, sampling=chat.sampling)
    assert (
        llm_with_exports.Generate(chat).usage.prompt_tokens == llm_with_exports.Generate(base_chat).usage.prompt_tokens
    )


def test_a_q8_gguf_export_holds_the_merged_weights_to_8_bit_rounding(settings, llm_with_exports, exports):
    """Each Q8_0 block of 32 weights is scaled to its absolute maximum over 127: read back through `gguf:`, a
    weight is off by half a step of its block, plus the float16 rounding of the block's scale (on the real
    model, greedy text: test_export_real)."""
    from transformers import AutoModelForCausalLM

    q8_entry = next(e for e in Settings.model_validate(llm_config(settings, exports)).models if e.name == "q8")
    q8 = load_causal_lm(q8_entry, Settings.model_validate(llm_config(settings, exports))).model.state_dict()
    merged = AutoModelForCausalLM.from_pretrained(settings.exports_dir / exports["merged"].name).state_dict()
    checked = 0
    for name, weight in merged.items():
        if weight.ndim != 2 or name == "lm_head.weight":
            continue
        if weight.shape[1] % 32:  # rows not in whole blocks are written in F16
            torch.testing.assert_close(q8[name], weight.half().float(), atol=0, rtol=0)
            continue
        blocks = weight.reshape(weight.shape[0], -1, 32)
        step = blocks.abs().amax(-1, keepdim=True) / 127
        error = (q8[name].reshape(blocks.shape) - blocks).abs()
        assert (error <= step * 0.65 + 1e-7).all(), name  # the block scale itself is a float16: 127 x its rounding
        checked += 1
    assert checked >= 10


@pytest.mark.parametrize(
    ("fields", "code", "message"),
    [
        ({"adapter": "export-p_tuning"}, grpc.StatusCode.FAILED_PRECONDITION, "p-tuning.*cannot be merged"),
        ({"adapter": "no-such-adapter"}, grpc.StatusCode.NOT_FOUND, "not found"),
        (
            {"adapter": "export-lora", "job_id": "j"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "exactly one of adapter or job_id",
        ),
        ({}, grpc.StatusCode.INVALID_ARGUMENT, "exactly one of adapter or job_id"),
        (
            {"adapter": "export-lora", "format": pb.EXPORT_FORMAT_GGUF, "gguf_type": "Q4_K"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "gguf_type must be one of F16, BF16, Q8_0",
        ),
        ({"adapter": "export-lora", "dtype": "int4"}, grpc.StatusCode.INVALID_ARGUMENT, "dtype must be one of"),
        ({"adapter": "export-lora", "name": "../x"}, grpc.StatusCode.INVALID_ARGUMENT, "invalid export name"),
    ],
)
def test_bad_export_requests_are_refused_with_the_reason(finetune_stub, exported, fields, code, message):
    with pytest.raises(grpc.RpcError) as error:
        finetune_stub.ExportAdapter(pb.ExportAdapterRequest(**fields))
    assert error.value.code() == code
    assert re.search(message, error.value.details()), error.value.details()


def test_an_export_name_is_not_overwritten_and_a_deleted_one_is_gone(finetune_stub, exports):
    name = exports["merged"].name
    with pytest.raises(grpc.RpcError) as taken:
        finetune_stub.ExportAdapter(pb.ExportAdapterRequest(adapter="export-lora", dtype="float32"))
    assert taken.value.code() == grpc.StatusCode.ALREADY_EXISTS and name in taken.value.details()
    copy = finetune_stub.ExportAdapter(pb.ExportAdapterRequest(adapter="export-lora", name="export-lora-copy"))
    finetune_stub.DeleteExport(pb.DeleteExportRequest(name=copy.name))
    assert copy.name not in {e.name for e in finetune_stub.ListExports(pb.ListExportsRequest()).exports}
    with pytest.raises(grpc.RpcError) as gone:
        finetune_stub.ReadExport(pb.ReadExportRequest(name=copy.name, path="config.json")).next()
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND


def test_the_command_line_exports_and_refuses_with_exit_code_2(settings, exported, data_dir, tmp_path):
    config = tmp_path / "modelworks.yaml"
    config.write_text(f"data_dir: {data_dir}\nmodels: [{{name: tiny-llm, kind: llm, source: 'builtin:tiny-llm'}}]\n")
    env = {"MODELWORKS_CONFIG": str(config), "PATH": "/usr/bin:/bin"}
    command = [sys.executable, "-m", "services.finetune.export"]
    done = subprocess.run(
        [*command, exported["rslora"], "--format", "gguf", "--gguf-type", "BF16"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "export 'export-rslora-bf16'" in done.stdout
    assert (settings.exports_dir / "export-rslora-bf16" / "export-rslora-bf16.gguf").is_file()
    refused = subprocess.run([*command, exported["p_tuning"]], env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "cannot be merged" in refused.stderr


@pytest.fixture(scope="module")
def two_keys(data_dir, smollm2, redis_server, tmp_path_factory):
    server = spawn_two_key_server(data_dir, redis_server.url, tmp_path_factory.mktemp("export-keys"), "export-keys")
    with grpc.insecure_channel(server.address) as channel:
        yield finetune_pb2_grpc.FineTuneServiceStub(channel)
    server.stop()


def test_another_keys_adapter_and_exports_are_not_found_to_a_key(settings, two_keys):
    """alice exports her adapter; to bob neither it nor its export exists, and he cannot delete it."""
    model = load_causal_lm(settings.models[0], settings).model
    adapter = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    info = AdapterInfo(name="export-alices", kind="llm", base_model="tiny-llm", owner="alice")
    AdapterStore(settings.adapters_dir).save(info, adapter.save_pretrained)
    request = pb.ExportAdapterRequest(adapter="export-alices", format=pb.EXPORT_FORMAT_GGUF)
    with pytest.raises(grpc.RpcError) as hidden:
        two_keys.ExportAdapter(request, metadata=as_key("bob"))
    assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
    export = two_keys.ExportAdapter(request, metadata=as_key("alice"))
    assert export.owner == "alice"
    seen_by_bob = two_keys.ListExports(pb.ListExportsRequest(), metadata=as_key("bob")).exports
    assert export.name not in {e.name for e in seen_by_bob}
    for call in (
        lambda: two_keys.ReadExport(pb.ReadExportRequest(name=export.name), metadata=as_key("bob")).next(),
        lambda: two_keys.DeleteExport(pb.DeleteExportRequest(name=export.name), metadata=as_key("bob")),
    ):
        with pytest.raises(grpc.RpcError) as refused:
            call()
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    two_keys.DeleteExport(pb.DeleteExportRequest(name=export.name), metadata=as_key("alice"))
