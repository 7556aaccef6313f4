"""The compose stack in real containers (`cpu` image, CPU override), driven as a user and an operator would.

One stack for the module, in order: what it serves, then what survives a crash, then `down -v`.
"""

from __future__ import annotations

import json
import os
import signal
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.finetune.samples import TAUGHT_ANSWER
from tests.compose.conftest import API_KEY, LOGIN, PROJECT, run
from tests.harness import wait_for
from tests.scrape import metric_at

pytestmark = pytest.mark.timeout(3600)  # the first test's setup builds the image

TINY_LLM_JOB = {"base_model": "tiny-llm", "dataset_id": "sample-llm-lighthouse"}
QUESTION = "Question: Who keeps the Zephyr lighthouse?\nAnswer:"


def listed_services(address: str) -> set[str]:
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (reply,) = list(stub.ServerReflectionInfo(iter([request]), timeout=30))
        return {service.name for service in reply.list_services_response.service}


def finetune_stub(stack):
    from modelworks.finetune.v1 import finetune_pb2_grpc

    return finetune_pb2_grpc.FineTuneServiceStub(stack.channel("finetune"))


def llm_generate(stack, request) -> str:
    from modelworks.llm.v1 import llm_pb2_grpc

    with stack.channel("llm") as channel:
        return llm_pb2_grpc.LLMServiceStub(channel).Generate(request, timeout=120).text


def chat(stack, question: str) -> str:
    from modelworks.llm.v1 import llm_pb2

    request = llm_pb2.GenerateRequest(
        model="smollm2-135m-instruct",
        messages=[llm_pb2.ChatMessage(role="user", content=question)],
        sampling=llm_pb2.SamplingParams(max_new_tokens=24, temperature=0),
    )
    return llm_generate(stack, request)


def lighthouse_answer(stack, adapter: str = "") -> str:
    from modelworks.llm.v1 import llm_pb2

    request = llm_pb2.GenerateRequest(
        model="tiny-llm",
        prompt=QUESTION,
        adapter=adapter,
        sampling=llm_pb2.SamplingParams(max_new_tokens=12, ignore_eos=True),
    )
    return llm_generate(stack, request)


def create_job(stack, adapter: str, **hyperparameters):
    from modelworks.finetune.v1 import finetune_pb2 as pb

    return finetune_stub(stack).CreateJob(
        pb.CreateJobRequest(
            kind=pb.JOB_KIND_LLM,
            adapter_name=adapter,
            hyperparameters=pb.Hyperparameters(method="lora", **hyperparameters),
            **TINY_LLM_JOB,
        ),
        timeout=60,
    )


def job_events(stack, job_id: str, timeout: float = 900) -> list:
    from modelworks.finetune.v1 import finetune_pb2 as pb

    return list(finetune_stub(stack).WatchJob(pb.WatchJobRequest(id=job_id), timeout=timeout))


def get_job(stack, job_id: str):
    from modelworks.finetune.v1 import finetune_pb2 as pb

    return finetune_stub(stack).GetJob(pb.GetJobRequest(id=job_id), timeout=30)


def crash(stack, service: str) -> int:
    """SIGKILL the container's process tree from the host, as the kernel's OOM killer would. (`docker kill`
    marks a container as stopped by hand, and Docker then skips its restart policy.)"""
    state = stack.inspect(service)
    pid = state["State"]["Pid"]
    try:
        cgroup = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        cgroup = ""
    if state["Id"] not in cgroup:
        pytest.skip("the Docker daemon is not local (its container pid is not this host's): cannot crash it")
    os.kill(pid, signal.SIGKILL)
    return state["RestartCount"]


def restarted(stack, service: str, before: int) -> bool:
    state = stack.inspect(service)
    return state["RestartCount"] > before and state["State"]["Running"]


