"""What the Fine-tune tab shows of its jobs (pure functions of what the service sent, no I/O).

The jobs table and the job picker are drawn from one `ListJobs` answer, and when a job changes state the
watcher takes the job's header from that same answer, so the three never disagree about a state.
`JobView` is one job built up from its events: `WatchJob` replays a job's history before following it, and
a watcher that reconnects gets the history again; so losses are kept by (series, step) and log lines by
event id, and a replay changes nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pandas as pd

from modelworks.finetune.v1 import finetune_pb2 as pb
from services.gateway.lossplot import loss_svg

LOG_LINES = 200
KIND_NAMES = {pb.JOB_KIND_LLM: "LLM", pb.JOB_KIND_DIFFUSION: "Diffusion"}
JOB_COLUMNS = ["id", "adapter", "kind", "base model", "state", "step", "train loss", "val loss", "test loss", "ETA",
               "created"]  # fmt: skip


def state_name(state: int) -> str:
    return pb.JobState.Name(state).removeprefix("JOB_STATE_").lower()


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
            f"{job.test_loss:.4f}" if job.test_loss else "",
            f"{job.eta_seconds:.0f} s" if job.state == pb.JOB_STATE_RUNNING and job.eta_seconds else "",
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.created_at)),
        ]
        for job in jobs
    ]
    return pd.DataFrame(rows, columns=JOB_COLUMNS)


def job_choices(jobs) -> list[tuple[str, str]]:
    """The job picker's (label, id) pairs: the adapter, the state and the id, as the table shows them."""
    return [(f"{job.adapter_name} · {state_name(job.state)} · {job.id}", job.id) for job in jobs]


def event_line(event: pb.JobEvent) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(event.time)) if event.time else "--:--:--"
    text = event.message or (state_name(event.state) if event.type == "state" else "")
    return f"{stamp}  {event.type:<10} {text}".rstrip()


@dataclass
class JobView:
    job: pb.Job
    losses: dict[tuple[str, int], float] = field(default_factory=dict)
    lines: dict[str, str] = field(default_factory=dict)  # event id -> line, in arrival order
    reconnecting: bool = False

    def __post_init__(self) -> None:
        self.state, self.step, self.total, self.eta = (
            self.job.state, self.job.step, self.job.total_steps, self.job.eta_seconds
        )  # fmt: skip

    def apply(self, event: pb.JobEvent) -> None:
        self.reconnecting = False
        self.step, self.total = max(self.step, event.step), event.total_steps or self.total
        if event.type == "progress":
            self.losses[("train", event.step)] = event.train_loss
            self.eta = event.eta_seconds
        elif event.type == "eval":
            self.losses[("validation", event.step)] = event.val_loss
        else:
            self.lines.setdefault(event.event_id or str(len(self.lines)), event_line(event))
        if event.type == "state" and event.state:
            self.state = event.state

    def sync(self, job: pb.Job) -> None:
        """Take the job's record as `ListJobs` or `GetJob` gave it (after a state change, or once its events
        have ended), so the header says what the table and the picker say."""
        self.job, self.state, self.total = job, job.state, job.total_steps or self.total
        self.step = max(self.step, job.step)
        if not self.active:
            self.eta = 0.0

    @property
    def active(self) -> bool:
        return self.state in (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING)

    @property
    def succeeded(self) -> bool:
        return self.state == pb.JOB_STATE_SUCCEEDED

    def plot(self, log_scale: bool = False) -> str:
        points = sorted(((step, loss, series) for (series, step), loss in self.losses.items()), key=lambda p: p[0])
        return loss_svg(points, self.total, log_scale)

    def log(self) -> str:
        return "\n".join(list(self.lines.values())[-LOG_LINES:])

    def note(self) -> str:
        job = self.job
        parts = [f"**{job.adapter_name}** on {job.base_model} · {state_name(self.state)}"]
        if self.total:
            parts.append(f"step {self.step} of {self.total} ({100 * self.step / self.total:.0f}%)")
        if self.state == pb.JOB_STATE_RUNNING and self.eta:
            parts.append(f"about {self.eta:.0f} s left")
        if self.state == pb.JOB_STATE_FAILED and job.error:
            parts.append(f"error: {job.error}")
        if self.reconnecting:
            parts.append("the fine-tune service is not answering; reconnecting…")
        return " · ".join(parts)
