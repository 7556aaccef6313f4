"""The fine-tune API on its own: datasets, models, and every bad input refused up front with the right code."""

from __future__ import annotations

import io
import json
import re
import stat
import zipfile

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelworks.finetune.v1 import finetune_pb2 as pb
from modelworks.finetune.v1 import finetune_pb2_grpc
from tests.finetune.conftest import finetune_config, job_request
from tests.harness import spawn_service

CHUNK = 1000


def upload(stub, name: str, fmt: str, data: bytes):
    def messages():
        yield pb.UploadDatasetRequest(info=pb.DatasetInfo(name=name, format=fmt))
        for start in range(0, len(data), CHUNK):
            yield pb.UploadDatasetRequest(chunk=data[start : start + CHUNK])

    return stub.UploadDataset(messages())


def jsonl(*records) -> bytes:
    return "\n".join(json.dumps(r) for r in records).encode() + b"\n"


def png(width: int = 16, height: int = 16) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def zipped(members: dict[str, bytes], links: tuple[str, ...] = ()) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            if name in links:
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, data, zipfile.ZIP_DEFLATED)
    return buffer.getvalue()


def metadata(*names: str) -> bytes:
    return jsonl(*({"file_name": n, "text": f"picture {n}"} for n in names))


def test_lists_the_base_models_and_the_bundled_samples(finetune_stub):
    models = {m.name: m for m in finetune_stub.ListBaseModels(pb.ListBaseModelsRequest()).models}
    assert list(models["tiny-llm"].methods) == ["lora", "dora", "rslora", "p_tuning"]
    assert "q_proj" in models["tiny-llm"].default_target_modules
    assert models["tiny-sd"].kind == pb.JOB_KIND_DIFFUSION and "p_tuning" not in models["tiny-sd"].methods
    datasets = {d.id: d for d in finetune_stub.ListDatasets(pb.ListDatasetsRequest()).datasets}
    llm, images = datasets["sample-llm-lighthouse"], datasets["sample-diffusion-shapes"]
    assert (llm.format, llm.record_type, llm.num_records, llm.bundled) == ("jsonl", "prompt_completion", 40, True)
    assert (images.format, images.record_type, images.num_records) == ("imagefolder_zip", "image_caption", 16)


def test_uploads_are_validated_whole_and_then_listed(finetune_stub):
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    dataset = upload(finetune_stub, "greetings", "jsonl", jsonl(*[chat] * 30))
    assert (dataset.num_records, dataset.record_type, dataset.format) == (30, "chat", "jsonl")
    assert dataset.id.startswith("ds-") and dataset.size_bytes > 30 * CHUNK // 20
    images = upload(
        finetune_stub, "dots", "imagefolder_zip", zipped({"a.png": png(), "metadata.jsonl": metadata("a.png")})
    )
    assert (images.num_records, images.record_type) == (1, "image_caption")
    listed = {d.id for d in finetune_stub.ListDatasets(pb.ListDatasetsRequest()).datasets}
    assert {dataset.id, images.id} <= listed


