"""The gateway's pure parts: input checks, error wording, chat history, the loss plot."""

from __future__ import annotations

import threading

import gradio as gr
import grpc
import pytest

from modelworks.finetune.v1 import finetune_pb2 as ft
from services.gateway import validation
from services.gateway.chat_request import ChatSettings, ModelLimits, history_messages
from services.gateway.clients import Service
from services.gateway.config import GatewayConfig
from services.gateway.errors import describe
from services.gateway.jobview import JobView
from services.gateway.lossplot import loss_svg
from services.gateway.streams import follow


class FakeRpcError(grpc.RpcError):
    """The shape of a failed call (code and details): what a real channel raises, without a network."""

    def __init__(self, code: grpc.StatusCode, details: str):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


LLM = Service("LLM", "10.0.0.5:50051", channel=None)


@pytest.mark.parametrize(
    ("code", "details", "expected"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, "temperature must be >= 0", "temperature must be >= 0"),
        (grpc.StatusCode.NOT_FOUND, "adapter 'x' not found", "adapter 'x' not found"),
        (grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; last error: ipv4:10.0.0.5:50051",
         "The LLM service at 10.0.0.5:50051 is not reachable"),
        (grpc.StatusCode.UNAVAILABLE, "the engine stopped", "The LLM service is unavailable: the engine stopped"),
        (grpc.StatusCode.UNAUTHENTICATED, "missing API key", "refused the gateway's API key"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", "did not answer in time"),
        (grpc.StatusCode.INTERNAL, "internal error (reference 1234)", "failed on this request. internal error"),
    ],
)  # fmt: skip
def test_errors_are_worded_for_people(code, details, expected):
    assert expected in describe(LLM, FakeRpcError(code, details))


@pytest.mark.parametrize(("value", "expected"), [(None, None), (-1, None), ("", None), (0, 0), (2**64 - 1, 2**64 - 1)])
def test_seeds(value, expected):
    assert validation.optional_seed(value) == expected


@pytest.mark.parametrize("value", [-2, 1.5, 2**64])
def test_bad_seeds(value):
    with pytest.raises(gr.Error, match="Seed must be -1"):
        validation.optional_seed(value)


def test_image_sides_and_stop_strings():
    assert validation.image_side(512, "Width") == 512
    with pytest.raises(gr.Error, match="multiple of 8"):
        validation.image_side(100, "Width")
    with pytest.raises(gr.Error, match="between 64 and 2,048"):
        validation.image_side(4096, "Width")
    assert validation.stop_strings("###\n\\n\\nUser:\n\n") == ["###", "\n\nUser:"]


def test_adapter_names_follow_the_store_rule():
    assert validation.adapter_name(" my-adapter.v2 ") == "my-adapter.v2"
    for bad in ("", "../x", "-x", "a" * 65, "a b"):
        with pytest.raises(gr.Error):
            validation.adapter_name(bad)


def test_history_keeps_text_turns_in_order_with_the_system_prompt_first():
    history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]},
        {"role": "user", "content": {"path": "/tmp/cat.png"}},  # a file: no text to send
    ]
    messages = history_messages(history, " Be brief. ", "and now?")
    assert [(m.role, m.content) for m in messages] == [
        ("system", "Be brief."),
        ("user", "hi"),
        ("assistant", "hello"),
        ("user", "and now?"),
    ]


@pytest.mark.parametrize(
    ("number", "written"),
    [(4096, "4,096"), (1e8, "100,000,000"), (4096.0, "4,096"), (0.01, "0.01"), (1e-7, "0.0000001"), (2.5, "2.5")],
)
def test_numbers_in_messages_print_as_people_write_them(number, written):
    assert validation.plain(number) == written


def test_a_bad_number_is_named_in_plain_digits():
    with pytest.raises(gr.Error) as excinfo:
        validation.whole_number(1e8, 1, 4096, "Max new tokens")
    assert excinfo.value.message == "Max new tokens must be between 1 and 4,096; it is 100,000,000."


def test_max_new_tokens_are_bounded_by_what_the_service_says():
    assert ModelLimits(context_length=8192, max_new_tokens_limit=4096).max_new_tokens == 4096
    assert ModelLimits(context_length=2048, max_new_tokens_limit=4096).max_new_tokens == 2048
    assert ModelLimits().max_new_tokens == 1_000_000  # unknown: the service checks alone
    assert ModelLimits(8192, 4096).hint == "up to 4,096 (prompt and answer share 8,192)"
    assert ModelLimits(source="builtin:tiny-llm").random_weights and not ModelLimits(source="hf:x").random_weights


