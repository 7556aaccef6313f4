"""The Fine-tune tab: datasets, a job form, the jobs table, and per job a live loss plot, events and Cancel.

Split by concern: `finetune_form` is the form as one typed value (`JobForm`) and its checks,
`finetune_layout` the components, `finetune_watch` the picked job followed live; this module holds the
handlers for datasets, base models and jobs, and wires the events. On success, buttons hand the adapter
to Chat or Images.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import gradio as gr

from modelworks.finetune.v1 import finetune_pb2 as pb
from services.gateway.clients import QUICK_CALL_S, ServiceClients
from services.gateway.errors import call_or_warn, user_errors
from services.gateway.finetune_export import Exporter
from services.gateway.finetune_form import KINDS, JobForm
from services.gateway.finetune_layout import build_finetune_layout
from services.gateway.finetune_watch import JobWatcher
from services.gateway.jobview import jobs_table, state_name
from services.gateway.loading import Loader

FORMATS = {".jsonl": "jsonl", ".zip": "imagefolder_zip"}
KIND_FORMATS = {"LLM": "jsonl", "Diffusion": "imagefolder_zip"}
UPLOAD_CHUNK = 1024 * 1024
MAX_WATCHERS = 64  # job watchers running at once (one per open Fine-tune page); more wait their turn
PRIVATE = {"api_visibility": "private"}


@dataclass
class FinetuneTab:
    use_in_chat: gr.Button
    use_in_images: gr.Button
    finished_adapter: gr.State  # (kind name, base model, adapter) of the job shown, once it succeeded
    loader: Loader  # datasets, base models and jobs
    timer: gr.Timer  # refreshes the jobs table
    forget: Callable  # drops a closed session's watcher record (Blocks.unload)


class Catalog:
    """What the form offers and does: datasets, base models, uploads, and creating and cancelling jobs."""

    def __init__(self, clients: ServiceClients, watcher: JobWatcher):
        self.clients, self.watcher = clients, watcher
        self.service = clients.finetune_service

    def datasets(self, selected: str | None, kind_name: str):
        """The datasets a job of this kind can train on (JSONL for LLMs, image zips for diffusion)."""
        listed = call_or_warn(
            self.service,
            "list_datasets",
            lambda: self.clients.finetune.ListDatasets(pb.ListDatasetsRequest(), timeout=QUICK_CALL_S).datasets,
            [],
        )
        listed = [d for d in listed if d.format == KIND_FORMATS.get(kind_name)]
        choices = [
            (f"{d.name} · {d.record_type} · {d.num_records} records{' · bundled' if d.bundled else ''}", d.id)
            for d in listed
        ]
        ids = [d.id for d in listed]
        return gr.Dropdown(choices=choices, value=selected if selected in ids else (ids[0] if ids else None))

    def base_models(self, kind_name: str, current: str | None, current_method: str | None = None):
        """The base models of this kind, and the chosen one's methods and default target modules."""
        models = call_or_warn(
            self.service,
            "list_base_models",
            lambda: self.clients.finetune.ListBaseModels(pb.ListBaseModelsRequest(), timeout=QUICK_CALL_S).models,
            [],
        )
        matching = [m for m in models if m.kind == KINDS.get(kind_name)]
        names = [m.name for m in matching]
        chosen = current if current in names else (names[0] if names else None)
        model = next((m for m in matching if m.name == chosen), None)
        methods = list(model.methods) if model else ["lora"]
        targets = ", ".join(model.default_target_modules) if model else ""
        return (
            gr.Dropdown(choices=names, value=chosen),
            gr.Dropdown(choices=methods, value=current_method if current_method in methods else methods[0]),
            gr.Textbox(placeholder=f"default: {targets}" if targets else "default for the model"),
        )

    def upload(self, path: str | None, name: str | None):
        if not path:
            raise gr.Error("Choose a .jsonl (LLM) or .zip of images and captions (diffusion) to upload.",
                           print_exception=False)  # fmt: skip
        file = Path(path)
        data_format = FORMATS.get(file.suffix.lower())
        if data_format is None:
            raise gr.Error("Datasets are .jsonl files (LLM) or .zip image folders (diffusion).", print_exception=False)
        label = (name or "").strip() or file.stem

        def chunks() -> Iterator[pb.UploadDatasetRequest]:
            yield pb.UploadDatasetRequest(info=pb.DatasetInfo(name=label, format=data_format))
            with file.open("rb") as stream:
                while chunk := stream.read(UPLOAD_CHUNK):
                    yield pb.UploadDatasetRequest(chunk=chunk)

        with user_errors(self.service, "upload_dataset"):
            dataset = self.clients.finetune.UploadDataset(chunks(), timeout=600)
        gr.Info(f"Uploaded {dataset.name}: {dataset.num_records} {dataset.record_type} records.")
        kind_name = next(k for k, f in KIND_FORMATS.items() if f == data_format)
        return kind_name, self.datasets(dataset.id, kind_name), None

    def create_job(self, *form):
        """Create a job from the form (or the API's arguments, in `JobForm` order): (message, table, picker)."""
        request = JobForm(*form).request()
        with user_errors(self.service, "create_job"):
            job = self.clients.finetune.CreateJob(request, timeout=QUICK_CALL_S)
        message = f"Created job `{job.id}`: it trains **{job.adapter_name}** in {job.total_steps} steps."
        return message, *self.jobs(job.id)

    def jobs(self, selected: str | None) -> tuple:
        """The jobs table and picker (a warning, and empty, when the service does not answer)."""
        return self.watcher.listing(call_or_warn(self.service, "list_jobs", self.watcher.newest_jobs, []), selected)

    def list_jobs(self):
        with user_errors(self.service, "list_jobs"):
            return jobs_table(self.watcher.newest_jobs())

    def cancel(self, job_id: str | None) -> None:
        if not job_id:
            raise gr.Error("Pick a job to cancel.", print_exception=False)
        with user_errors(self.service, "cancel_job"):
            job = self.clients.finetune.CancelJob(pb.CancelJobRequest(id=job_id), timeout=QUICK_CALL_S)
        gr.Info(f"Job {job.id} is {state_name(job.state)}.")

    def refresh(self, selected_dataset, kind_name, model, current_method, job_id):
        """Everything the tab lists, fetched again (on load, when the tab is opened, and on ↻)."""
        return (
            self.datasets(selected_dataset, kind_name),
            *self.base_models(kind_name, model, current_method),
            *self.jobs(job_id),
        )


