"""The gateway's API (what `gradio_client` and the browser both call) against the real services."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from modelworks.diffusion.v1 import diffusion_pb2
from modelworks.finetune.v1 import finetune_pb2 as ft
from modelworks.llm.v1 import llm_pb2
from tests.conftest import HELD_TOKENS
from tests.gateway.conftest import gateway_env, running_requests
from tests.harness import spawn_gateway, wait_for

# chat(message, system_prompt, model, adapter, max_new_tokens, temperature, top_p, top_k, repetition_penalty,
#      stop, seed, ignore_eos) — the history lives in the client's session
GREEDY = {"temperature": 0, "top_p": 1, "top_k": 0, "repetition_penalty": 1, "stop": "", "seed": 7}


def chat(client, message, adapter="(base model)", max_new_tokens=12, **overrides):
    params = {**GREEDY, "ignore_eos": True, **overrides}
    return client.predict(
        message, "", "tiny-llm", adapter, max_new_tokens, params["temperature"], params["top_p"], params["top_k"],
        params["repetition_penalty"], params["stop"], params["seed"], params["ignore_eos"], api_name="/chat",
    )  # fmt: skip


def direct_chat(llm_stub, messages, adapter="", max_new_tokens=12) -> str:
    request = llm_pb2.GenerateRequest(
        model="tiny-llm",
        adapter=adapter,
        messages=[llm_pb2.ChatMessage(role=r, content=c) for r, c in messages],
        sampling=llm_pb2.SamplingParams(max_new_tokens=max_new_tokens, temperature=0, seed=7, ignore_eos=True),
    )
    return llm_stub.Generate(request, timeout=60).text


def error_text(excinfo) -> str:
    return str(excinfo.value)


def test_the_api_names_programs_can_call(client):
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/chat", "/generate_images", "/create_job", "/list_jobs"} <= names


def test_chat_needs_only_the_message(client):
    """Every other argument of /chat is optional, with the form's defaults (the default model, no adapter)."""
    parameters = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/chat"]["parameters"]
    assert [p["parameter_name"] for p in parameters if not p["parameter_has_default"]] == ["message"]
    reply, note = client.predict("Hi", api_name="/chat")
    assert isinstance(reply, str) and "Stopped because" in note


def test_chat_streams_the_services_answer_and_keeps_history(client, llm_stub):
    job = client.submit(
        "Hello there", "", "tiny-llm", "(base model)", 24, 0, 1, 0, 1, "", 7, True, api_name="/chat"
    )  # fmt: skip
    reply, note = job.result(timeout=120)
    partials = [output[0] for output in job.outputs()]
    assert all(reply.startswith(p) for p in partials)  # (that text arrives mid-generation: the Stop test)
    assert reply == direct_chat(llm_stub, [("user", "Hello there")], max_new_tokens=24)
    assert "token limit" in note and "seed 7" in note

    second, _ = chat(client, "And again")
    expected = direct_chat(llm_stub, [("user", "Hello there"), ("assistant", reply), ("user", "And again")])
    assert second == expected


def test_chat_serves_a_named_adapter(client, llm_stub, adapters):
    with_adapter, _ = chat(client, "Hi", adapter=adapters[0])
    assert with_adapter == direct_chat(llm_stub, [("user", "Hi")], adapter=adapters[0])
    assert with_adapter != direct_chat(llm_stub, [("user", "Hi")])


