"""Following a fine-tune job: a bar over its steps with loss, val loss and ETA; Ctrl-C detaches, never cancels."""

from __future__ import annotations

import json
import sys

from tqdm import tqdm

from modelworks.finetune.v1 import finetune_pb2
from modelworks_cli.output import as_dict, enum_name

ENDED = {finetune_pb2.JOB_STATE_SUCCEEDED, finetune_pb2.JOB_STATE_FAILED, finetune_pb2.JOB_STATE_CANCELLED}


def state_name(state: int) -> str:
    return enum_name(finetune_pb2.JobState.Name(state), "JOB_STATE_")


class JobBar:
    """The job's events drawn as a tqdm bar; states, warnings and logs printed above it."""

    def __init__(self, job_id: str):
        self.job_id = job_id
        self.bar: tqdm | None = None
        self.postfix: dict[str, str] = {}

    def show(self, event: finetune_pb2.JobEvent) -> None:
        if event.total_steps and self.bar is None:
            self.bar = tqdm(total=event.total_steps, unit="step", desc=self.job_id, file=sys.stderr, dynamic_ncols=True)
        if self.bar is not None and event.step > self.bar.n:
            self.bar.update(event.step - self.bar.n)
        if event.type == "progress":
            self.postfix["loss"] = f"{event.train_loss:.4g}"
            if event.eta_seconds:  # the worker's estimate: it knows the steps' cost better than the bar's rate
                self.postfix["eta"] = f"{event.eta_seconds:.0f}s"
            else:
                self.postfix.pop("eta", None)
        elif event.type == "eval":
            self.postfix["val_loss"] = f"{event.val_loss:.4g}"
        if self.bar is not None and self.postfix:
            self.bar.set_postfix(self.postfix, refresh=False)
            self.bar.refresh()
        if event.type in ("state", "warning", "log", "checkpoint") and event.message:
            label = state_name(event.state) if event.type == "state" else event.type
            line = f"[{label}] {event.message}"
            if self.bar is not None:
                self.bar.write(line, file=sys.stderr)  # above the bar, which tqdm redraws
            else:
                _write(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _write(line: str) -> None:
    print(line, file=sys.stderr)


def follow(clients, job_id: str, as_json: bool) -> int:
    """Watch until the job ends: 0 when it succeeded, 1 when it failed or was cancelled, 130 on Ctrl-C."""
    bar = None if as_json else JobBar(job_id)
    try:
        for event in clients.finetune.WatchJob(finetune_pb2.WatchJobRequest(id=job_id)):
            if as_json:
                print_event(event)
            else:
                bar.show(event)
            if event.type == "state" and event.state in ENDED:
                break
    except KeyboardInterrupt:
        _write(f"\ndetached; job {job_id} keeps running. Re-attach with: modelworks jobs watch {job_id}")
        return 130
    finally:
        if bar is not None:
            bar.close()
    return finish(clients, job_id, as_json)


def print_event(event: finetune_pb2.JobEvent) -> None:
    print(json.dumps(as_dict(event)), flush=True)


def finish(clients, job_id: str, as_json: bool) -> int:
    """Say how the job ended (its adapter, or its error)."""
    job = clients.finetune.GetJob(finetune_pb2.GetJobRequest(id=job_id))
    if not as_json:
        ended = f"job {job.id} {state_name(job.state)}"
        if job.state == finetune_pb2.JOB_STATE_SUCCEEDED:
            ended += f": adapter {job.adapter_name} (train loss {job.train_loss:.4g}"
            ended += f", val loss {job.val_loss:.4g})" if job.val_loss else ")"
        elif job.error:
            ended += f": {job.error}"
        print(ended)
    return 0 if job.state == finetune_pb2.JOB_STATE_SUCCEEDED else 1
