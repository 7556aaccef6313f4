"""The Fine-tune tab: datasets, a job form, the jobs table, and per job a live loss plot, events and Cancel.

A job is followed with `WatchJob`, which replays the job's events and then streams new ones, so the plot
is whole even when the page is opened mid-run. On success, buttons hand the adapter to Chat or Images.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import grpc
import pandas as pd

from modelworks.finetune.v1 import finetune_pb2 as pb
from services.gateway import validation
from services.gateway.clients import QUICK_CALL_S, ServiceClients
from services.gateway.errors import call_or_warn, user_errors
from services.gateway.jobview import JobView, state_name
from services.gateway.loading import Loader
from services.gateway.lossplot import loss_svg
from services.gateway.streams import follow

KINDS = {"LLM": pb.JOB_KIND_LLM, "Diffusion": pb.JOB_KIND_DIFFUSION}
KIND_NAMES = {v: k for k, v in KINDS.items()}
FORMATS = {".jsonl": "jsonl", ".zip": "imagefolder_zip"}
KIND_FORMATS = {"LLM": "jsonl", "Diffusion": "imagefolder_zip"}
UPLOAD_CHUNK = 1024 * 1024
JOB_COLUMNS = ["id", "adapter", "kind", "base model", "state", "step", "train loss", "val loss", "ETA", "created"]
REDRAW_S = 0.5  # the watcher sends the browser at most this often while events pour in
RECONNECT_S = 2.0
RECONNECTING = object()
MAX_WATCHERS = 64  # job watchers running at once (one per open Fine-tune page); more wait their turn


@dataclass
class FinetuneTab:
    use_in_chat: gr.Button
    use_in_images: gr.Button
    finished_adapter: gr.State  # (kind name, base model, adapter) of the job shown, once it succeeded
    loader: Loader  # datasets, base models and jobs
    timer: gr.Timer  # refreshes the jobs table
    forget: Callable  # drops a closed session's watcher record (Blocks.unload)


def jobs_table(jobs) -> pd.DataFrame:
    rows = [
        [
            job.id,
            job.adapter_name,
            KIND_NAMES.get(job.kind, "?"),
            job.base_model,
            state_name(job.state),
            f"{job.step}/{job.total_steps}" if job.total_steps else "",
            f"{job.train_loss:.4f}" if job.step else "",
            f"{job.val_loss:.4f}" if job.val_loss else "",
            f"{job.eta_seconds:.0f} s" if job.state == pb.JOB_STATE_RUNNING and job.eta_seconds else "",
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.created_at)),
        ]
        for job in jobs
    ]
    return pd.DataFrame(rows, columns=JOB_COLUMNS)


def hyperparameters(
    method, epochs, max_steps, learning_rate, batch_size, gradient_accumulation_steps, lora_r, lora_alpha,
    lora_dropout, target_modules, warmup_ratio, lr_scheduler, max_grad_norm, mixed_precision, validation_fraction,
    early_stopping_patience, seed, max_seq_length, resolution, save_steps, eval_steps, num_virtual_tokens,
    random_crop, random_flip,
) -> pb.Hyperparameters:  # fmt: skip
    """The form's hyperparameters; 0 or blank leaves a field to the service's default for the model and data."""
    whole = validation.whole_number
    hp = pb.Hyperparameters(
        method=method or "",
        epochs=whole(epochs or 0, 0, 1000, "Epochs"),
        max_steps=whole(max_steps or 0, 0, 1_000_000, "Max steps"),
        learning_rate=validation.number_in_range(learning_rate or 0, 0, 1, "Learning rate"),
        batch_size=whole(batch_size or 0, 0, 1024, "Batch size"),
        gradient_accumulation_steps=whole(gradient_accumulation_steps or 0, 0, 1024, "Gradient accumulation"),
        lora_r=whole(lora_r or 0, 0, 1024, "LoRA rank"),
        lora_alpha=validation.number_in_range(lora_alpha or 0, 0, 1e4, "LoRA alpha"),
        lora_dropout=validation.number_in_range(lora_dropout or 0, 0, 0.9, "LoRA dropout"),
        target_modules=[t.strip() for t in (target_modules or "").replace(",", " ").split() if t.strip()],
        warmup_ratio=validation.number_in_range(warmup_ratio or 0, 0, 0.9, "Warm-up ratio"),
        lr_scheduler=lr_scheduler or "",
        max_grad_norm=validation.number_in_range(max_grad_norm or 0, 0, 1e4, "Max gradient norm"),
        mixed_precision=mixed_precision or "",
        early_stopping_patience=whole(early_stopping_patience or 0, 0, 1000, "Early-stopping patience"),
        max_seq_length=whole(max_seq_length or 0, 0, 1_000_000, "Max sequence length"),
        resolution=whole(resolution or 0, 0, 2048, "Resolution"),
        save_steps=whole(save_steps or 0, 0, 1_000_000, "Save every"),
        eval_steps=whole(eval_steps or 0, 0, 1_000_000, "Evaluate every"),
        num_virtual_tokens=whole(num_virtual_tokens or 0, 0, 512, "Virtual tokens"),
        random_crop=bool(random_crop),
        random_flip=bool(random_flip),
    )
    if validation_fraction not in (None, "", -1):
        hp.validation_fraction = validation.number_in_range(validation_fraction, 0, 0.5, "Validation fraction")
    seed = validation.optional_seed(seed)
    if seed is not None:
        hp.seed = seed
    return hp


def build_finetune_tab(clients: ServiceClients, concurrency_limit: int) -> FinetuneTab:
    finetune = clients.finetune_service

    def list_datasets(selected: str | None, kind_name: str):
        """The datasets a job of this kind can train on (JSONL for LLMs, image zips for diffusion)."""
        datasets = call_or_warn(
            finetune,
            "list_datasets",
            lambda: clients.finetune.ListDatasets(pb.ListDatasetsRequest(), timeout=QUICK_CALL_S).datasets,
            [],
        )
        datasets = [d for d in datasets if d.format == KIND_FORMATS.get(kind_name)]
        choices = [
            (f"{d.name} · {d.record_type} · {d.num_records} records{' · bundled' if d.bundled else ''}", d.id)
            for d in datasets
        ]
        ids = [d.id for d in datasets]
        return gr.Dropdown(choices=choices, value=selected if selected in ids else (ids[0] if ids else None))

    def base_models(kind_name: str, current: str | None, current_method: str | None = None):
        models = call_or_warn(
            finetune,
            "list_base_models",
            lambda: clients.finetune.ListBaseModels(pb.ListBaseModelsRequest(), timeout=QUICK_CALL_S).models,
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

    def upload(path: str | None, name: str | None):
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

        with user_errors(finetune, "upload_dataset"):
            dataset = clients.finetune.UploadDataset(chunks(), timeout=600)
        gr.Info(f"Uploaded {dataset.name}: {dataset.num_records} {dataset.record_type} records.")
        kind_name = next(k for k, f in KIND_FORMATS.items() if f == data_format)
        return kind_name, list_datasets(dataset.id, kind_name), None

    def create_job(dataset_id, kind, base_model, adapter_name, *hyper):
        if not dataset_id:
            raise gr.Error("Pick a dataset, or upload one first.", print_exception=False)
        if kind not in KINDS:
            raise gr.Error("Kind must be LLM or Diffusion.", print_exception=False)
        if not base_model:
            raise gr.Error("Pick a base model to fine-tune.", print_exception=False)
        request = pb.CreateJobRequest(
            kind=KINDS[kind],
            base_model=base_model,
            dataset_id=dataset_id,
            adapter_name=validation.adapter_name(adapter_name),
            hyperparameters=hyperparameters(*hyper),
        )
        with user_errors(finetune, "create_job"):
            job = clients.finetune.CreateJob(request, timeout=QUICK_CALL_S)
        return (
            f"Created job `{job.id}`: it trains **{job.adapter_name}** in {job.total_steps} steps.",
            *jobs_view(job.id),
        )

    def newest_jobs():
        return clients.finetune.ListJobs(pb.ListJobsRequest(limit=100), timeout=QUICK_CALL_S).jobs

    def jobs_view(selected: str | None):
        return _jobs_outputs(call_or_warn(finetune, "list_jobs", newest_jobs, []), selected)

    def jobs_on_tick(selected: str | None):
        """The periodic refresh: quiet when the service is down (the Refresh button says why)."""
        try:
            jobs = newest_jobs()
        except grpc.RpcError:
            return gr.skip(), gr.skip()
        return _jobs_outputs(jobs, selected)

    def list_jobs() -> pd.DataFrame:
        with user_errors(finetune, "list_jobs"):
            return jobs_table(newest_jobs())

    def select(job_id: str | None, request: gr.Request) -> None:
        """Record the session's chosen job: a running watcher of another job sees it and ends."""
        watched[request.session_hash] = job_id

    def forget(request: gr.Request) -> None:
        watched.pop(request.session_hash, None)

    def job_events(job_id: str) -> Iterator[pb.JobEvent | object | None]:
        """The job's events (None while none come), re-following after the fine-tune API restarts (marked by
        `RECONNECTING`): the replay it sends then is absorbed by `JobView`."""
        while True:
            try:
                yield from follow(clients.finetune.WatchJob(pb.WatchJobRequest(id=job_id)))
                return
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
            yield RECONNECTING
            time.sleep(RECONNECT_S)

    def watch(job_id: str | None, request: gr.Request):
        """Follow one job: the loss plot, progress, events and buttons, live until the job ends or another
        job is picked in this browser session (`select`, which always runs first)."""
        hidden = gr.Button(visible=False)
        if not job_id:
            yield loss_svg([]), "", "", hidden, hidden, hidden, None, None
            return
        with user_errors(finetune, "watch_job"):
            view = JobView(clients.finetune.GetJob(pb.GetJobRequest(id=job_id), timeout=QUICK_CALL_S))
            resolved = gr.JSON(value=_resolved(view.job))
            drawn = 0.0
            for event in job_events(job_id):
                if watched.get(request.session_hash) != job_id:
                    return  # another job was picked: its watcher starts when this one has ended
                if event is None:
                    yield (gr.skip(),) * 8  # nothing new; lets Gradio close this generator at once
                    continue
                if event is RECONNECTING:
                    view.reconnecting = True
                    yield gr.skip(), view.note(), *(gr.skip(),) * 6
                    continue
                view.apply(event)
                if event.type != "state" and time.monotonic() - drawn < REDRAW_S:
                    continue
                drawn = time.monotonic()
                yield view.plot(), view.note(), view.log(), gr.Button(visible=view.active), hidden, hidden, None, \
                    resolved  # fmt: skip
            view.finish(clients.finetune.GetJob(pb.GetJobRequest(id=job_id), timeout=QUICK_CALL_S))
        job = view.job
        yield (
            view.plot(),
            view.note(),
            view.log(),
            hidden,
            gr.Button(visible=view.succeeded and job.kind == pb.JOB_KIND_LLM),
            gr.Button(visible=view.succeeded and job.kind == pb.JOB_KIND_DIFFUSION),
            (KIND_NAMES.get(job.kind), job.base_model, job.adapter_name) if view.succeeded else None,
            resolved,
        )

    def cancel(job_id: str | None):
        if not job_id:
            raise gr.Error("Pick a job to cancel.", print_exception=False)
        with user_errors(finetune, "cancel_job"):
            job = clients.finetune.CancelJob(pb.CancelJobRequest(id=job_id), timeout=QUICK_CALL_S)
        gr.Info(f"Job {job.id} is {state_name(job.state)}.")

    gr.Markdown("Train a LoRA adapter on a dataset; when the job succeeds, the services serve it by name at once.")
    with gr.Row():
        with gr.Column(scale=3):
            with gr.Row():
                dataset = gr.Dropdown(
                    label="Dataset", choices=[], scale=4, allow_custom_value=True, elem_id="ft-dataset"
                )
                refresh_button = gr.Button("↻ Refresh", size="sm", scale=0, min_width=100, elem_id="ft-refresh")
            with gr.Accordion("Upload a dataset", open=False):
                dataset_file = gr.File(label=".jsonl (LLM) or .zip of images + captions", file_types=[".jsonl", ".zip"])
                dataset_name = gr.Textbox(label="Name", placeholder="defaults to the file name")
                upload_button = gr.Button("Upload")
            with gr.Row():
                kind = gr.Radio(list(KINDS), value="LLM", label="Kind", elem_id="ft-kind")
                base_model = gr.Dropdown(
                    label="Base model", choices=[], allow_custom_value=True, elem_id="ft-base-model"
                )
                adapter_name = gr.Textbox(label="Adapter name", elem_id="ft-adapter-name")
                method = gr.Dropdown(label="Method", choices=["lora"], value="lora", allow_custom_value=True)
            with gr.Accordion("Hyperparameters (0 or blank: the default for the model and data)", open=False):
                with gr.Row():
                    epochs = gr.Number(label="Epochs", value=0, precision=0, info="0: the model's default (3)")
                    max_steps = gr.Number(label="Max steps", value=0, precision=0, info="overrides epochs",
                                          elem_id="ft-max-steps")  # fmt: skip
                    learning_rate = gr.Number(label="Learning rate", value=0, info="0: 2e-4 (p-tuning 1e-2)")
                    batch_size = gr.Number(label="Batch size", value=0, precision=0, info="0: 4 (LLM), 1 (diffusion)")
                with gr.Row():
                    accumulation = gr.Number(label="Gradient accumulation", value=0, precision=0, info="0: 1")
                    lora_r = gr.Number(label="LoRA rank", value=0, precision=0, info="0: 16 (LLM), 8 (diffusion)")
                    lora_alpha = gr.Number(label="LoRA alpha", value=0, info="0: 2 × rank")
                    lora_dropout = gr.Number(label="LoRA dropout", value=0)
                with gr.Row():
                    target_modules = gr.Textbox(label="Target modules", placeholder="default for the model")
                    warmup_ratio = gr.Number(label="Warm-up ratio", value=0)
                    lr_scheduler = gr.Dropdown(["cosine", "linear", "constant"], value="cosine", label="LR schedule")
                    max_grad_norm = gr.Number(label="Max gradient norm", value=0, info="0: 1.0")
                with gr.Row():
                    mixed_precision = gr.Dropdown(
                        ["auto", "no", "bf16", "fp16"],
                        value="auto",
                        label="Mixed precision",
                        info="auto: bf16 where the worker computes it natively; fp16 needs CUDA",
                    )
                    validation_fraction = gr.Number(
                        label="Validation fraction", value=-1, info="-1: 0.1 with ≥ 20 records, else none"
                    )
                    patience = gr.Number(label="Early-stopping patience", value=0, precision=0, info="0: off")
                    seed = gr.Number(label="Seed", value=-1, precision=0, info="-1: drawn")
                with gr.Row():
                    max_seq_length = gr.Number(label="Max sequence length (LLM)", value=0, precision=0, info="0: 512")
                    resolution = gr.Number(label="Resolution (diffusion)", value=0, precision=0, info="0: the model's")
                    save_steps = gr.Number(label="Checkpoint every (steps)", value=0, precision=0)
                    eval_steps = gr.Number(label="Evaluate every (steps)", value=0, precision=0, info="0: each epoch")
                with gr.Row():
                    virtual_tokens = gr.Number(label="Virtual tokens (p-tuning)", value=0, precision=0, info="0: 20")
                    random_crop = gr.Checkbox(label="Random crop (diffusion)")
                    random_flip = gr.Checkbox(label="Random flip (diffusion)")
            create_button = gr.Button("Create job", variant="primary", elem_id="ft-create")
            created = gr.Markdown(elem_id="ft-created")
        with gr.Column(scale=4):
            job = gr.Dropdown(label="Job", choices=[], allow_custom_value=True, elem_id="ft-job")
            progress = gr.Markdown(elem_id="ft-progress")
            plot = gr.HTML(loss_svg([]), label="Loss", elem_id="ft-loss-plot")
            with gr.Row():
                cancel_button = gr.Button("Cancel job", variant="stop", visible=False, elem_id="ft-cancel")
                chat_button = gr.Button("Chat with this adapter", visible=False, elem_id="ft-use-in-chat")
                images_button = gr.Button("Make images with this adapter", visible=False, elem_id="ft-use-in-images")
            events = gr.Textbox(label="Events", lines=8, max_lines=8, interactive=False, elem_id="ft-events")
            resolved = gr.JSON(label="Resolved hyperparameters", open=False)
    table = gr.Dataframe(jobs_table([]), label="Jobs (newest first)", interactive=False, elem_id="ft-jobs")
    finished = gr.State(None)
    timer = gr.Timer(3.0, active=False)  # running while this tab is shown

    hyper_inputs = [
        method, epochs, max_steps, learning_rate, batch_size, accumulation, lora_r, lora_alpha, lora_dropout,
        target_modules, warmup_ratio, lr_scheduler, max_grad_norm, mixed_precision, validation_fraction, patience,
        seed, max_seq_length, resolution, save_steps, eval_steps, virtual_tokens, random_crop, random_flip,
    ]  # fmt: skip
    private = {"api_visibility": "private"}

    def refresh(selected_dataset, kind_name, model, current_method, job_id):
        return (
            list_datasets(selected_dataset, kind_name),
            *base_models(kind_name, model, current_method),
            *jobs_view(job_id),
        )

    loader = Loader(
        refresh,
        [dataset, kind, base_model, method, job],
        [dataset, base_model, method, target_modules, table, job],
    )
    refresh_button.click(loader.fn, loader.inputs, loader.outputs, **private)

    def kind_changed(kind_name, selected_dataset, model, current_method):
        return list_datasets(selected_dataset, kind_name), *base_models(kind_name, model, current_method)

    model_outputs = [base_model, method, target_modules]
    kind.change(kind_changed, [kind, dataset, base_model, method], [dataset, *model_outputs], **private)
    base_model.input(base_models, [kind, base_model, method], model_outputs, **private)
    upload_button.click(upload, [dataset_file, dataset_name], [kind, dataset, dataset_file], api_name="upload_dataset")
    job_form = [dataset, kind, base_model, adapter_name, *hyper_inputs]
    create_button.click(create_job, job_form, [created, table, job], api_name="create_job")
    timer.tick(jobs_on_tick, [job], [table, job], show_progress="hidden", **private)
    list_button = gr.Button("List jobs", visible=False)
    list_button.click(list_jobs, None, [table], api_name="list_jobs")
    table.select(_row_job_id, None, [job], **private)
    # One watcher per browser session: picking another job records it (`select`, at once), which ends the
    # running watcher; the new one then starts (trigger_mode "always_last" waits for the old one to end).
    watched: dict[str, str | None] = {}
    job.change(select, [job], None, queue=False, trigger_mode="multiple", **private).then(
        watch,
        [job],
        [plot, progress, events, cancel_button, chat_button, images_button, finished, resolved],
        concurrency_id="job-watchers",
        concurrency_limit=MAX_WATCHERS,
        trigger_mode="always_last",
        show_progress="hidden",
        **private,
    )

    cancel_button.click(cancel, [job], None, **private)
    return FinetuneTab(chat_button, images_button, finished, loader, timer, forget)


def _jobs_outputs(jobs, selected: str | None):
    """The jobs table and the job picker (keeping the picked job when it is still listed)."""
    choices = [(f"{j.adapter_name} · {state_name(j.state)} · {j.id}", j.id) for j in jobs]
    if selected in (j.id for j in jobs):
        return jobs_table(jobs), gr.Dropdown(choices=choices, value=selected)
    return jobs_table(jobs), gr.Dropdown(choices=choices)


def _row_job_id(event: gr.SelectData):
    """The id of the clicked row (the row's own values, so a sorted table picks the right job)."""
    return event.row_value[0] if event.row_value else gr.skip()


def _resolved(job: pb.Job) -> dict:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(job.hyperparameters, preserving_proto_field_name=True)