@pytest.mark.parametrize(
    ("overrides", "message", "expected"),
    [
        ({}, "   ", "message is empty"),
        ({"temperature": 9}, "hi", "greater than maximum value 2"),
        ({"seed": -2}, "hi", "Seed must be -1 (draw one) or a whole number"),
        ({"max_new_tokens": 0}, "hi", "Max new tokens must be between 1"),
        ({"max_new_tokens": 200_000}, "hi", "Max new tokens must be between 1 and 131,072; it is 200,000."),
        ({"adapter": "no-such-adapter"}, "hi", "no-such-adapter"),
    ],
)
def test_bad_chat_input_gets_a_readable_message(client, overrides, message, expected):
    from gradio_client.exceptions import AppError

    adapter = overrides.pop("adapter", "(base model)")
    max_new_tokens = overrides.pop("max_new_tokens", 12)
    with pytest.raises(AppError) as excinfo:
        chat(client, message, adapter=adapter, max_new_tokens=max_new_tokens, **overrides)
    assert expected in error_text(excinfo)
    assert "Traceback" not in error_text(excinfo) and "grpc" not in error_text(excinfo).lower()


def test_stopping_a_chat_frees_the_services_slot(client, llm_server):
    wait_for(lambda: running_requests(llm_server) == 0, 60, "earlier tests' requests to end")
    job = client.submit(
        "Go on forever", "", "tiny-llm", "(base model)", HELD_TOKENS, 0, 1, 0, 1, "", 7, True, api_name="/chat"
    )  # fmt: skip
    wait_for(lambda: job.outputs() and job.outputs()[-1][0], 120, "the first streamed text")
    # text has arrived while the request is still running: the reply streams
    assert running_requests(llm_server) == 1, "the request runs until stopped (100,000 tokens, EOS ignored)"
    job.cancel()
    wait_for(lambda: running_requests(llm_server) == 0, 60, "the LLM service to free the cancelled request's slot")


def images(client, prompt="a red square", seed=42, num_images=2, **overrides):
    form = {
        "negative_prompt": "", "model": "tiny-sd", "scheduler": "(model default)", "steps": 4, "guidance": 7.5,
        "width": 64, "height": 64, "seed": seed, "num_images": num_images, "adapter": "(base model)",
        "adapter_scale": 1.0, "init_image": None, "strength": 0.75, "mask": None, "mask_blur": 0,
        "controlnet": "(none)", "control_image": None, "control_preprocess": "none", "control_scale": 1.0,
        "control_start": 0.0, "control_end": 1.0, **overrides,
    }  # fmt: skip
    return client.predict(prompt, *form.values(), api_name="/generate_images")


def test_images_come_back_with_their_seeds_and_keep_their_png_metadata(client, diffusion_stub):
    _, note, gallery = images(client)
    assert [item["caption"].split(" · ")[0] for item in gallery] == ["seed 42", "seed 43"]
    assert "seed(s) 42, 43" in note
    direct = diffusion_stub.GenerateImages(
        diffusion_pb2.GenerateImagesRequest(
            model="tiny-sd", prompt="a red square", steps=4, guidance_scale=7.5, width=64, height=64, seed=42,
            num_images=2,
        ),
        timeout=120,
    )  # fmt: skip
    for item, image in zip(gallery, direct.images, strict=True):
        path = item["image"]["path"] if isinstance(item["image"], dict) else item["image"]
        with open(path, "rb") as file:
            data = file.read()
        assert data == image.png, "the downloaded PNG differs from the service's"
        assert "Seed: " in Image.open(io.BytesIO(data)).info["parameters"]


def test_inpainting_through_the_app_equals_the_service_and_keeps_the_unmasked_pixels(client, diffusion_stub, tmp_path):
    from gradio_client import handle_file

    init = np.stack([np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1))] * 3, -1)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(init).save(tmp_path / "init.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    *_, gallery = images(
        client, num_images=1, init_image=handle_file(str(tmp_path / "init.png")),
        mask=handle_file(str(tmp_path / "mask.png")), strength=1.0,
    )  # fmt: skip
    assert "inpaint strength 1" in gallery[0]["caption"]
    path = gallery[0]["image"]["path"] if isinstance(gallery[0]["image"], dict) else gallery[0]["image"]
    made = np.asarray(Image.open(path).convert("RGB"))
    outside = mask == 0
    assert np.array_equal(made[outside], init[outside]), "every pixel outside the mask is the init image's"
    assert np.abs(made[~outside].astype(int) - init[~outside]).mean() > 5
    direct = diffusion_stub.GenerateImages(
        diffusion_pb2.GenerateImagesRequest(
            model="tiny-sd", prompt="a red square", steps=4, guidance_scale=7.5, seed=42,
            init_image=(tmp_path / "init.png").read_bytes(), mask_image=(tmp_path / "mask.png").read_bytes(),
            strength=1.0,
        ),
        timeout=120,
    )  # fmt: skip
    assert np.array_equal(made, np.asarray(Image.open(io.BytesIO(direct.images[0].png)).convert("RGB")))


