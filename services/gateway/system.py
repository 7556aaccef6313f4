"""The System tab: is each service up, what it has loaded, how busy it is, and where its metrics are."""

from __future__ import annotations

import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import gradio as gr
import grpc
import pandas as pd
from prometheus_client.parser import text_string_to_metric_families

from modelworks.diffusion.v1 import diffusion_pb2
from modelworks.finetune.v1 import finetune_pb2 as ft
from modelworks.llm.v1 import llm_pb2
from services.gateway.clients import QUICK_CALL_S, ServiceClients
from services.gateway.errors import describe
from services.gateway.loading import Loader

SCRAPE_S = 2.0
# gauges worth a glance, by metrics URL field: (metric, what it means)
LOAD_GAUGES = {
    "llm_metrics_url": [
        ("modelworks_llm_num_requests_waiting", "LLM requests waiting"),
        ("modelworks_llm_num_requests_running", "LLM requests running"),
    ],
    "diffusion_metrics_url": [("modelworks_diffusion_num_requests_waiting", "image requests waiting")],
}


def scrape_gauges(url: str, wanted: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Sum each wanted gauge over its labels from a Prometheus endpoint; "n/a" where it cannot be read."""
    try:
        with urllib.request.urlopen(url, timeout=SCRAPE_S) as reply:  # an operator-set http URL
            text = reply.read().decode()
    except OSError:
        return [(label, "n/a") for _, label in wanted]
    totals = {name: 0.0 for name, _ in wanted}
    for family in text_string_to_metric_families(text):
        if family.name in totals:
            totals[family.name] = sum(sample.value for sample in family.samples)
    return [(label, f"{totals[name]:.0f}") for name, label in wanted]


def _models(clients: ServiceClients) -> dict[str, str]:
    """Loaded models per service, the LLM service's embedding models named as such ("—" where the service does
    not answer: the health column says why)."""
    out = {}
    try:
        listed = clients.llm.ListModels(llm_pb2.ListModelsRequest(), timeout=QUICK_CALL_S).models
        out["LLM"] = _listing(m for m in listed if m.kind == "llm")
        embedders = [m for m in listed if m.kind == "embedding"]
        if embedders:
            out["LLM"] += f"; embedding: {_listing(embedders)}"
    except grpc.RpcError:
        out["LLM"] = "—"
    try:
        out["diffusion"] = _listing(
            clients.diffusion.ListModels(diffusion_pb2.ListModelsRequest(), timeout=QUICK_CALL_S).models
        )
    except grpc.RpcError:
        out["diffusion"] = "—"
    return out


def _listing(models) -> str:
    return ", ".join(f"{m.name} ({_held(m)})" for m in models) or "none"


def _held(model) -> str:
    """Where and how a model's weights are held: device, dtype, and a quantization and their size if known."""
    parts = [model.device, model.dtype]
    quantization = getattr(model, "quantization", "")  # LLM and embedding models
    if quantization and quantization != "none":
        parts.append(quantization)
    if getattr(model, "weight_bytes", 0):
        parts.append(f"{model.weight_bytes / 2**20:,.0f} MiB")
    return ", ".join(p for p in parts if p)


def services_table(clients: ServiceClients) -> pd.DataFrame:
    with ThreadPoolExecutor(len(clients.services)) as pool:
        health = dict(zip(clients.services, pool.map(lambda s: s.health(), clients.services), strict=True))
    models = _models(clients)
    config = clients.config
    metrics = {"LLM": config.llm_metrics_url, "diffusion": config.diffusion_metrics_url,
               "fine-tune": config.finetune_metrics_url}  # fmt: skip
    rows = [
        [s.label, s.target, health[s], models.get(s.label, "—"), f"[{metrics[s.label]}]({metrics[s.label]})"]
        for s in clients.services
    ]
    return pd.DataFrame(rows, columns=["service", "address", "health", "models", "metrics"])


def load_table(clients: ServiceClients) -> pd.DataFrame:
    rows = []
    for field, gauges in LOAD_GAUGES.items():
        rows.extend(scrape_gauges(getattr(clients.config, field), gauges))
    try:
        for state in (ft.JOB_STATE_QUEUED, ft.JOB_STATE_RUNNING):
            jobs = clients.finetune.ListJobs(ft.ListJobsRequest(state=state, limit=1000), timeout=QUICK_CALL_S).jobs
            state_name = ft.JobState.Name(state).removeprefix("JOB_STATE_").lower()
            rows.append((f"fine-tune jobs {state_name}", str(len(jobs))))
    except grpc.RpcError as error:
        rows.append(("fine-tune jobs", describe(clients.finetune_service, error)))
    return pd.DataFrame(rows, columns=["what", "now"])


def adapters_table(clients: ServiceClients) -> pd.DataFrame:
    try:
        adapters = clients.finetune.ListAdapters(ft.ListAdaptersRequest(), timeout=QUICK_CALL_S).adapters
    except grpc.RpcError as error:
        return pd.DataFrame([[describe(clients.finetune_service, error), "", "", ""]],
                            columns=["adapter", "kind", "base model", "method"])  # fmt: skip
    rows = [
        [a.name, ft.JobKind.Name(a.kind).removeprefix("JOB_KIND_").lower(), a.base_model, a.method] for a in adapters
    ]
    return pd.DataFrame(rows, columns=["adapter", "kind", "base model", "method"])


@dataclass
class SystemTab:
    loader: Loader
    timer: gr.Timer  # refreshes the tables while the tab is shown


def build_system_tab(clients: ServiceClients) -> SystemTab:
    def snapshot():
        return services_table(clients), load_table(clients), adapters_table(clients)

    refresh = gr.Button("↻ Refresh", size="sm", scale=0, min_width=100, elem_id="system-refresh")
    services = gr.Dataframe(label="Services", datatype=["str", "str", "str", "str", "markdown"],
                            interactive=False, elem_id="system-services")  # fmt: skip
    load = gr.Dataframe(label="Load", interactive=False, elem_id="system-load")
    adapters = gr.Dataframe(label="Adapters", interactive=False, elem_id="system-adapters")
    worker = clients.config.worker_metrics_url
    gr.Markdown(f"Fine-tune workers export their metrics at [{worker}]({worker}) (one port per worker host).")
    refresh.click(snapshot, None, [services, load, adapters], api_name="system_status")
    timer = gr.Timer(10.0, active=False)
    timer.tick(snapshot, None, [services, load, adapters], show_progress="hidden", api_visibility="private")
    return SystemTab(Loader(snapshot, [], [services, load, adapters]), timer)