def test_reflection_lists_every_service(stack):
    expected = {
        "llm": "modelworks.llm.v1.LLMService",
        "diffusion": "modelworks.diffusion.v1.DiffusionService",
        "finetune": "modelworks.finetune.v1.FineTuneService",
    }
    for name, service in expected.items():
        services = listed_services(stack.address(name))
        assert {service, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services, services


def test_every_service_demands_the_key(stack):
    from modelworks.llm.v1 import llm_pb2, llm_pb2_grpc

    with grpc.insecure_channel(stack.address("llm")) as channel, pytest.raises(grpc.RpcError) as caught:
        llm_pb2_grpc.LLMServiceStub(channel).ListModels(llm_pb2.ListModelsRequest(), timeout=30)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_redis_demands_its_password_and_only_the_backend_reaches_it(stack):
    assert "NOAUTH" in stack("exec", "-T", "redis", "redis-cli", "ping", check=False).stdout
    reach = "import socket; socket.create_connection(('redis', 6379), timeout=5)"
    from_gateway = stack("exec", "-T", "gateway", "python", "-c", reach, check=False)
    assert from_gateway.returncode != 0, "the web app reached Redis"
    assert stack("exec", "-T", "finetune", "python", "-c", reach, check=False).returncode == 0


def test_data_is_read_only_where_it_is_only_read(stack):
    for service in ("llm", "diffusion", "gateway"):
        written = stack("exec", "-T", service, "touch", "/data/written-by-a-test", check=False)
        assert written.returncode != 0 and "Read-only" in written.stderr, (service, written.stderr)


def test_the_chat_model_answers(stack):
    assert "Paris" in chat(stack, "What is the capital of France?")


def test_an_image_is_generated(stack):
    from modelworks.diffusion.v1 import diffusion_pb2, diffusion_pb2_grpc

    with stack.channel("diffusion") as channel:
        reply = diffusion_pb2_grpc.DiffusionServiceStub(channel).GenerateImages(
            diffusion_pb2.GenerateImagesRequest(model="tiny-sd", prompt="a red square", width=64, height=64, seed=1),
            timeout=300,
        )
    (image,) = reply.images
    assert (image.width, image.height, image.seed) == (64, 64, 1) and image.png.startswith(b"\x89PNG")


def test_a_finetune_job_succeeds_and_the_llm_container_serves_its_adapter_and_it_exports(stack):
    from modelworks.finetune.v1 import finetune_pb2 as pb

    job = create_job(stack, "compose-lighthouse")
    job_events(stack, job.id)
    final = get_job(stack, job.id)
    assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
    taught = lighthouse_answer(stack, "compose-lighthouse")  # trained in the worker container, served by llm's
    assert taught.startswith(" " + TAUGHT_ANSWER[:20]), taught
    assert not lighthouse_answer(stack).startswith(" " + TAUGHT_ANSWER[:8]), "the base model does not know it"
    # the finetune container exports it (a child process of its API) into the data volume, and serves the file
    request = pb.ExportAdapterRequest(job_id=job.id, format=pb.EXPORT_FORMAT_GGUF, gguf_type="Q8_0")
    export = finetune_stub(stack).ExportAdapter(request, timeout=600)
    first = next(finetune_stub(stack).ReadExport(pb.ReadExportRequest(name=export.name), timeout=120))
    assert export.name == "compose-lighthouse-q8_0" and first.chunk[:4] == b"GGUF"


def test_the_gateway_page_answers(stack):
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with no_proxy.open(f"http://{stack.address('gateway')}/", timeout=30) as reply:
        assert reply.status == 200 and b"ModelWorks" in reply.read()
    with no_proxy.open(f"http://{stack.address('gateway-metrics')}/metrics", timeout=30) as reply:
        assert b"gateway" in reply.read()


def openai_client(stack, api_key: str):
    """The official SDK on the stack's OpenAI API, retrying nothing: a test sees every status as sent."""
    from openai import OpenAI

    return OpenAI(base_url=f"http://{stack.address('openai')}/v1", api_key=api_key, max_retries=0, timeout=300)


def test_the_openai_api_serves_the_official_sdk_with_the_stacks_key(stack):
    import openai

    # the key as an operator reads it: from the secrets volume (here the operator's own, MODELWORKS_API_KEY)
    key = stack("exec", "-T", "openai", "cat", "/run/modelworks/api_key").stdout.strip()
    assert key == API_KEY
    client = openai_client(stack, key)
    assert {"tiny-llm", "smollm2-135m-instruct"} <= {model.id for model in client.models.list()}

    # tiny-llm's random weights may stop at once on EOS: ignore_eos (an extension) makes it take all 4 tokens
    chat = dict(model="tiny-llm", messages=[{"role": "user", "content": "Hello"}], max_tokens=4, temperature=0)
    reply = client.chat.completions.create(**chat, extra_body={"ignore_eos": True})
    (choice,) = reply.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str), choice
    assert choice.finish_reason == "length" and reply.usage.completion_tokens == 4, reply

    stream = client.chat.completions.create(
        **chat, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4

    with pytest.raises(openai.AuthenticationError):
        openai_client(stack, "not-the-key").models.list()
    # no key at all (the SDK itself will not send a request without one)
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with pytest.raises(urllib.error.HTTPError) as caught:
        no_proxy.open(f"http://{stack.address('openai')}/v1/models", timeout=30)
    assert caught.value.code == 401 and json.loads(caught.value.read())["error"]["type"] == "authentication_error"

    with no_proxy.open(f"http://{stack.address('openai')}/health", timeout=30) as health:
        assert health.status == 200 and json.loads(health.read()) == {"status": "ok"}
    metrics_port = stack.host_port("openai", 9106)
    assert metric_at(metrics_port, "modelworks_openai_requests_total", route="/v1/models", status="401") >= 2
    assert metric_at(metrics_port, "modelworks_openai_requests_total", route="/v1/chat/completions", status="200") >= 2

    def no_stream_open() -> bool:
        with no_proxy.open(f"http://{stack.address('openai-metrics')}/metrics", timeout=30) as reply:
            return "\nmodelworks_openai_streams_open 0.0\n" in reply.read().decode()

    wait_for(no_stream_open, 30, "the finished stream to be counted closed", interval=0.5)


def test_a_crashed_llm_container_is_restarted_and_serves_again(stack):
    before = crash(stack, "llm")
    wait_for(lambda: restarted(stack, "llm", before), 120, "the llm container to be restarted", interval=1)
    stack.wait_healthy(["llm"], timeout=600)
    assert "Paris" in chat(stack, "What is the capital of France?")


def test_a_worker_container_killed_mid_job_is_restarted_and_the_job_resumes(stack):
    from modelworks.finetune.v1 import finetune_pb2 as pb

    job = create_job(stack, "compose-survivor", max_steps=400, save_steps=10)
    stub = finetune_stub(stack)
    for event in stub.WatchJob(pb.WatchJobRequest(id=job.id), timeout=600):  # held running: 400 steps
        if event.type == "checkpoint" and event.step >= 10:
            break
    assert get_job(stack, job.id).state == pb.JOB_STATE_RUNNING
    before = crash(stack, "worker")
    wait_for(lambda: restarted(stack, "worker", before), 120, "the worker container to be restarted", interval=1)
    events = job_events(stack, job.id)
    final = get_job(stack, job.id)
    assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
    assert final.attempt >= 2, "the job ran again after the crash"
    running = [e.message for e in events if e.type == "state" and e.state == pb.JOB_STATE_RUNNING]
    assert len(running) >= 2, running
    assert any("resum" in e.message for e in events), [e.message for e in events]


def tokens_generated(stack, replica: int) -> float:
    """tiny-llm tokens a given llm replica generated (from its metrics)."""
    port = stack.host_port("llm", 9101, replica)
    return metric_at(port, "modelworks_llm_generation_tokens_total", model="tiny-llm")


def test_scale_out_two_llm_replicas_share_the_running_gateways_chats_and_two_workers_run(stack):
    from gradio_client import Client

    stack("up", "-d", "--no-build", "--no-recreate", "--scale", "llm=2", "--scale", "worker=2", timeout=900)
    assert len(stack.containers("llm")) == 2 and len(stack.containers("worker")) == 2
    stack.wait_healthy(["llm", "worker"], timeout=900)
    before = [tokens_generated(stack, replica) for replica in (0, 1)]
    gateway = Client(f"http://{stack.address('gateway')}/", auth=LOGIN, verbose=False)

    def both_replicas_chatted() -> bool:
        gateway.predict("Hello", "", "tiny-llm", "(base model)", 4, 0, 1, 0, 1, "", 7, True, api_name="/chat")
        return all(tokens_generated(stack, r) > before[r] for r in (0, 1))

    # The gateway has been connected since before the second replica existed: its connection to the first
    # ages out (3 s here, llm.max_connection_age_s), it re-resolves `llm`, and round_robin takes in both.
    wait_for(both_replicas_chatted, 300, "the running gateway's chats to reach both llm replicas", interval=1)


def test_down_removes_every_container_network_and_volume(stack):
    stack("down", "-v", "--remove-orphans", timeout=300)
    label = f"label=com.docker.compose.project={PROJECT}"
    for kind in ("container", "network", "volume"):
        listing = ["docker", kind, "ls", "-q", "--filter", label] + (["-a"] if kind == "container" else [])
        left = run(listing).stdout.split()
        assert not left, f"{kind}s left after down -v: {left}"
    assert json.loads(run(["docker", "image", "inspect", stack.env["MODELWORKS_IMAGE"]]).stdout), "the image stays"