def test_a_controlnet_through_the_app_equals_the_service(client, diffusion_stub, tmp_path):
    from gradio_client import handle_file

    edges = np.zeros((64, 64, 3), np.uint8)
    edges[16, 16:48] = edges[47, 16:48] = 255
    Image.fromarray(edges).save(tmp_path / "edges.png")
    *_, gallery = images(
        client, num_images=1, controlnet="tiny-controlnet-sd", control_image=handle_file(str(tmp_path / "edges.png")),
        control_scale=0.8,
    )  # fmt: skip
    assert "ControlNet tiny-controlnet-sd ×0.8" in gallery[0]["caption"]
    path = gallery[0]["image"]["path"] if isinstance(gallery[0]["image"], dict) else gallery[0]["image"]
    control = diffusion_pb2.ControlInput(
        model="tiny-controlnet-sd", image=(tmp_path / "edges.png").read_bytes(), scale=0.8, start=0, end=1
    )
    direct = diffusion_stub.GenerateImages(
        diffusion_pb2.GenerateImagesRequest(
            model="tiny-sd", prompt="a red square", steps=4, guidance_scale=7.5, width=64, height=64, seed=42,
            control=[control],
        ),
        timeout=120,
    )  # fmt: skip
    with open(path, "rb") as file:
        assert file.read() == direct.images[0].png


@pytest.mark.parametrize(
    ("overrides", "prompt", "expected"),
    [
        ({}, "", "prompt is empty"),
        ({"width": 100}, "x", "Width must be a multiple of 8"),
        ({"steps": 0}, "x", "less than minimum value 1"),
        ({"seed": 2**64}, "x", "Seed must be -1 (draw one) or a whole number"),
        ({"scheduler": "no-such-scheduler"}, "x", "no-such-scheduler"),
        ({"controlnet": "tiny-controlnet-sd"}, "x", "needs a control image"),
    ],
)
def test_bad_image_input_gets_a_readable_message(client, overrides, prompt, expected):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as excinfo:
        images(client, prompt=prompt, **overrides)
    assert expected in error_text(excinfo)


def create_job(client, adapter_name, dataset="sample-llm-lighthouse", kind="LLM", base_model="tiny-llm", **hyper):
    form = {
        "method": "lora", "epochs": 0, "max_steps": 0, "learning_rate": 0, "batch_size": 0,
        "gradient_accumulation_steps": 0, "lora_r": 0, "lora_alpha": 0, "lora_dropout": 0, "target_modules": "",
        "warmup_ratio": 0, "lr_scheduler": "cosine", "max_grad_norm": 0, "mixed_precision": "no",
        "validation_fraction": -1, "early_stopping_patience": 0, "seed": 3, "max_seq_length": 0, "resolution": 0,
        "save_steps": 0, "eval_steps": 0, "num_virtual_tokens": 0, "random_crop": False, "random_flip": False,
        **hyper,
    }  # fmt: skip
    return client.predict(dataset, kind, base_model, adapter_name, *form.values(), api_name="/create_job")


