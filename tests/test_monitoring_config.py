"""The compose `monitoring` profile: Prometheus scrapes every service, and the dashboard asks only for metrics
that our code exports (a renamed metric fails here, not as an empty panel)."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess

import pytest
import yaml

from tests.harness import REPO_ROOT

MONITORING = REPO_ROOT / "docker" / "monitoring"
PROMETHEUS_CONFIG = MONITORING / "prometheus.yml"
GRAFANA = MONITORING / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "modelworks.json"

# Compose service -> metrics port (docker-compose.yml); the scrape job is named after the service.
SCRAPED = {"llm": 9101, "diffusion": 9102, "finetune": 9103, "worker": 9104, "gateway": 9105, "openai": 9106}

# Every module that defines metrics on the default registry.
METRIC_MODULES = [
    "shared.metrics",
    "services.llm.metrics",
    "services.diffusion.metrics",
    "services.finetune.metrics",
    "services.gateway.metrics",
    "services.openai.metrics",
]

METRIC_NAME = re.compile(r"\bmodelworks_[A-Za-z0-9_]+")


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not on PATH (it comes with Prometheus, e.g. apt-get install prometheus)")
    return path


def exported_series() -> set[str]:
    """The series names our metric objects expose on /metrics, suffixes included."""
    from prometheus_client import REGISTRY

    for module in METRIC_MODULES:
        importlib.import_module(module)
    suffixes = {
        "counter": ["_total", "_created"],
        "histogram": ["_bucket", "_sum", "_count", "_created"],
        "summary": ["", "_sum", "_count", "_created"],
        "info": ["_info"],
    }
    # a family with labels but no children yet has no samples, so the names come from its type
    return {
        family.name + suffix
        for family in REGISTRY.collect()
        if family.name.startswith("modelworks_")
        for suffix in suffixes.get(family.type, [""])
    }


def all_strings(node):
    if isinstance(node, dict):
        for value in node.values():
            yield from all_strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from all_strings(value)
    elif isinstance(node, str):
        yield node


def all_dicts(node):
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from all_dicts(value)
    elif isinstance(node, list):
        for value in node:
            yield from all_dicts(value)


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_promtool_accepts_the_prometheus_config():
    result = subprocess.run(
        [promtool(), "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_service_is_scraped_through_dns_so_every_replica_is():
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == set(SCRAPED)
    for name, port in SCRAPED.items():
        assert "static_configs" not in jobs[name], f"{name}: a static target reaches one replica only"
        (lookup,) = jobs[name]["dns_sd_configs"]
        assert (lookup["names"], lookup["type"], lookup["port"]) == ([name], "A", port), name


def test_each_job_is_a_compose_service_serving_metrics_on_its_port():
    services = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]
    for name, port in SCRAPED.items():
        assert name in services, f"docker-compose.yml has no service {name!r} for Prometheus to resolve"
        command = services[name]["command"]
        assert command[command.index("--metrics-port") + 1] == str(port), name


def test_the_scraped_ports_are_the_services_defaults():
    from services.gateway.config import GatewayConfig
    from shared.settings import DiffusionSettings, FinetuneSettings, LLMSettings, OpenAISettings

    def default(model, field: str) -> int:
        return model.model_fields[field].default

    defaults = {
        "llm": default(LLMSettings, "metrics_port"),
        "diffusion": default(DiffusionSettings, "metrics_port"),
        "finetune": default(FinetuneSettings, "metrics_port"),
        "worker": default(FinetuneSettings, "worker_metrics_port"),
        "gateway": default(GatewayConfig, "metrics_port"),
        "openai": OpenAISettings().metrics_port,
    }
    assert defaults == SCRAPED


def test_the_dashboard_uses_only_metrics_our_code_exports(dashboard):
    used = {name for text in all_strings(dashboard) for name in METRIC_NAME.findall(text)}
    assert len(used) >= 20, f"found only {sorted(used)}: did the metric prefix change?"
    exported = exported_series()
    missing = sorted(used - exported)
    assert not missing, f"the dashboard asks for series no module exports: {missing}"


def test_the_dashboard_queries_parse_as_promql(dashboard, tmp_path):
    exprs = [d["expr"] for d in all_dicts(dashboard) if "expr" in d]
    assert exprs
    # Grafana substitutes these before the query reaches Prometheus
    rules = [
        {
            "record": f"dashboard:query_{i}",
            "expr": re.sub(r"\$\w+", ".*", re.sub(r"\$__(rate_interval|interval|range)", "1m", expr)),
        }
        for i, expr in enumerate(exprs)
    ]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_dashboard_reads_the_provisioned_datasource(dashboard):
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert (source["uid"], source["url"], source["isDefault"]) == ("prometheus", "http://prometheus:9090", True)
    refs = [d["datasource"] for d in all_dicts(dashboard) if "datasource" in d]
    assert refs
    assert all(ref == {"type": "prometheus", "uid": source["uid"]} for ref in refs)

    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "modelworks.yml").read_text())
    (provider,) = providers["providers"]
    assert (provider["type"], provider["options"]["path"]) == ("file", "/var/lib/grafana/dashboards")


def test_the_model_variable_filters_the_per_model_panels(dashboard):
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"model", "diffusion_model"} <= variables
    exprs = [d["expr"] for d in all_dicts(dashboard) if "expr" in d]
    for expr in exprs:
        if "modelworks_llm_" in expr:
            assert 'model=~"$model"' in expr, expr
        if "modelworks_diffusion_" in expr:
            assert 'model=~"$diffusion_model"' in expr, expr


def test_the_dashboard_shows_the_openai_apis_requests_by_status_and_its_open_streams(dashboard):
    rows = [panel["title"] for panel in dashboard["panels"] if panel["type"] == "row"]
    assert "OpenAI API" in rows, rows
    exprs = [d["expr"] for d in all_dicts(dashboard) if "expr" in d]
    assert any("modelworks_openai_requests_total" in e and "by (status)" in e for e in exprs), exprs
    assert any("modelworks_openai_streams_open" in e for e in exprs), exprs


def test_the_dashboards_panels_have_unique_ids_and_do_not_overlap(dashboard):
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), sorted(ids)
    cells = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]
