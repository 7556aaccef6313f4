"""The `modelworks` command line against the session's real servers, run as a user runs it: a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import TEST_SERVER_CONFIG
from tests.harness import REPO_ROOT, free_port, spawn_service, start_redis, wait_for


def modelworks(
    *args: str, targets: dict[str, str] | None = None, stdin: str = "", env: dict | None = None, stdin_bytes=None
):
    """Run `python -m modelworks_cli` with the given targets; returns the completed process (never raises)."""
    options = [f"--{service}-target={address}" for service, address in (targets or {}).items()]
    result = subprocess.run(
        [sys.executable, "-m", "modelworks_cli", *options, *args],
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
        input=stdin.encode() if stdin_bytes is None else stdin_bytes,
        capture_output=True,
        timeout=300,
    )
    result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()
    return result


def ok(result) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def llm(llm_server) -> dict[str, str]:
    return {"llm": llm_server.address}


@pytest.fixture(scope="module")
def all_targets(llm_server, diffusion_server, finetune_stack) -> dict[str, str]:
    return {"llm": llm_server.address, "diffusion": diffusion_server.address, "finetune": finetune_stack.address}


GREEDY = ["--max-tokens", "8", "--temperature", "0", "--seed", "1"]


def test_models_list_json_names_both_services_models(all_targets):
    models = json.loads(ok(modelworks("models", "list", "--json", targets=all_targets)))
    served = {(m["service"], m["name"]) for m in models}
    assert {("llm", "tiny-llm"), ("diffusion", "tiny-sd")} <= served
    assert "tiny-llm" in ok(modelworks("models", "list", targets=all_targets))


def test_generate_streams_what_generate_returns_whole(llm):
    streamed = ok(modelworks("generate", "Once upon a time", "--model", "tiny-llm", *GREEDY, targets=llm))
    whole = json.loads(
        ok(modelworks("--json", "generate", "Once upon a time", "--model", "tiny-llm", *GREEDY, targets=llm))
    )
    assert whole["text"] and 1 <= whole["usage"]["completion_tokens"] <= 8
    assert streamed == whole["text"] + "\n"


def test_chat_with_a_message_and_from_stdin(llm):
    args = ["--system", "You are terse.", "--model", "tiny-llm", "--top-k", "5", "--repetition-penalty", "1.1", *GREEDY]
    reply = ok(modelworks("chat", "Hello there", *args, targets=llm))
    assert reply.strip()
    assert ok(modelworks("chat", *args, targets=llm, stdin="Hello there")) == reply


def test_chat_on_a_terminal_is_interactive(llm):
    """No message and a terminal on stdin: a conversation, each reply as a one-shot chat gives its first."""
    args = ["--model", "tiny-llm", *GREEDY]
    first = ok(modelworks("chat", "Hello there", *args, targets=llm))
    main, terminal = os.openpty()
    try:
        os.write(main, b"Hello there\n\n/exit\n")  # an empty line is skipped
        result = subprocess.run(
            [sys.executable, "-m", "modelworks_cli", f"--llm-target={llm['llm']}", "chat", *args],
            cwd=REPO_ROOT, stdin=terminal, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        os.close(terminal)
        os.close(main)
    assert ok(result).startswith("you> model> " + first + "you> you> ")


def test_a_bad_input_exits_2_with_the_services_message(llm):
    unknown = modelworks("generate", "hi", "--model", "no-such-model", targets=llm)
    assert unknown.returncode == 2, unknown.stderr
    assert "no-such-model" in unknown.stderr and "Traceback" not in unknown.stderr
    too_many = modelworks("chat", "hi", "--max-tokens", "100000000", targets=llm)
    assert too_many.returncode == 2, too_many.stderr
    assert "INVALID_ARGUMENT" in too_many.stderr and "Traceback" not in too_many.stderr
    negative = modelworks("generate", "hi", "--max-tokens", "-1", targets=llm)  # refused before any call
    assert negative.returncode == 2 and "--max-tokens: -1 is out of range" in negative.stderr
    binary = modelworks("generate", targets=llm, stdin_bytes=b"\xff\xfe not text")
    assert binary.returncode == 2 and "standard input is not UTF-8 text" in binary.stderr, binary.stderr


def test_image_writes_a_png_per_image(diffusion_server, tmp_path):
    targets = {"diffusion": diffusion_server.address}
    result = modelworks(
        "--json", "image", "a lighthouse", "--out", str(tmp_path / "out"), "-n", "2", "--seed", "5", targets=targets
    )
    written = json.loads(ok(result))
    assert [item["seed"] for item in written] == [5, 6]
    for item in written:
        with open(item["path"], "rb") as png:
            assert png.read(8) == b"\x89PNG\r\n\x1a\n"
    shown = modelworks("image", "a lighthouse", "--out", str(tmp_path / "out"), "--seed", "5", "--steps", "3",
                       targets=targets)  # fmt: skip
    assert "image-5-1.png" in ok(shown)  # an earlier image is never overwritten
    assert "3/3" in shown.stderr  # the progress bar reached the last step


def test_status_is_ok_when_all_serve_and_names_an_unreachable_one(all_targets):
    assert ok(modelworks("status", targets=all_targets)).count("SERVING") == 3
    dead = f"127.0.0.1:{free_port()}"
    result = modelworks("status", "--json", targets={**all_targets, "diffusion": dead})
    assert result.returncode == 1
    assert dead in result.stderr and "Traceback" not in result.stderr
    states = {row["service"]: row["status"] for row in json.loads(result.stdout)}
    assert states == {"llm": "SERVING", "diffusion": "UNREACHABLE", "finetune": "SERVING"}


def test_an_unreachable_service_exits_1_naming_its_address():
    dead = f"127.0.0.1:{free_port()}"
    result = modelworks("models", "list", "--kind", "llm", targets={"llm": dead})
    assert result.returncode == 1
    assert f"the LLM service at {dead} is unavailable" in result.stderr and "Traceback" not in result.stderr


def test_a_dataset_uploaded_trains_a_watched_job_whose_adapter_chats(all_targets, tmp_path):
    records = [{"prompt": f"Question {i}?", "completion": f" Answer {i}."} for i in range(8)]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    dataset = json.loads(ok(modelworks("--json", "datasets", "upload", str(path), targets=all_targets)))
    assert dataset["num_records"] == 8
    assert dataset["id"] in ok(modelworks("datasets", "list", targets=all_targets))

    created = modelworks(
        "jobs", "create", "--base-model", "tiny-llm", "--dataset", dataset["id"], "--adapter-name", "cli-qa",
        "--max-steps", "3", "--seed", "3", "--validation-fraction", "0.25", "--watch", targets=all_targets,
    )  # fmt: skip
    out = ok(created)
    assert "succeeded: adapter cli-qa" in out
    assert "3/3" in created.stderr and "loss=" in created.stderr  # the bar reached the end, showing the loss
    assert "[succeeded]" in created.stderr  # state changes print above the bar
    assert "val_loss=" in created.stderr
    job_id = out.split()[2].rstrip(":")

    assert json.loads(ok(modelworks("--json", "jobs", "show", job_id, targets=all_targets)))["state"] == (
        "JOB_STATE_SUCCEEDED"
    )
    assert job_id in ok(modelworks("jobs", "list", "--state", "succeeded", targets=all_targets))
    assert "progress" in ok(modelworks("jobs", "logs", job_id, targets=all_targets))
    adapters = json.loads(ok(modelworks("--json", "adapters", "list", "--kind", "llm", targets=all_targets)))
    assert "cli-qa" in {a["name"] for a in adapters}
    assert ok(modelworks("chat", "Question 1?", "--adapter", "cli-qa", *GREEDY, targets=all_targets)).strip()

    exported = ok(
        modelworks("exports", "create", "--job", job_id, "--gguf-type", "Q8_0", "--download", str(tmp_path),
                   targets=all_targets)
    )  # fmt: skip
    assert "exported cli-qa-q8_0" in exported and (tmp_path / "cli-qa-q8_0.gguf").read_bytes()[:4] == b"GGUF"
    assert "gguf Q8_0" in ok(modelworks("exports", "list", targets=all_targets))
    assert "deleted export cli-qa-q8_0" in ok(modelworks("exports", "delete", "cli-qa-q8_0", targets=all_targets))
    assert "deleted adapter cli-qa" in ok(modelworks("adapters", "delete", "cli-qa", targets=all_targets))
    missing = modelworks("jobs", "show", "no-such-job", targets=all_targets)
    assert missing.returncode == 2 and "NOT_FOUND" in missing.stderr and "Traceback" not in missing.stderr


def ctrl_c_delivered() -> None:
    """In the child: SIGINT as a terminal delivers it. A suite started in the background (`make test &`, nohup)
    inherits SIGINT ignored, and a Python started so never turns it into KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_detaches_from_a_watched_job_which_jobs_cancel_then_stops(all_targets, tmp_path):
    created = modelworks(
        "--json", "jobs", "create", "--base-model", "tiny-llm", "--dataset", "sample-llm-lighthouse",
        "--adapter-name", "cli-held", "--max-steps", "100000", targets=all_targets,
    )  # fmt: skip
    job_id = json.loads(ok(created))["id"]  # held running by construction: 100,000 steps
    options = [f"--{service}-target={address}" for service, address in all_targets.items()]
    log = tmp_path / "watch.err"
    with log.open("w") as err:
        watcher = subprocess.Popen(
            [sys.executable, "-m", "modelworks_cli", *options, "jobs", "watch", job_id],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=err, text=True, preexec_fn=ctrl_c_delivered,
        )  # fmt: skip
    try:
        wait_for(lambda: "[running]" in log.read_text(), 300, "the watcher to show the job running")
        watcher.send_signal(signal.SIGINT)
        assert watcher.wait(60) == 130
    finally:
        watcher.kill()
        cancelled = modelworks("jobs", "cancel", job_id, targets=all_targets)  # frees the shared worker, always
    shown = log.read_text()
    assert f"Re-attach with: modelworks jobs watch {job_id}" in shown and "Traceback" not in shown

    ok(cancelled)
    assert modelworks("jobs", "watch", job_id, targets=all_targets).returncode == 1  # re-attached; it ended cancelled
    assert json.loads(ok(modelworks("--json", "jobs", "show", job_id, targets=all_targets)))["state"] == (
        "JOB_STATE_CANCELLED"
    )