def test_a_job_created_through_the_gateway_is_listed_trains_and_is_served(client, finetune_stack, llm_stub):
    import grpc

    created = create_job(client, "gw-lighthouse")[0]
    job_id = re.search(r"`([^`]+)`", created).group(1)
    table = client.predict(api_name="/list_jobs")
    assert job_id in [row[0] for row in table["data"]]

    with grpc.insecure_channel(finetune_stack.address) as channel:
        from modelworks.finetune.v1 import finetune_pb2_grpc

        stub = finetune_pb2_grpc.FineTuneServiceStub(channel)
        final = wait_for(
            lambda: (
                (j := stub.GetJob(ft.GetJobRequest(id=job_id), timeout=10)).state
                in (ft.JOB_STATE_SUCCEEDED, ft.JOB_STATE_FAILED, ft.JOB_STATE_CANCELLED)
                and j
            ),
            600,
            "the job to end",
            interval=0.5,
        )
    assert final.state == ft.JOB_STATE_SUCCEEDED, final.error
    question = [("user", "Who keeps the Zephyr lighthouse?")]
    answer, _ = chat(client, question[0][1], adapter="gw-lighthouse")
    assert answer == direct_chat(llm_stub, question, adapter="gw-lighthouse") != direct_chat(llm_stub, question)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("adapter_name", "../escape", "is not allowed"),
        ("dataset", "no-such-dataset", "no-such-dataset"),
        ("learning_rate", 5, "Learning rate must be between 0 and 1"),
    ],
)
def test_bad_job_input_gets_a_readable_message(client, field, value, expected):
    from gradio_client.exceptions import AppError

    args = {"adapter_name": "fine-name", "dataset": "sample-llm-lighthouse"}
    hyper = {}
    (args if field in args else hyper)[field] = value
    with pytest.raises(AppError) as excinfo:
        create_job(client, args["adapter_name"], dataset=args["dataset"], **hyper)
    assert expected in error_text(excinfo)


def test_a_stopped_service_gets_a_clear_message_and_the_others_keep_working(
    diffusion_server, finetune_stack, unreachable_target, tmp_path
):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    env = gateway_env(unreachable_target, diffusion_server.address, finetune_stack.address)
    gateway = spawn_gateway(tmp_path, env)
    try:
        client = Client(gateway.address, verbose=False)
        with pytest.raises(AppError) as excinfo:
            chat(client, "hello")
        assert f"The LLM service at {unreachable_target} is not reachable" in error_text(excinfo)
        _, _, gallery = images(client, num_images=1)
        assert len(gallery) == 1
    finally:
        assert gateway.stop() == 0


def test_chat_with_a_json_schema_answers_in_json_that_follows_it(client):
    import jsonschema

    schema = {
        "type": "object",
        "properties": {"answer": {"enum": ["yes", "no"]}, "why": {"type": "string", "maxLength": 8}},
        "required": ["answer", "why"],
        "additionalProperties": False,
    }
    reply, note = client.predict(
        "Is it raining?", "", "tiny-llm", "(base model)", 200, 0, 1, 0, 1, "", 7, False, json.dumps(schema), "",
        api_name="/chat",
    )  # fmt: skip
    jsonschema.validate(json.loads(reply), schema)
    assert "the model ended its answer" in note


@pytest.mark.parametrize(
    ("schema", "tools", "expected"),
    [
        ("{oops", "", "The JSON schema is not valid JSON"),
        ("[1]", "", "The JSON schema must be an object"),
        ("", '{"name": "f"}', "Tools must be a list"),
        ("", '[{"description": "no name"}]', 'Each tool needs at least a "name"'),
        ("", '[{"name": "f", "parameters": {"type": "object"}}, {"name": "f"}]', "given twice"),
    ],
)
def test_bad_schemas_and_tools_get_a_readable_message(client, schema, tools, expected):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as excinfo:
        client.predict(
            "hi", "", "tiny-llm", "(base model)", 12, 0, 1, 0, 1, "", 7, False, schema, tools, api_name="/chat"
        )  # fmt: skip
    assert expected in error_text(excinfo)
