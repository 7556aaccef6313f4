"""`modelworks jobs create|list|show|logs|watch|cancel`: LoRA fine-tune jobs."""

from __future__ import annotations

from modelworks.finetune.v1 import finetune_pb2
from modelworks_cli.adapters import KINDS
from modelworks_cli.options import command_options, count, seed_number
from modelworks_cli.output import enum_name, print_json, print_table, timestamp
from modelworks_cli.watch import follow, state_name

STATES = {state_name(v): v for v in finetune_pb2.JobState.values() if v}
# Flag -> Hyperparameters field, for the settings people change most; the rest take the service's defaults.
HYPERPARAMETERS = {
    "method": (str, "NAME"),
    "epochs": (count, "N"),
    "max_steps": (count, "N"),
    "learning_rate": (float, "LR"),
    "batch_size": (count, "N"),
    "lora_r": (count, "R"),
    "lora_alpha": (float, "ALPHA"),
    "max_seq_length": (count, "TOKENS"),
    "resolution": (count, "PIXELS"),
    "validation_fraction": (float, "FRACTION"),
    "test_fraction": (float, "FRACTION"),
    "seed": (seed_number, "SEED"),
    "quantization": (str, "none|bnb-nf4|bnb-int8"),
    "optimizer": (str, "adamw|adamw_8bit|paged_adamw_8bit"),
    "class_prompt": (str, "PROMPT"),
    "num_class_images": (count, "N"),
    "prior_loss_weight": (float, "WEIGHT"),
    "guidance_scale": (float, "SCALE"),
}


def register(commands) -> None:
    jobs = commands.add_parser("jobs", help="fine-tune jobs").add_subparsers(dest="action", required=True)
    create = jobs.add_parser("create", parents=[command_options()], help="queue a LoRA fine-tune job")
    create.add_argument("--base-model", required=True, help="a model from the fine-tune service's base models")
    create.add_argument("--dataset", required=True, help="a dataset id from `datasets list`")
    create.add_argument("--adapter-name", required=True, help="the name the trained adapter is served by")
    create.add_argument("--kind", choices=sorted(KINDS), default="llm", help="default llm")
    create.add_argument("--validation-dataset", default="", help="a JSONL dataset id to validate on (LLM)")
    for name, (parse, metavar) in HYPERPARAMETERS.items():
        flag = name.replace("_", "-")
        create.add_argument(f"--{flag}", type=parse, default=None, metavar=metavar, help="default: the service's")
    create.add_argument("--target-modules", default="", help="comma-separated module names LoRA adapts")
    create.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute activations: less memory, slower steps"
    )
    create.add_argument(
        "--square-crop", action="store_true", help="diffusion: one square crop instead of aspect-ratio buckets"
    )
    create.add_argument("--watch", action="store_true", help="follow it with a progress bar until it ends")
    create.set_defaults(run=create_job)

    listing = jobs.add_parser("list", parents=[command_options()], help="jobs, newest first")
    listing.add_argument("--state", choices=sorted(STATES), help="only jobs in this state")
    listing.add_argument("--limit", type=count, default=0, help="at most this many (default 100)")
    listing.set_defaults(run=list_jobs)
    for name, run, text in [
        ("show", show_job, "a job's settings and progress"),
        ("logs", job_logs, "a job's events, oldest first"),
        ("watch", watch_job, "follow a job until it ends (Ctrl-C detaches)"),
        ("cancel", cancel_job, "cancel a queued or running job"),
    ]:
        command = jobs.add_parser(name, parents=[command_options()], help=text)
        command.add_argument("id")
        command.set_defaults(run=run)