def _form_signature(fn: Callable) -> Callable:
    """`fn(*form)` with its arguments named after `JobForm`'s fields, with their defaults, for the API page
    and for Gradio (an argument whose component starts empty is optional where its default is None)."""

    @functools.wraps(fn)
    def call(*form):
        return fn(*form)

    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    call.__signature__ = inspect.Signature(
        [inspect.Parameter(f.name, kind, default=f.default) for f in fields(JobForm)]
    )
    return call


def build_finetune_tab(clients: ServiceClients, concurrency_limit: int) -> FinetuneTab:
    ui = build_finetune_layout()
    watcher = JobWatcher(clients, ui)
    catalog = Catalog(clients, watcher)
    timer = gr.Timer(3.0, active=False)  # running while this tab is shown
    dataset, kind, base_model, method = (ui.field(n) for n in ("dataset_id", "kind", "base_model", "method"))
    model_outputs = [base_model, method, ui.field("target_modules")]
    loader = Loader(catalog.refresh, [dataset, kind, base_model, method, ui.job], [dataset, *model_outputs, ui.table,
                                                                                   ui.job])  # fmt: skip
    ui.refresh.click(loader.fn, loader.inputs, loader.outputs, **PRIVATE)

    def kind_changed(kind_name, selected_dataset, model, current_method):
        return catalog.datasets(selected_dataset, kind_name), *catalog.base_models(kind_name, model, current_method)

    kind.change(kind_changed, [kind, dataset, base_model, method], [dataset, *model_outputs], **PRIVATE)
    base_model.input(catalog.base_models, [kind, base_model, method], model_outputs, **PRIVATE)
    ui.upload.click(catalog.upload, [ui.dataset_file, ui.dataset_name], [kind, dataset, ui.dataset_file],
                    api_name="upload_dataset")  # fmt: skip
    ui.create.click(_form_signature(catalog.create_job), ui.form, [ui.created, ui.table, ui.job], api_name="create_job")
    gr.Button(visible=False).click(catalog.list_jobs, None, [ui.table], api_name="list_jobs")
    timer.tick(watcher.tick, [ui.job], [ui.table, ui.job], show_progress="hidden", **PRIVATE)
    ui.table.select(_row_job_id, None, [ui.job], **PRIVATE)
    # Picking another job records it (`pick`, at once), which ends the running watcher; the new one then
    # starts (trigger_mode "always_last" waits for the old one to end).
    ui.job.change(watcher.pick, [ui.job], None, queue=False, trigger_mode="multiple", **PRIVATE).then(
        watcher.watch,
        [ui.job],
        watcher.outputs,
        concurrency_id="job-watchers",
        concurrency_limit=MAX_WATCHERS,
        trigger_mode="always_last",
        show_progress="hidden",
        **PRIVATE,
    )
    ui.log_scale.change(watcher.redraw, [ui.log_scale], [ui.plot], queue=False, show_progress="hidden", **PRIVATE)
    ui.cancel.click(catalog.cancel, [ui.job], None, **PRIVATE)
    exporter = Exporter(clients)
    ui.export.click(
        lambda: (gr.File(visible=False), "Exporting: the base model loads and the adapter is merged…"),
        None, [ui.export_file, ui.export_note], queue=False, **PRIVATE,
    ).then(
        _shown_file(exporter.export), [ui.finished, ui.export_choice], [ui.export_file, ui.export_note],
        api_name="export_adapter",
    )  # fmt: skip
    return FinetuneTab(ui.use_in_chat, ui.use_in_images, ui.finished, loader, timer, watcher.forget)


def _shown_file(export: Callable) -> Callable:
    """`export`'s (path, note) with the download box made visible; a refusal in the note (and a toast)."""

    @functools.wraps(export)
    def shown(finished, choice):
        try:
            path, note = export(finished, choice)
        except gr.Error as error:
            gr.Warning(error.message)
            return gr.File(visible=False), f"Not exported: {error.message}"
        return gr.File(value=path, visible=True), note

    return shown


def _row_job_id(event: gr.SelectData):
    """The id of the clicked row (the row's own values, so a sorted table picks the right job)."""
    return event.row_value[0] if event.row_value else gr.skip()
