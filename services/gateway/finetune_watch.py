"""Following the picked job on the Fine-tune tab: its loss plot, header, events and buttons, live.

A job is followed with `WatchJob`, which replays the job's events and then streams new ones, so the plot is
whole even when the page is opened mid-run. Each time the job changes state (and when it ends) the watcher
asks `ListJobs` once and draws the jobs table, the job picker and the header from that one answer, so they
agree; a timer tick that fetched the list before that answer came does not overwrite it.

One watcher runs per browser session: picking another job records it at once (`pick`), which ends the
running watcher; the new one starts when it has ended. The session's record also keeps the job's view, so
the log-scale box can redraw the plot of a job that has ended.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import gradio as gr
import grpc
from google.protobuf.json_format import MessageToDict

from modelworks.finetune.v1 import finetune_pb2 as pb
from services.gateway.clients import QUICK_CALL_S, ServiceClients
from services.gateway.errors import user_errors
from services.gateway.finetune_layout import FinetuneLayout
from services.gateway.jobview import KIND_NAMES, JobView, job_choices, jobs_table
from services.gateway.lossplot import loss_svg
from services.gateway.streams import follow

REDRAW_S = 0.5  # the watcher sends the browser at most this often while events pour in
RECONNECT_S = 2.0
RECONNECTING = object()
LIST_LIMIT = 100


@dataclass
class _Session:
    """What one browser session is following."""

    job_id: str | None = None
    view: JobView | None = None
    log_scale: bool = False
    listed_at: float = 0.0  # when the watcher last began to fetch the job list (time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)  # the watcher updates `view` as it is drawn


class JobWatcher:
    """The Fine-tune tab's event functions for the jobs list and the picked job."""

    def __init__(self, clients: ServiceClients, layout: FinetuneLayout):
        self.clients, self.layout = clients, layout
        self._sessions: dict[str, _Session] = {}

    def newest_jobs(self) -> list[pb.Job]:
        return list(self.clients.finetune.ListJobs(pb.ListJobsRequest(limit=LIST_LIMIT), timeout=QUICK_CALL_S).jobs)

    def listing(self, jobs: list[pb.Job], selected: str | None) -> tuple:
        """The jobs table and the job picker (keeping the picked job while it is listed)."""
        choices = job_choices(jobs)
        if selected in (j.id for j in jobs):
            return jobs_table(jobs), gr.Dropdown(choices=choices, value=selected)
        return jobs_table(jobs), gr.Dropdown(choices=choices)

    def tick(self, selected: str | None, request: gr.Request):
        """The periodic refresh of the table and picker: quiet when the service is down (↻ says why)."""
        started = time.monotonic()
        try:
            jobs = self.newest_jobs()
        except grpc.RpcError:
            return gr.skip()
        if self._session(request).listed_at > started:
            return gr.skip()  # the watcher fetched a newer list meanwhile, and has drawn it
        return self.listing(jobs, selected)

    def pick(self, job_id: str | None, request: gr.Request) -> None:
        """Record the session's chosen job: a running watcher of another job sees it and ends."""
        self._session(request).job_id = job_id

    def forget(self, request: gr.Request) -> None:
        self._sessions.pop(request.session_hash, None)

    def redraw(self, log_scale: bool, request: gr.Request) -> str:
        session = self._session(request)
        session.log_scale = bool(log_scale)
        with session.lock:
            return session.view.plot(session.log_scale) if session.view else loss_svg([], log_scale=session.log_scale)

    def watch(self, job_id: str | None, request: gr.Request):
        """Follow one job until it ends or another job is picked in this session (`pick` always runs first)."""
        ui, session = self.layout, self._session(request)
        hidden = gr.Button(visible=False)
        start = {ui.use_in_chat: hidden, ui.use_in_images: hidden, ui.finished: None}
        if not job_id:
            session.view = None
            yield {**start, ui.plot: loss_svg([], log_scale=session.log_scale), ui.progress: "", ui.events: "",
                   ui.cancel: hidden, ui.resolved: None}  # fmt: skip
            return
        with user_errors(self.clients.finetune_service, "watch_job"):
            view = JobView(self.clients.finetune.GetJob(pb.GetJobRequest(id=job_id), timeout=QUICK_CALL_S))
            with session.lock:
                session.view = view
            yield {**start, **self._shown(session), ui.resolved: gr.JSON(value=_resolved(view.job))}
            drawn = 0.0
            for event in self._events(job_id):
                if not self._following(request, job_id):
                    return  # another job was picked: its watcher starts when this one has ended
                if event is None:
                    yield gr.skip()  # nothing new; lets Gradio close this generator at once
                    continue
                if event is RECONNECTING:
                    view.reconnecting = True
                    yield {ui.progress: view.note()}
                    continue
                with session.lock:
                    view.apply(event)
                if event.type == "state":
                    yield {**self._listed(session), **self._shown(session)}
                elif time.monotonic() - drawn >= REDRAW_S:
                    yield self._shown(session)
                else:
                    continue
                drawn = time.monotonic()
            listed = self._listed(session, ended=True)
        yield {**listed, **self._shown(session), **self._finished(view)}

    def _session(self, request: gr.Request) -> _Session:
        return self._sessions.setdefault(request.session_hash, _Session())

    def _following(self, request: gr.Request, job_id: str) -> bool:
        session = self._sessions.get(request.session_hash)
        return session is not None and session.job_id == job_id

    def _events(self, job_id: str) -> Iterator[pb.JobEvent | object | None]:
        """The job's events (None while none come), re-following after the fine-tune API restarts (marked by
        `RECONNECTING`): the replay it sends then is absorbed by `JobView`."""
        while True:
            try:
                yield from follow(self.clients.finetune.WatchJob(pb.WatchJobRequest(id=job_id)))
                return
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
            yield RECONNECTING
            time.sleep(RECONNECT_S)

    def _listed(self, session: _Session, ended: bool = False) -> dict:
        """The table and picker from one `ListJobs` answer, the job's header synced to the same answer. Where
        the list cannot be had, a job that ended is read with `GetJob` (raising a readable error)."""
        view = session.view
        session.listed_at = time.monotonic()
        try:
            jobs = self.newest_jobs()
        except grpc.RpcError:
            if ended:
                view.sync(self.clients.finetune.GetJob(pb.GetJobRequest(id=view.job.id), timeout=QUICK_CALL_S))
            return {}
        job = next((j for j in jobs if j.id == view.job.id), None)
        if job is None and ended:  # older than the list's newest
            job = self.clients.finetune.GetJob(pb.GetJobRequest(id=view.job.id), timeout=QUICK_CALL_S)
        if job is not None:
            with session.lock:
                view.sync(job)
        table, picker = self.listing(jobs, view.job.id)
        return {self.layout.table: table, self.layout.job: picker}

    def _shown(self, session: _Session) -> dict:
        ui, view = self.layout, session.view
        with session.lock:
            plot = view.plot(session.log_scale)
        return {
            ui.plot: plot,
            ui.progress: view.note(),
            ui.events: view.log(),
            ui.cancel: gr.Button(visible=view.active),
        }

    def _finished(self, view: JobView) -> dict:
        """The buttons that hand a succeeded job's adapter to Chat or Images, or export an LLM's."""
        job, ui = view.job, self.layout
        return {
            ui.use_in_chat: gr.Button(visible=view.succeeded and job.kind == pb.JOB_KIND_LLM),
            ui.use_in_images: gr.Button(visible=view.succeeded and job.kind == pb.JOB_KIND_DIFFUSION),
            ui.export_choice: gr.Dropdown(visible=view.succeeded and job.kind == pb.JOB_KIND_LLM),
            ui.export: gr.Button(visible=view.succeeded and job.kind == pb.JOB_KIND_LLM),
            ui.finished: (KIND_NAMES.get(job.kind), job.base_model, job.adapter_name) if view.succeeded else None,
        }

    @property
    def outputs(self) -> list:
        ui = self.layout
        return [ui.plot, ui.progress, ui.events, ui.cancel, ui.use_in_chat, ui.use_in_images, ui.export_choice,
                ui.export, ui.finished, ui.resolved, ui.table, ui.job]  # fmt: skip


def _resolved(job: pb.Job) -> dict:
    return MessageToDict(job.hyperparameters, preserving_proto_field_name=True)