def test_the_api_key_is_sent_as_the_services_expect(data_dir, tmp_path):
    """A fine-tune API with a key (torch-free, seconds to start): without it, or with another, exit 2."""
    redis = start_redis(tmp_path / "redis")
    config = {**TEST_SERVER_CONFIG, "data_dir": str(data_dir), "redis_url": redis.url}
    config["api_keys"] = [{"name": "cli", "key": "cli-key-0123456789abc", "scopes": ["finetune"]}]
    server = spawn_service("finetune", tmp_path / "keyed", config, timeout=120)
    try:
        targets = {"finetune": server.address}
        missing = modelworks("adapters", "list", targets=targets, env={"MODELWORKS_API_KEY": ""})
        assert missing.returncode == 2 and "missing API key" in missing.stderr
        wrong = modelworks("adapters", "list", "--api-key", "not-the-key-0123456789", targets=targets)
        assert wrong.returncode == 2 and "invalid API key" in wrong.stderr
        ok(modelworks("adapters", "list", targets=targets, env={"MODELWORKS_API_KEY": "cli-key-0123456789abc"}))
        ok(modelworks("--json", "datasets", "list", "--api-key", "cli-key-0123456789abc", targets=targets))
    finally:
        server.stop()
        redis.stop()


def test_adapters_import_sends_a_lora_file_which_is_listed_and_served(all_targets, tmp_path, settings):
    from safetensors.torch import save_file

    from shared.loaders import load_diffusion_pipeline
    from tests.diffusion.lora_files import ATTENTION, kohya_unet, random_lora

    pipe = load_diffusion_pipeline(next(m for m in settings.models if m.kind == "diffusion"), settings).pipeline
    path = tmp_path / "downloaded-style.safetensors"
    save_file(kohya_unet(random_lora(pipe.unet, seed=51, target_modules=ATTENTION), alpha=8), str(path))
    shown = ok(modelworks("adapters", "import", str(path), "--name", "cli-kohya", "--base-model", "tiny-sd",
                          targets=all_targets))  # fmt: skip
    assert "imported cli-kohya (kohya LoRA for tiny-sd)" in shown
    assert "imported (kohya)" in ok(modelworks("adapters", "list", "--kind", "diffusion", targets=all_targets))
    made = json.loads(ok(modelworks("--json", "image", "a fox", "--adapter", "cli-kohya", "--out",
                                    str(tmp_path / "out"), "--steps", "2", targets=all_targets)))  # fmt: skip
    assert len(made) == 1
    again = modelworks("adapters", "import", str(path), "--name", "cli-kohya", "--base-model", "tiny-sd",
                       targets=all_targets)  # fmt: skip
    assert again.returncode == 2 and "already exists" in again.stderr