def test_chat_settings_default_like_the_form():
    settings = ChatSettings("Be brief.")
    assert settings.values()[:3] == ("Be brief.", None, "(base model)")
    assert ChatSettings.names()[0] == "system_prompt" and ChatSettings.names()[-2:] == ["json_schema", "tools"]


def test_the_loss_plot_draws_one_point_a_step_and_skips_non_finite_losses():
    points = [(1, 3.0, "train"), (2, float("nan"), "train"), (3, 1.0, "train"), (3, 1.5, "validation")]
    svg = loss_svg(points)
    assert 'class="loss-train" data-points="2"' in svg and 'class="loss-validation" data-points="1"' in svg
    assert "no loss reported yet" in loss_svg([])


def test_config_reads_the_documented_variables():
    config = GatewayConfig.from_environ(
        {"MODELWORKS_LLM_TARGET": "llm:50051", "MODELWORKS_GATEWAY_AUTH": "ada:s3cret", "MODELWORKS_API_KEY": "k"}
    )
    assert config.llm_target == "llm:50051" and config.credentials == ("ada", "s3cret")
    assert config.api_key.get_secret_value() == "k" and config.diffusion_target == "127.0.0.1:50052"
    with pytest.raises(ValueError, match="user:password"):
        GatewayConfig.from_environ({"MODELWORKS_GATEWAY_AUTH": "nopassword"})


class HeldStream:
    """A server stream that sends one message, then holds until it is cancelled (as a real call would)."""

    def __init__(self):
        self.cancelled = threading.Event()

    def __iter__(self):
        yield "first"
        self.cancelled.wait()
        raise FakeRpcError(grpc.StatusCode.CANCELLED, "Locally cancelled by application!")

    def cancel(self):
        self.cancelled.set()


class FailingStream(HeldStream):
    def __init__(self, error: BaseException):
        super().__init__()
        self.error = error

    def __iter__(self):
        raise self.error
        yield  # a generator


def test_follow_yields_messages_and_heartbeats_and_closing_it_cancels_the_call():
    call = HeldStream()
    stream = follow(call, heartbeat_s=0.01)
    assert next(stream) == "first"
    assert next(stream) is None  # nothing more yet: a heartbeat, not a block
    stream.close()
    assert call.cancelled.is_set()


@pytest.mark.parametrize("error", [FakeRpcError(grpc.StatusCode.UNAVAILABLE, "down"), ValueError("broken")])
def test_follow_raises_the_streams_failure_instead_of_waiting_forever(error):
    with pytest.raises(type(error)):
        list(follow(FailingStream(error), heartbeat_s=0.01))


def event(step: int, kind: str = "progress", loss: float = 1.0, event_id: str = "") -> ft.JobEvent:
    return ft.JobEvent(
        step=step, total_steps=10, type=kind, train_loss=loss, val_loss=loss, event_id=event_id or f"{step}-{kind}",
        state=ft.JOB_STATE_RUNNING if kind == "state" else ft.JOB_STATE_UNSPECIFIED,
    )  # fmt: skip


def test_a_replayed_history_changes_nothing_in_the_job_view():
    view = JobView(ft.Job(id="j", adapter_name="a", base_model="m", state=ft.JOB_STATE_QUEUED))
    history = [event(0, "state"), event(1), event(2), event(2, "eval", 0.5), event(2, "checkpoint")]
    for e in history:
        view.apply(e)
    plot, log = view.plot(), view.log()
    for e in history:  # what a reconnected WatchJob sends again
        view.apply(e)
    assert (view.plot(), view.log()) == (plot, log)
    assert 'data-points="2"' in plot and view.active and "step 2 of 10" in view.note()


def test_the_painted_mask_is_white_where_any_layer_is_painted_at_the_init_images_size():
    import io

    from PIL import Image

    from services.gateway.images_form import mask_png

    init = Image.new("RGB", (64, 48))
    layer = Image.new("RGBA", (128, 96), (0, 0, 0, 0))
    layer.paste((255, 255, 255, 200), (64, 0, 128, 96))  # the right half, painted on an editor shown at 2x
    value = {"background": init, "layers": [layer], "composite": None}
    mask = Image.open(io.BytesIO(mask_png(value, init)))
    assert mask.size == (64, 48) and mask.mode == "L"
    assert mask.getpixel((10, 10)) == 0 and mask.getpixel((40, 10)) == 255
    assert mask_png({"background": init, "layers": [Image.new("RGBA", (64, 48))], "composite": None}, init) == b""
    assert mask_png(None, init) == b""
    api = Image.new("L", (64, 48), 255)  # the API sends an image: white repaints
    assert Image.open(io.BytesIO(mask_png(api, init))).getpixel((0, 0)) == 255
