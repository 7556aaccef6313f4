"""The Fine-tune tab's components: the job form on the left, the picked job on the right, the jobs below.

The form shows what most jobs set (dataset, kind, base model, adapter name, and the hyperparameters that
`JobForm` marks basic); the other hyperparameters are under a closed "Advanced" accordion. Only layout
lives here; `finetune.py` wires the events. `FinetuneLayout.form` lists the form's components in the order
of `JobForm`'s fields.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from services.gateway.finetune_export import CHOICES, DEFAULT_CHOICE
from services.gateway.finetune_form import KINDS, JobForm
from services.gateway.jobview import jobs_table
from services.gateway.lossplot import loss_svg

ADVANCED_PER_ROW = 3


@dataclass
class FinetuneLayout:
    form: list  # in `JobForm` order
    refresh: gr.Button
    dataset_file: gr.File
    dataset_name: gr.Textbox
    upload: gr.Button
    create: gr.Button
    created: gr.Markdown
    job: gr.Dropdown
    progress: gr.Markdown
    plot: gr.HTML
    log_scale: gr.Checkbox
    cancel: gr.Button
    use_in_chat: gr.Button
    use_in_images: gr.Button
    export_choice: gr.Dropdown
    export: gr.Button
    export_file: gr.File
    export_note: gr.Markdown
    events: gr.Textbox
    resolved: gr.JSON
    table: gr.Dataframe
    finished: gr.State  # (kind name, base model, adapter) of the job shown, once it succeeded

    def field(self, name: str):
        """The form's component for `JobForm` field `name`."""
        return self.form[JobForm.names().index(name)]


def build_finetune_layout() -> FinetuneLayout:
    with gr.Row(equal_height=False):
        gr.Markdown("Train a LoRA adapter on a dataset; when the job succeeds, the services serve it by name at once.")
        refresh = gr.Button("↻ Refresh", size="sm", scale=0, min_width=100, elem_id="ft-refresh")
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=480):
            form, upload = _job_form()
            create = gr.Button("Create job", variant="primary", elem_id="ft-create")
            created = gr.Markdown(elem_id="ft-created")
        with gr.Column(scale=1, min_width=480):
            job = gr.Dropdown(label="Job", choices=[], allow_custom_value=True, elem_id="ft-job")
            progress = gr.Markdown(elem_id="ft-progress")
            plot = gr.HTML(loss_svg([]), label="Loss", elem_id="ft-loss-plot")
            log_scale = gr.Checkbox(label="Log scale", elem_id="ft-log-scale", container=False)
            with gr.Row():
                cancel = gr.Button("Cancel job", variant="stop", visible=False, elem_id="ft-cancel")
                use_in_chat = gr.Button("Chat with this adapter", visible=False, elem_id="ft-use-in-chat")
                use_in_images = gr.Button("Make images with this adapter", visible=False, elem_id="ft-use-in-images")
            export_parts = _export_row()
            events = gr.Textbox(label="Events", lines=8, max_lines=8, interactive=False, elem_id="ft-events")
            resolved = gr.JSON(label="Resolved hyperparameters", max_height=240)
    table = gr.Dataframe(jobs_table([]), label="Jobs (newest first)", interactive=False, wrap=True, elem_id="ft-jobs")
    return FinetuneLayout(
        form, refresh, *upload, create, created, job, progress, plot, log_scale, cancel, use_in_chat, use_in_images,
        *export_parts, events, resolved, table, gr.State(None),
    )  # fmt: skip


def _export_row() -> tuple[gr.Dropdown, gr.Button, gr.File, gr.Markdown]:
    """A succeeded LLM job's export: the format, the button, then the file to download and what it is."""
    with gr.Row(equal_height=True):
        choice = gr.Dropdown(
            list(CHOICES), value=DEFAULT_CHOICE, label="Export the adapter merged into its base", visible=False,
            elem_id="ft-export-choice", scale=3,
        )  # fmt: skip
        button = gr.Button("Export", visible=False, elem_id="ft-export", scale=1)
    file = gr.File(label="Download", visible=False, interactive=False, elem_id="ft-export-file")
    note = gr.Markdown(elem_id="ft-export-note")
    return choice, button, file, note


def _job_form() -> tuple[list, tuple[gr.File, gr.Textbox, gr.Button]]:
    """The form's components in `JobForm` order, and the upload box."""
    settings = JobForm.settings()
    basic = [name for name, setting in settings.items() if setting.basic]
    dataset = gr.Dropdown(
        label="Dataset", choices=[], allow_custom_value=True, elem_id="ft-dataset",
        info="bundled samples and your uploads, for the kind below",
    )  # fmt: skip
    with gr.Accordion("Upload a dataset", open=False):
        dataset_file = gr.File(label=".jsonl (LLM) or .zip of images + captions", file_types=[".jsonl", ".zip"])
        dataset_name = gr.Textbox(label="Name", placeholder="defaults to the file name")
        upload = gr.Button("Upload")
    with gr.Row():
        kind = gr.Radio(list(KINDS), value="LLM", label="Kind", elem_id="ft-kind", scale=1, min_width=220)
        base_model = gr.Dropdown(
            label="Base model", choices=[], allow_custom_value=True, elem_id="ft-base-model", scale=2
        )
    with gr.Row():
        adapter_name = gr.Textbox(
            label="Adapter name", elem_id="ft-adapter-name", scale=2,
            info="the name Chat and Images will know it by",
        )  # fmt: skip
        components = {name: settings[name].make(name) for name in basic[:1]}  # the method, beside the name
    with gr.Row():
        components |= {name: settings[name].make(name) for name in basic[1:]}  # how long and how fast
    with gr.Accordion("Advanced (0 or blank: the default for the model and data)", open=False, elem_id="ft-advanced"):
        advanced = [name for name in settings if name not in basic]
        for start in range(0, len(advanced), ADVANCED_PER_ROW):
            with gr.Row():
                components |= {name: settings[name].make(name) for name in advanced[start : start + ADVANCED_PER_ROW]}
    by_name = {"dataset_id": dataset, "kind": kind, "base_model": base_model, "adapter_name": adapter_name,
               **components}  # fmt: skip
    return [by_name[name] for name in JobForm.names()], (dataset_file, dataset_name, upload)