def job_request(args) -> finetune_pb2.CreateJobRequest:
    modules = [name.strip() for name in args.target_modules.split(",") if name.strip()]
    hyperparameters = finetune_pb2.Hyperparameters(
        target_modules=modules, gradient_checkpointing=args.gradient_checkpointing
    )
    if args.square_crop:
        hyperparameters.aspect_buckets = False
    for name in HYPERPARAMETERS:
        if getattr(args, name) is not None:
            setattr(hyperparameters, name, getattr(args, name))
    return finetune_pb2.CreateJobRequest(
        kind=KINDS[args.kind],
        base_model=args.base_model,
        dataset_id=args.dataset,
        adapter_name=args.adapter_name,
        validation_dataset_id=args.validation_dataset,
        hyperparameters=hyperparameters,
    )


def create_job(args, clients) -> int:
    job = clients.finetune.CreateJob(job_request(args))
    if args.json and not args.watch:
        print_json(job)
    elif not args.json:
        print(f"queued job {job.id}: adapter {job.adapter_name}, {job.total_steps or '?'} steps")
    return follow(clients, job.id, args.json) if args.watch else 0


def job_row(job: finetune_pb2.Job) -> tuple:
    return (
        job.id,
        state_name(job.state),
        f"{job.step}/{job.total_steps}",
        job.base_model,
        job.adapter_name,
        f"{job.train_loss:.4g}" if job.step else "-",
        timestamp(job.created_at),
    )


def list_jobs(args, clients) -> int:
    req = finetune_pb2.ListJobsRequest(state=STATES.get(args.state, 0), limit=args.limit)
    jobs = clients.finetune.ListJobs(req).jobs
    if args.json:
        print_json(list(jobs))
    else:
        print_table(["ID", "STATE", "STEP", "BASE MODEL", "ADAPTER", "LOSS", "CREATED"], [job_row(j) for j in jobs])
    return 0


def show_job(args, clients) -> int:
    job = clients.finetune.GetJob(finetune_pb2.GetJobRequest(id=args.id))
    if args.json:
        print_json(job)
        return 0
    print_table(["ID", "STATE", "STEP", "BASE MODEL", "ADAPTER", "LOSS", "CREATED"], [job_row(job)])
    print(f"dataset: {job.dataset_id}  kind: {enum_name(finetune_pb2.JobKind.Name(job.kind), 'JOB_KIND_')}")
    if job.val_loss:
        print(f"val loss: {job.val_loss:.4g}")
    if job.test_loss:
        perplexity = f" (perplexity {job.test_perplexity:.4g})" if job.test_perplexity else ""
        print(f"test loss: {job.test_loss:.4g}{perplexity}")
    if job.eta_seconds and job.state == finetune_pb2.JOB_STATE_RUNNING:
        print(f"eta: {job.eta_seconds:.0f} s")
    if job.error:
        print(f"error: {job.error}")
    hyper = job.hyperparameters
    print("hyperparameters: " + ", ".join(f"{f.name}={v}" for f, v in hyper.ListFields()))
    return 0


def job_events(clients, job_id: str) -> list[finetune_pb2.JobEvent]:
    """All stored events, oldest first (the service pages them newest first)."""
    events, before = [], ""
    while True:
        page = clients.finetune.ListJobEvents(finetune_pb2.ListJobEventsRequest(id=job_id, limit=1000, before=before))
        events.extend(page.events)
        if not page.has_more or not page.events:
            return events[::-1]
        before = page.events[-1].event_id


def job_logs(args, clients) -> int:
    events = job_events(clients, args.id)
    if args.json:
        print_json(events)
        return 0
    for event in events:
        detail = event.message or (f"step {event.step}/{event.total_steps} loss {event.train_loss:.4g}")
        if event.type == "eval":
            detail = f"step {event.step} val loss {event.val_loss:.4g}"
        print(f"{timestamp(event.time)}  {event.type:<10}  {state_name(event.state):<9}  {detail}")
    return 0


def watch_job(args, clients) -> int:
    return follow(clients, args.id, args.json)


def cancel_job(args, clients) -> int:
    job = clients.finetune.CancelJob(finetune_pb2.CancelJobRequest(id=args.id))
    if args.json:
        print_json(job)
    else:
        print(f"job {job.id} {state_name(job.state)}")
    return 0
