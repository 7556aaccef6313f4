"""ImportAdapter: a LoRA file made elsewhere, streamed to the fine-tune API and served by the diffusion service
by name at once; and every bad file refused up front with what was wrong."""

from __future__ import annotations

import io
import json
import struct

import grpc
import numpy as np
import pytest
from PIL import Image

from modelworks.diffusion.v1 import diffusion_pb2
from modelworks.finetune.v1 import finetune_pb2 as pb
from services.finetune.adapter_import import AdapterImport, lora_format, tensor_names
from shared.errors import InvalidArgument, ResourceExhausted

CHUNK = 64 * 1024


def safetensors_bytes(tensors: dict) -> bytes:
    from safetensors.torch import save

    return save(tensors)


def import_adapter(stub, name: str, data: bytes, base_model: str = "tiny-sd"):
    def messages():
        yield pb.ImportAdapterRequest(info=pb.ImportAdapterInfo(name=name, base_model=base_model))
        for start in range(0, len(data), CHUNK):
            yield pb.ImportAdapterRequest(chunk=data[start : start + CHUNK])

    return stub.ImportAdapter(messages())


def image(diffusion_stub, **fields) -> np.ndarray:
    request = diffusion_pb2.GenerateImagesRequest(model="tiny-sd", prompt="a red fox", steps=4, seed=21, **fields)
    png = diffusion_stub.GenerateImages(request).images[0].png
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def sd_lora(settings):
    from shared.loaders import load_diffusion_pipeline
    from tests.diffusion.lora_files import ATTENTION, random_lora

    pipe = load_diffusion_pipeline(next(m for m in settings.models if m.kind == "diffusion"), settings).pipeline
    return pipe, random_lora(pipe.unet, seed=41, target_modules=ATTENTION)


def test_an_imported_kohya_file_is_served_at_once_like_its_peft_twin(finetune_stub, diffusion_stub, settings, sd_lora):
    from tests.diffusion.lora_files import kohya_unet, save_peft_adapter

    pipe, state = sd_lora
    save_peft_adapter(settings.adapters_dir, pipe, state, "civitai-twin", "tiny-sd")
    adapter = import_adapter(finetune_stub, "civitai-style", safetensors_bytes(kohya_unet(state, alpha=8)))
    assert (adapter.name, adapter.kind, adapter.base_model) == ("civitai-style", pb.JOB_KIND_DIFFUSION, "tiny-sd")
    assert adapter.imported_format == "kohya" and not adapter.job_id
    listed = {a.name: a for a in finetune_stub.ListAdapters(pb.ListAdaptersRequest()).adapters}
    assert listed["civitai-style"].imported_format == "kohya"
    base, twin = image(diffusion_stub), image(diffusion_stub, adapter="civitai-twin")
    imported = image(diffusion_stub, adapter="civitai-style")
    assert not np.array_equal(imported, base)
    assert np.abs(imported - twin).max() <= 1
    half = image(diffusion_stub, adapter="civitai-style", adapter_scale=0.5)
    assert not np.array_equal(half, imported), "served with a weight like any other adapter"


def test_a_diffusers_format_file_imports_too(finetune_stub, diffusion_stub, sd_lora):
    _, state = sd_lora
    tensors = {f"unet.{k}": v for k, v in state.items()}
    adapter = import_adapter(finetune_stub, "plain-diffusers", safetensors_bytes(tensors))
    assert adapter.imported_format == "diffusers"
    assert not np.array_equal(image(diffusion_stub, adapter="plain-diffusers"), image(diffusion_stub))


def _refused(stub, name: str, data: bytes, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        import_adapter(stub, name, data, **kw)
    return caught.value


def test_bad_files_are_refused_with_what_was_found(finetune_stub, sd_lora):
    import torch

    _, state = sd_lora
    good = safetensors_bytes({f"unet.{k}": v for k, v in state.items()})
    cases = {
        "not-safetensors": (b"PK\x03\x04 a zip, not a LoRA", "not a safetensors file"),
        "truncated": (good[: len(good) // 2], "truncated or damaged"),
        "unknown-keys": (
            safetensors_bytes({"model.layers.0.q_proj.weight": torch.zeros(2, 2)}),
            "match no format served here (diffusers, Kohya/A1111 lora_unet_/lora_te_ keys, or Flux's original "
            "names); found e.g. model.layers.0.q_proj.weight",
        ),
    }
    for name, (data, message) in cases.items():
        error = _refused(finetune_stub, name, data)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and message in error.details(), error.details()
    error = _refused(finetune_stub, "for-nothing", good, base_model="no-such-model")
    assert error.code() == grpc.StatusCode.NOT_FOUND and "LoRA files import for: tiny-sd" in error.details()
    error = _refused(finetune_stub, "for-an-llm", good, base_model="tiny-llm")
    assert error.code() == grpc.StatusCode.NOT_FOUND
    error = _refused(finetune_stub, "../up", good)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "invalid adapter name" in error.details()
    import_adapter(finetune_stub, "taken-name", good)
    error = _refused(finetune_stub, "taken-name", good)
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    listed = {a.name for a in finetune_stub.ListAdapters(pb.ListAdaptersRequest()).adapters}
    assert not listed & set(cases), "nothing refused is in the store"


def test_a_stream_without_info_first_is_refused(finetune_stub):
    with pytest.raises(grpc.RpcError) as caught:
        finetune_stub.ImportAdapter(iter([pb.ImportAdapterRequest(chunk=b"x")]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "must carry `info`" in caught.value.details()


def test_the_header_is_read_without_loading_a_tensor(tmp_path):
    path = tmp_path / "lora.safetensors"
    header = json.dumps({"lora_unet_x.lora_down.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\0" * 4)
    assert tensor_names(path) == ["lora_unet_x.lora_down.weight"]
    assert lora_format(["lora_te1_text_model_x.lora_up.weight", "lora_te1_text_model_x.alpha"]) == "kohya"
    assert lora_format(["double_blocks.0.img_attn.qkv.lora_A.weight"]) == "flux-original"
    with pytest.raises(InvalidArgument, match="holds no LoRA weights"):
        lora_format(["x.alpha"])
    with pytest.raises(InvalidArgument, match=r"mixes LoRA key formats \(diffusers, kohya\)"):
        lora_format(["unet.a.lora_A.weight", "lora_unet_b.lora_down.weight"])
    with pytest.raises(InvalidArgument, match="1 of the file's 2 LoRA tensors"):
        lora_format(["unet.a.lora_A.weight", "vae.b.weight"])


def test_an_import_over_the_limit_stops_at_the_limit(tmp_path):
    upload = AdapterImport(tmp_path, limit=10)
    upload.write(b"0123456789")
    with pytest.raises(ResourceExhausted, match=r"finetune\.max_adapter_import_bytes"):
        upload.write(b"x")
    upload.discard()
    assert not upload.staging.exists()


def test_a_header_with_offsets_that_are_not_numbers_is_refused(tmp_path):
    path = tmp_path / "odd.safetensors"
    header = json.dumps({"lora_unet_x.lora_down.weight": {"dtype": "F32", "shape": [1], "data_offsets": ["a", "b"]}})
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\0" * 4)
    with pytest.raises(InvalidArgument, match="truncated or damaged"):
        tensor_names(path)
