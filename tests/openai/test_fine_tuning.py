"""OpenAI's fine-tuning loop against a real fine-tune service, worker and LLM service: upload a file, create a
job, follow it, and chat with its `fine_tuned_model` at once, all through the official SDK."""

from __future__ import annotations

import io

import openai
import pytest

from modelworks.llm.v1 import llm_pb2
from services.finetune.samples import QUESTIONS, TAUGHT_ANSWER, llm_sample_jsonl
from tests.harness import wait_for
from tests.openai.conftest import UPLOAD_LIMIT

QUESTION = f"Question: {QUESTIONS[0]}\nAnswer:"
ENDED = ("succeeded", "failed", "cancelled")


def upload(client, data: bytes, name: str = "lighthouse.jsonl"):
    return client.files.create(file=(name, io.BytesIO(data)), purpose="fine-tune")


def wait_until_ended(client, job_id: str):
    return wait_for(
        lambda: (j := client.fine_tuning.jobs.retrieve(job_id)).status in ENDED and j,
        600,
        "the job to end",
        interval=0.5,
    )


def test_files_are_stored_listed_read_back_and_deleted(client):
    data = llm_sample_jsonl()
    stored = upload(client, data)
    assert (stored.object, stored.purpose, stored.bytes, stored.filename) == (
        "file",
        "fine-tune",
        len(data),
        "lighthouse.jsonl",
    )
    assert stored.id in [f.id for f in client.files.list()]
    assert client.files.retrieve(stored.id).bytes == len(data)
    assert client.files.content(stored.id).content == data
    assert client.files.delete(stored.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(stored.id)


def test_a_bad_file_is_refused_at_upload_naming_its_line(client):
    lines = b'{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n{"prompt": oops}\n'
    with pytest.raises(openai.BadRequestError, match="line 3"):
        upload(client, lines)
    with pytest.raises(openai.BadRequestError, match="fine-tune"):
        client.files.create(file=("x.jsonl", io.BytesIO(b"{}\n")), purpose="assistants")
    with pytest.raises(openai.APIStatusError, match="max_upload_bytes") as too_large:
        upload(client, b"x" * (UPLOAD_LIMIT + 1))
    assert too_large.value.status_code == 413


def test_a_job_trains_follows_openais_loop_and_its_model_answers_at_once(client, llm_stub):
    training_file = upload(client, llm_sample_jsonl())
    validation_file = upload(client, b"".join(llm_sample_jsonl().splitlines(keepends=True)[:5]), "valid.jsonl")
    job = client.fine_tuning.jobs.create(
        model="tiny-llm",
        training_file=training_file.id,
        validation_file=validation_file.id,
        suffix="zephyr",
        seed=7,
        hyperparameters={"n_epochs": 3, "learning_rate_multiplier": "auto"},
    )
    assert job.status == "queued" and job.fine_tuned_model is None and job.model == "tiny-llm"
    assert job.validation_file == validation_file.id
    assert job.hyperparameters.n_epochs == 3 and job.hyperparameters.learning_rate_multiplier == pytest.approx(1.0)
    assert job.id in [j.id for j in client.fine_tuning.jobs.list(limit=100)]

    final = wait_until_ended(client, job.id)
    assert final.status == "succeeded", final.error
    assert final.fine_tuned_model.startswith("ft-tiny-llm-zephyr-") and final.finished_at
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    metrics = [e for e in events if e.type == "metrics"]
    assert [e for e in metrics if e.data.get("valid_loss", 0) > 0], "the validation file is evaluated"
    assert [e for e in metrics if e.data.get("train_loss", 0) > 0] and all(
        "train_loss" in e.data or "valid_loss" in e.data for e in metrics
    )
    assert [e.created_at for e in events] == sorted((e.created_at for e in events), reverse=True), "newest first"
    first_page = client.fine_tuning.jobs.list_events(job.id, limit=5)
    after = client.fine_tuning.jobs.list_events(job.id, limit=5, after=first_page.data[-1].id)
    assert [e.id for e in first_page.data + after.data] == [e.id for e in events[:10]]
    (checkpoint,) = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoint.fine_tuned_model_checkpoint == final.fine_tuned_model
    assert checkpoint.step_number == final.model_extra["total_steps"]

    taught = client.completions.create(
        model=final.fine_tuned_model, prompt=QUESTION, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert taught.choices[0].text.startswith(" " + TAUGHT_ANSWER[:20]), taught.choices[0].text
    chat = client.chat.completions.create(
        model=final.fine_tuned_model, temperature=0, max_tokens=12, messages=[{"role": "user", "content": QUESTIONS[0]}]
    )
    direct = llm_stub.Generate(
        llm_pb2.GenerateRequest(
            adapter=final.fine_tuned_model,
            messages=[llm_pb2.ChatMessage(role="user", content=QUESTIONS[0])],
            sampling=llm_pb2.SamplingParams(max_new_tokens=12),
        )
    )
    assert chat.choices[0].message.content == direct.text


def test_a_running_job_is_cancelled(client):
    training_file = upload(client, llm_sample_jsonl())
    job = client.fine_tuning.jobs.create(
        model="tiny-llm", training_file=training_file.id, extra_body={"max_steps": 100_000, "save_steps": 1000}
    )
    wait_for(lambda: client.fine_tuning.jobs.retrieve(job.id).status == "running", 300, "the job to run", 0.5)
    client.fine_tuning.jobs.cancel(job.id)
    assert wait_until_ended(client, job.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError, match="already cancelled"):
        client.fine_tuning.jobs.cancel(job.id)


def test_bad_jobs_get_the_sdks_matching_errors(client):
    training_file = upload(client, llm_sample_jsonl())
    with pytest.raises(openai.NotFoundError, match="no-such-model"):
        client.fine_tuning.jobs.create(model="no-such-model", training_file=training_file.id)
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.create(model="tiny-llm", training_file="file-does-not-exist")
    with pytest.raises(openai.ConflictError, match="already exists"):
        client.fine_tuning.jobs.create(
            model="tiny-llm", training_file=training_file.id, extra_body={"adapter_name": "lora-a"}
        )
    with pytest.raises(openai.BadRequestError, match="supervised"):
        client.fine_tuning.jobs.create(
            model="tiny-llm", training_file=training_file.id, method={"type": "dpo", "dpo": {}}
        )
    with pytest.raises(openai.BadRequestError, match="not both"):
        client.fine_tuning.jobs.create(
            model="tiny-llm",
            training_file=training_file.id,
            validation_file=training_file.id,
            extra_body={"validation_fraction": 0.2},
        )
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-0000000000000000")


def test_an_image_model_fine_tunes_on_a_zip_and_its_adapter_makes_images(client):
    from services.finetune.samples import diffusion_sample_zip

    shapes = upload(client, diffusion_sample_zip(), name="shapes.zip")
    assert shapes.model_extra["record_type"] == "image_caption"
    job = client.fine_tuning.jobs.create(
        model="tiny-sd",
        training_file=shapes.id,
        suffix="shapes",
        hyperparameters={"batch_size": 2},
        extra_body={"max_steps": 4},
    )
    final = wait_until_ended(client, job.id)
    assert final.status == "succeeded", final.error
    assert final.fine_tuned_model in {m.id for m in client.models.list()}
    reply = client.images.generate(
        model=final.fine_tuned_model, prompt="a red circle", size="64x64", extra_body={"seed": 1, "steps": 2}
    )
    assert len(reply.data) == 1 and reply.data[0].b64_json