BAD_UPLOADS = {
    "unknown format": ("csv", b"a,b\n", grpc.StatusCode.INVALID_ARGUMENT, "use one of jsonl, imagefolder_zip"),
    "not JSON on line 3": (
        "jsonl",
        jsonl({"text": "a"}, {"text": "b"}) + b"{oops\n",
        grpc.StatusCode.INVALID_ARGUMENT,
        "line 3: not valid JSON",
    ),
    "mixed record types": (
        "jsonl",
        jsonl({"text": "a"}, {"prompt": "q", "completion": "a"}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "line 2: a prompt_completion record in a dataset of text records",
    ),
    "chat without an assistant turn": (
        "jsonl",
        jsonl({"messages": [{"role": "user", "content": "hi"}]}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "line 1: no assistant turn",
    ),
    "unknown role": (
        "jsonl",
        jsonl({"messages": [{"role": "bot", "content": "hi"}]}),
        grpc.StatusCode.INVALID_ARGUMENT,
        r"line 1: messages\[0\].role is 'bot'",
    ),
    "empty completion": (
        "jsonl",
        jsonl({"prompt": "q", "completion": ""}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "line 1: 'completion' is empty",
    ),
    "no records": ("jsonl", b"\n\n", grpc.StatusCode.INVALID_ARGUMENT, "no records"),
    "not a zip": ("imagefolder_zip", b"PK? no", grpc.StatusCode.INVALID_ARGUMENT, "not a zip file"),
    "path traversal": (
        "imagefolder_zip",
        zipped({"../evil.png": png(), "metadata.jsonl": metadata("../evil.png")}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "unsafe path",
    ),
    "absolute path": (
        "imagefolder_zip",
        zipped({"/etc/evil.png": png(), "metadata.jsonl": metadata("a.png")}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "unsafe path",
    ),
    "a symbolic link": (
        "imagefolder_zip",
        zipped({"a.png": b"/etc/passwd", "metadata.jsonl": metadata("a.png")}, links=("a.png",)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "symbolic link",
    ),
    "no metadata.jsonl": ("imagefolder_zip", zipped({"a.png": png()}), grpc.StatusCode.INVALID_ARGUMENT, "metadata"),
    "a file that is not an image": (
        "imagefolder_zip",
        zipped({"a.png": b"just text", "metadata.jsonl": metadata("a.png")}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "'a.png' is not a readable image",
    ),
    "a file not in the metadata": (
        "imagefolder_zip",
        zipped({"a.png": png(), "notes.txt": b"hello", "metadata.jsonl": metadata("a.png")}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "'notes.txt' is not listed",
    ),
    "a sliver of an image": (
        "imagefolder_zip",
        zipped({"a.png": png(200, 16), "metadata.jsonl": metadata("a.png")}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "200x16; sides may differ at most 8-fold",
    ),
    "metadata naming a missing file": (
        "imagefolder_zip",
        zipped({"a.png": png(), "metadata.jsonl": metadata("a.png", "b.png")}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "line 2: 'b.png' is not a file in the zip",
    ),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_a_bad_upload_is_refused_saying_where_and_why(finetune_stub, finetune_server, case):
    fmt, data, code, message = BAD_UPLOADS[case]
    with pytest.raises(grpc.RpcError) as caught:
        upload(finetune_stub, "bad", fmt, data)
    assert caught.value.code() == code
    assert re.search(message, caught.value.details()), caught.value.details()
    assert_healthy(finetune_server)


@pytest.fixture(scope="module")
def small_limits_stub(data_dir, smollm2, redis_server, tmp_path_factory):
    """An API with tiny upload limits, to hit them with small files."""
    config = finetune_config(
        data_dir, redis_server.url, max_upload_bytes=20_000, max_image_bytes=5_000, max_image_pixels=1_000
    )
    server = spawn_service("finetune", tmp_path_factory.mktemp("finetune-small"), config)
    with grpc.insecure_channel(server.address) as channel:
        yield finetune_pb2_grpc.FineTuneServiceStub(channel)
    server.stop()


def test_uploads_are_bounded_and_bombs_and_huge_images_refused(small_limits_stub):
    cases = [
        (jsonl(*[{"text": "x" * 100}] * 300), "jsonl", grpc.StatusCode.RESOURCE_EXHAUSTED, "max_upload_bytes"),
        (
            zipped({"a.png": b"\0" * 2_000_000, "metadata.jsonl": metadata("a.png")}),  # deflates to ~2 kB
            "imagefolder_zip",
            grpc.StatusCode.INVALID_ARGUMENT,
            "inflates past the limit",
        ),
        (
            zipped({"a.png": png(64, 64), "metadata.jsonl": metadata("a.png")}),
            "imagefolder_zip",
            grpc.StatusCode.INVALID_ARGUMENT,
            "64x64; the limit is 1000 pixels",
        ),
    ]
    for data, fmt, code, message in cases:
        with pytest.raises(grpc.RpcError) as caught:
            upload(small_limits_stub, "bounded", fmt, data)
        assert caught.value.code() == code and message in caught.value.details(), caught.value.details()


def test_the_first_upload_message_must_say_what_comes(finetune_stub):
    with pytest.raises(grpc.RpcError) as caught:
        finetune_stub.UploadDataset(iter([pb.UploadDatasetRequest(chunk=b"{}")]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "info" in caught.value.details()


def hp(**fields) -> dict:
    return fields


BAD_JOBS = {
    "no kind": (pb.CreateJobRequest(base_model="tiny-llm"), grpc.StatusCode.INVALID_ARGUMENT, "kind must be"),
    "unknown base model": (
        pb.CreateJobRequest(kind=pb.JOB_KIND_LLM, base_model="gpt-9", dataset_id="sample-llm-lighthouse"),
        grpc.StatusCode.NOT_FOUND,
        "base model 'gpt-9' not found; configured models: tiny-llm, tiny-sd, smollm2-135m-instruct",
    ),
    "an embedding model as base": (
        pb.CreateJobRequest(kind=pb.JOB_KIND_LLM, base_model="tiny-embed", dataset_id="sample-llm-lighthouse"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "base model 'tiny-embed' is an embedding model; jobs train llm and diffusion models",
    ),
    "base model of the other kind": (
        pb.CreateJobRequest(kind=pb.JOB_KIND_LLM, base_model="tiny-sd", dataset_id="sample-llm-lighthouse"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "is a diffusion model",
    ),
    "unknown dataset": (
        pb.CreateJobRequest(kind=pb.JOB_KIND_LLM, base_model="tiny-llm", dataset_id="ds-nope", adapter_name="x"),
        grpc.StatusCode.NOT_FOUND,
        "dataset 'ds-nope' not found",
    ),
    "dataset of the other kind": (
        pb.CreateJobRequest(
            kind=pb.JOB_KIND_LLM, base_model="tiny-llm", dataset_id="sample-diffusion-shapes", adapter_name="x"
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "needs jsonl",
    ),
    "no adapter name": (job_request("llm", "lora", ""), grpc.StatusCode.INVALID_ARGUMENT, "adapter_name is required"),
    "a path as adapter name": (job_request("llm", "lora", "../x"), grpc.StatusCode.INVALID_ARGUMENT, "adapter name"),
    "an adapter that exists": (job_request("llm", "lora", "lora-a"), grpc.StatusCode.ALREADY_EXISTS, "already exists"),
    "unknown method": (
        job_request("llm", "qlora", "x"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "use one of lora, dora, rslora, p_tuning",
    ),
    "p_tuning for diffusion": (
        job_request("diffusion", "p_tuning", "x"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "not available for diffusion models",
    ),
    "learning rate NaN": (
        job_request("llm", "lora", "x", learning_rate=float("nan")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "learning_rate must be a finite number",
    ),
    "learning rate too high": (
        job_request("llm", "lora", "x", learning_rate=5.0),
        grpc.StatusCode.INVALID_ARGUMENT,
        r"learning_rate must be in \[1e-08, 1\]",
    ),
    "dropout out of range": (
        job_request("llm", "lora", "x", lora_dropout=1.5),
        grpc.StatusCode.INVALID_ARGUMENT,
        r"lora_dropout must be in \[0, 0.9\]",
    ),
    "unknown scheduler": (
        job_request("llm", "lora", "x", lr_scheduler="step"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "linear, cosine, constant",
    ),
    "unknown precision": (
        job_request("llm", "lora", "x", mixed_precision="fp8"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "no, bf16, fp16",
    ),
    "too many steps": (
        job_request("llm", "lora", "x", max_steps=2_000_000),
        grpc.StatusCode.INVALID_ARGUMENT,
        "max_steps must be at most 1000000",
    ),
    "a layer the model lacks": (
        job_request("llm", "lora", "x", target_modules=["c_attn"]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "c_attn are not LoRA-able layers of this llama model; choose from q_proj",
    ),
    "a rank past the server's limit": (
        job_request("llm", "lora", "x", lora_r=128),
        grpc.StatusCode.INVALID_ARGUMENT,
        r"lora_r must be at most 64 \(the server's llm.max_lora_rank\), got 128",
    ),
    "the output head as a target": (
        job_request("llm", "lora", "x", target_modules=["q_proj", "lm_head"]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "lm_head are the output head or the embeddings.*llm.allow_embedding_lora_targets is off",
    ),
    "sequences longer than the context": (
        job_request("llm", "lora", "x", max_seq_length=200_000),
        grpc.StatusCode.INVALID_ARGUMENT,
        "exceeds the model's context of 131072",
    ),
    "virtual tokens past the context": (
        job_request("llm", "p_tuning", "x", max_seq_length=131060),
        grpc.StatusCode.INVALID_ARGUMENT,
        "131060 plus 20 virtual tokens exceeds the model's context of 131072",
    ),
    "resolution not a multiple of 8": (
        job_request("diffusion", "lora", "x", resolution=60),
        grpc.StatusCode.INVALID_ARGUMENT,
        "multiple of 8",
    ),
    "resolution for an LLM": (
        job_request("llm", "lora", "x", resolution=64),
        grpc.StatusCode.INVALID_ARGUMENT,
        "diffusion jobs only",
    ),
    "validation too large": (
        job_request("llm", "lora", "x", validation_fraction=0.9),
        grpc.StatusCode.INVALID_ARGUMENT,
        r"validation_fraction must be in \[0, 0.5\]",
    ),
    "a validation split of nothing": (
        job_request("llm", "lora", "x", validation_fraction=0.01),
        grpc.StatusCode.INVALID_ARGUMENT,
        "leaves no validation record",
    ),
}


@pytest.mark.parametrize("case", list(BAD_JOBS))
def test_a_bad_job_is_refused_at_create_time(finetune_stub, finetune_server, adapters, case):
    request, code, message = BAD_JOBS[case]
    with pytest.raises(grpc.RpcError) as caught:
        finetune_stub.CreateJob(request)
    assert caught.value.code() == code, caught.value.details()
    assert re.search(message, caught.value.details()), caught.value.details()
    assert_healthy(finetune_server)


def test_an_adapter_name_held_by_an_unfinished_job_is_taken(finetune_stub):
    first = finetune_stub.CreateJob(job_request("llm", "lora", "held-name", max_steps=100_000))
    try:
        with pytest.raises(grpc.RpcError) as caught:
            finetune_stub.CreateJob(job_request("llm", "lora", "held-name"))
        assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS and first.id in caught.value.details()
    finally:
        finetune_stub.CancelJob(pb.CancelJobRequest(id=first.id))


def test_any_seed_is_accepted(finetune_stub):
    job = finetune_stub.CreateJob(job_request("llm", "lora", "seeded", max_steps=100_000, seed=2**64 - 1))
    finetune_stub.CancelJob(pb.CancelJobRequest(id=job.id))
    assert job.hyperparameters.seed < 2**63


def test_batches_must_split_evenly_over_a_workers_gpus():
    from services.finetune.hyperparams import Hyperparameters, TrainingData, resolve
    from shared.errors import InvalidArgument

    data = TrainingData(kind="diffusion", num_records=16, architecture="unet", native_resolution=64, devices=2)
    resolved, _ = resolve(Hyperparameters(), data)
    assert resolved.batch_size == 2
    with pytest.raises(InvalidArgument, match="multiple of the 2 GPUs"):
        resolve(Hyperparameters(batch_size=3), data)


def test_embedding_targets_and_ranks_follow_the_servers_settings():
    from services.finetune.hyperparams import LLM_TARGETS, Hyperparameters, TrainingData, resolve

    data = TrainingData(kind="llm", num_records=40, architecture="llama", targets=LLM_TARGETS["llama"], max_lora_rank=8)
    assert resolve(Hyperparameters(), data)[0].lora_r == 8  # the default rank (16) capped by the limit
    allowed = TrainingData(**{**data.__dict__, "allow_embedding_targets": True})
    assert resolve(Hyperparameters(target_modules=("lm_head",)), allowed)[0].target_modules == ("lm_head",)


def test_a_learning_rate_multiplier_scales_the_methods_default():
    from services.finetune.hyperparams import LLM_TARGETS, Hyperparameters, TrainingData, resolve
    from shared.errors import InvalidArgument

    data = TrainingData(kind="llm", num_records=40, architecture="llama", targets=LLM_TARGETS["llama"])
    default = resolve(Hyperparameters(), data)[0]
    assert default.learning_rate_multiplier == 1.0
    doubled = resolve(Hyperparameters(learning_rate_multiplier=2.0), data)[0]
    assert doubled.learning_rate == pytest.approx(2 * default.learning_rate)
    assert resolve(Hyperparameters(learning_rate=default.learning_rate / 4), data)[0].learning_rate_multiplier == (
        pytest.approx(0.25)
    )
    with pytest.raises(InvalidArgument, match="not both"):
        resolve(Hyperparameters(learning_rate=1e-4, learning_rate_multiplier=2.0), data)
    with pytest.raises(InvalidArgument, match="learning_rate_multiplier"):
        resolve(Hyperparameters(learning_rate_multiplier=1000.0), data)


@pytest.mark.parametrize("call", ["GetJob", "CancelJob", "WatchJob"])
def test_unknown_jobs_are_not_found(finetune_stub, call):
    request = {"GetJob": pb.GetJobRequest, "CancelJob": pb.CancelJobRequest, "WatchJob": pb.WatchJobRequest}[call]
    with pytest.raises(grpc.RpcError) as caught:
        result = getattr(finetune_stub, call)(request(id="ftjob-0000"))
        list(result) if call == "WatchJob" else result
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def assert_healthy(server) -> None:
    with grpc.insecure_channel(server.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_every_must_have_family_is_trainable_and_another_is_refused_by_name(data_dir, tmp_path):
    from services.finetune.api import UntrainableBase, _diffusion_profile
    from shared.builtin import ensure_builtin

    expected = {
        "tiny-sd": ("sd", "unet", False),
        "tiny-sdxl": ("sdxl", "unet", False),
        "tiny-sd3": ("sd3", "transformer", False),
        "tiny-flux": ("flux", "transformer", True),
    }
    for name, (family, architecture, guidance) in expected.items():
        profile = _diffusion_profile(ensure_builtin(name, data_dir / "models"))
        described = (profile["family"], profile["architecture"], profile["guidance_embeds"])
        assert described == (family, architecture, guidance)
        assert "to_q" in profile["targets"][0]
    assert _diffusion_profile(ensure_builtin("tiny-sd", data_dir / "models"))["native_resolution"] == 64
    (tmp_path / "model_index.json").write_text('{"_class_name": "QwenImagePipeline"}')
    with pytest.raises(UntrainableBase, match="LoRA training takes sd, sdxl, sd3, flux bases; this one is QwenImage"):
        _diffusion_profile(tmp_path)
