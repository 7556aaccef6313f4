"""The web app's forms as typed values, the loss plot's axes, and the Images endpoint called with only a prompt.

The form and plot tests are pure (no servers); the last test calls the real gateway with `gradio_client`.
"""

from __future__ import annotations

import re
from dataclasses import fields

import gradio as gr
import pytest

from modelworks.finetune.v1 import finetune_pb2 as ft
from services.gateway.finetune_form import JobForm
from services.gateway.jobview import JobView, job_choices, jobs_table
from services.gateway.lossplot import log_ticks, loss_svg, nice_ticks, step_ticks


def test_the_job_form_is_one_value_whose_hyperparameters_fill_the_proto_by_name():
    form = JobForm(
        "sample-llm-lighthouse", "LLM", "tiny-llm", "fact-bot", max_steps=60, learning_rate=1e-3,
        target_modules="q_proj, v_proj", seed=3, validation_fraction=0.25, random_flip=True,
    )  # fmt: skip
    request = form.request()
    assert (request.kind, request.base_model, request.dataset_id, request.adapter_name) == (
        ft.JOB_KIND_LLM, "tiny-llm", "sample-llm-lighthouse", "fact-bot",
    )  # fmt: skip
    hp = request.hyperparameters
    assert (hp.max_steps, hp.seed, list(hp.target_modules), hp.random_flip) == (60, 3, ["q_proj", "v_proj"], True)
    assert hp.learning_rate == pytest.approx(1e-3) and hp.validation_fraction == pytest.approx(0.25)
    # every hyperparameter of the form is a field of the proto, under the same name
    proto_fields = set(ft.Hyperparameters.DESCRIPTOR.fields_by_name)
    assert set(JobForm.settings()) <= proto_fields


def test_blank_and_default_fields_leave_the_choice_to_the_service():
    hp = JobForm("d", "LLM", "m", "a", epochs=None, max_steps="", validation_fraction=-1, seed=-1).hyperparameters()
    assert not hp.HasField("validation_fraction") and not hp.HasField("seed")
    assert (hp.epochs, hp.max_steps, hp.method, hp.mixed_precision) == (0, 0, "lora", "auto")


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"dataset_id": None}, "Pick a dataset"),
        ({"base_model": ""}, "Pick a base model"),
        ({"adapter_name": "../up"}, "is not allowed"),
        ({"learning_rate": 5}, "Learning rate must be between 0 and 1; it is 5."),
        ({"epochs": 2.5}, "Epochs must be a whole number"),
        ({"validation_fraction": 0.9}, "Validation fraction must be between 0 and 0.5"),
        ({"seed": -5}, "Seed must be -1"),
    ],
)
def test_a_bad_field_gets_a_message_that_names_it(changes, expected):
    values = {"dataset_id": "d", "kind": "LLM", "base_model": "m", "adapter_name": "a", **changes}
    with pytest.raises(gr.Error) as excinfo:
        JobForm(**values).request()
    assert expected in excinfo.value.message


def test_each_hyperparameter_is_shown_under_its_own_elem_id_and_the_basic_ones_are_few():
    settings = JobForm.settings()
    basic = [name for name, setting in settings.items() if setting.basic]
    assert basic == ["method", "epochs", "max_steps", "learning_rate"]
    with gr.Blocks():
        built = {name: setting.make(name) for name, setting in settings.items()}
    assert built["max_steps"].elem_id == "ft-max-steps"
    assert [f.name for f in fields(JobForm)][:4] == ["dataset_id", "kind", "base_model", "adapter_name"]


def test_y_ticks_are_round_numbers_around_the_losses_not_down_to_zero():
    assert nice_ticks(2.9, 3.2) == [2.9, 3.0, 3.1, 3.2]
    assert nice_ticks(0.01, 3.5) == [0.0, 1.0, 2.0, 3.0, 4.0]
    ticks = nice_ticks(0.123, 0.1234)
    assert ticks[0] <= 0.123 and ticks[-1] >= 0.1234 and len(ticks) >= 3
    assert len(nice_ticks(3.0, 3.0)) >= 3, "a flat curve still gets an axis"


def test_step_and_log_ticks():
    assert step_ticks(1, 60) == [1, 20, 40, 60]
    assert step_ticks(0, 12) == [0, 5, 10]
    assert log_ticks(0.01, 3.5) == [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0]
    assert log_ticks(1e-4, 10) == [0.0001, 0.001, 0.01, 0.1, 1.0, 10.0]
    assert log_ticks(2.9, 3.2) == [2.9, 3.0, 3.1, 3.2]  # a narrow range: round numbers on the log axis


def tick_labels(svg: str, axis: str) -> list[str]:
    return re.findall(rf'<text class="{axis}-tick"[^>]*>([^<]*)</text>', svg)


def test_the_loss_plot_labels_several_y_ticks_and_the_steps():
    points = [(step, 3.2 - 0.005 * step, "train") for step in range(1, 61)] + [(30, 3.1, "validation")]
    svg = loss_svg(points, total_steps=60)
    assert tick_labels(svg, "y") == ["2.9", "3.0", "3.1", "3.2"]
    assert tick_labels(svg, "x") == ["1", "20", "40", "60"]
    assert 'class="loss-train" data-points="60"' in svg and 'class="loss-validation" data-points="1"' in svg
    log_svg = loss_svg(points, total_steps=60, log_scale=True)
    assert "log scale" in log_svg and len(tick_labels(log_svg, "y")) >= 3
    assert "log scale needs losses above 0" in loss_svg([(1, 0.0, "train"), (2, 1.0, "train")], log_scale=True)


def test_the_job_view_header_follows_the_listed_record():
    view = JobView(ft.Job(id="j", adapter_name="a", base_model="m", state=ft.JOB_STATE_RUNNING, total_steps=12))
    listed = ft.Job(id="j", adapter_name="a", base_model="m", state=ft.JOB_STATE_SUCCEEDED, step=12, total_steps=12)
    view.sync(listed)
    assert "succeeded" in view.note() and not view.active
    assert "succeeded" in job_choices([listed])[0][0]
    assert jobs_table([listed]).loc[0, "state"] == "succeeded"


def test_the_images_endpoint_needs_only_the_prompt(client):
    """Every other input has a default: the model's own steps, size and guidance, a drawn seed, one image."""
    _, note, gallery = client.predict("a red square", api_name="/generate_images")
    assert len(gallery) == 1 and re.search(r"seed\(s\) \d+", note)


def test_create_job_takes_its_arguments_by_name_with_defaults_for_the_rest(client):
    """Checked before any job is made: a refused adapter name shows that the named arguments arrived."""
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as excinfo:
        client.predict(dataset_id="sample-llm-lighthouse", base_model="tiny-llm", adapter_name="../up",
                       max_steps=5, api_name="/create_job")  # fmt: skip
    assert "Adapter name '../up' is not allowed" in str(excinfo.value)
