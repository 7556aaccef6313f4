"""The compose files as compose itself reads them: the GPU default and the CPU override.

Runs `docker compose config` (or Debian's `docker-compose config`); skips, saying why, where neither is
installed. `make test-compose` runs the stack itself.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from tests.harness import REPO_ROOT

GPU_SERVICES = {"llm": "0", "diffusion": "1", "worker": "2"}
MODELWORKS_SERVICES = ["secrets", "redis", "models", "llm", "diffusion", "finetune", "worker", "gateway", "openai"]
# The gRPC clients of the three services (no GPU, no torch, no Redis): the web app and the OpenAI API.
CLIENT_SERVICES = ["gateway", "openai"]


def compose_config(*files: str, env: dict | None = None) -> dict:
    if shutil.which("docker-compose"):
        command = ["docker-compose"]
    elif (
        shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    ):
        command = ["docker", "compose"]
    else:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed (apt-get install docker-compose)")
    args = [a for f in files for a in ("-f", f)]
    result = subprocess.run(
        [*command, *args, "config"], cwd=REPO_ROOT, capture_output=True, text=True, env=env or {"PATH": "/usr/bin:/bin"}
    )
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)["services"]


def gpu_devices(service: dict) -> list[dict]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def published(service: dict) -> dict[int, str]:
    """Container port -> the host address compose publishes it on."""
    ports = {}
    for port in service.get("ports", []):
        if isinstance(port, dict):
            ports[int(port["target"])] = str(port.get("host_ip", ""))
        else:  # "host_ip:host_port:container_port[/proto]"
            host_ip, _, target = str(port).split("/")[0].rsplit(":", 2)
            ports[int(target)] = host_ip
    return ports


def opened_on(service: dict, container_port: int) -> str:
    """The host address a container port is published on."""
    ports = published(service)
    assert container_port in ports, f"port {container_port} is not published: {service['ports']}"
    return ports[container_port]


def test_the_gpu_default_gives_each_gpu_service_its_own_gpu_and_requires_it():
    services = compose_config()  # docker-compose.yml + docker-compose.override.yml, as `up` reads them
    for name, device in GPU_SERVICES.items():
        (reservation,) = gpu_devices(services[name])
        assert reservation["driver"] == "nvidia" and reservation["device_ids"] == [device], reservation
        assert services[name]["environment"]["MODELWORKS_REQUIRE_GPU"] == "true"
    for name in set(MODELWORKS_SERVICES) - set(GPU_SERVICES):
        assert not gpu_devices(services[name])
    assert {services[name]["image"] for name in MODELWORKS_SERVICES} == {"modelworks:gpu"}


def test_the_cpu_override_has_no_gpu_and_uses_the_cpu_image():
    services = compose_config("docker-compose.yml", "docker-compose.cpu.yml")
    for name in MODELWORKS_SERVICES:
        assert not gpu_devices(services[name]), name
        assert "MODELWORKS_REQUIRE_GPU" not in (services[name].get("environment") or {})
        assert services[name]["image"] == "modelworks:cpu"
        assert services[name]["build"]["args"]["TORCH_VARIANT"] == "cpu"


def test_ports_are_published_on_loopback_unless_the_operator_opts_in():
    services = compose_config()
    for name, service in services.items():
        for host_ip in published(service).values():
            assert host_ip == "127.0.0.1", (name, service["ports"])
    assert "ports" not in services["redis"], "Redis stays inside the compose network"
    opened = compose_config(env={"PATH": "/usr/bin:/bin", "MODELWORKS_BIND": "0.0.0.0"})
    for name, port in [("llm", 50051), ("diffusion", 50052), ("finetune", 50053), ("gateway", 7860), ("openai", 8000)]:
        assert opened_on(opened[name], port) == "0.0.0.0", name
    no_login = [("llm", 9101), ("worker", 9104), ("gateway", 9105), ("openai", 9106)]
    for name, port in [*no_login, ("prometheus", 9090), ("grafana", 3000)]:
        assert opened_on(opened[name], port) == "127.0.0.1", f"{name}:{port} has no login: it stays on loopback"
    assert opened["llm"]["environment"]["MODELWORKS_PUBLISHED_ON"] == "0.0.0.0", "so the services demand a key"


def test_every_long_running_service_has_a_health_check_and_waits_for_what_it_needs():
    services = compose_config()
    for name in ["redis", "llm", "diffusion", "finetune", "worker", "gateway", "openai"]:
        assert services[name]["healthcheck"]["test"], name
        assert services[name]["restart"] == "unless-stopped", name
    assert services["models"]["restart"] == "no"
    for name in ["llm", "diffusion", "finetune", "worker"]:
        assert services[name]["depends_on"]["models"]["condition"] == "service_completed_successfully"
    for name in ["finetune", "worker"]:
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    for name in CLIENT_SERVICES:
        assert services[name]["depends_on"]["finetune"]["condition"] == "service_healthy", name
        for model_service in ["llm", "diffusion"]:  # it reports a service still loading; it need not wait
            assert services[name]["depends_on"][model_service]["condition"] == "service_started", name
    openai = services["openai"]
    probe = ["CMD", "python", "/app/docker/healthcheck.py", "http://127.0.0.1:8000/health"]
    assert openai["healthcheck"]["test"] == probe
    assert openai["command"] == ["python", "-m", "services.openai", "--port", "8000", "--metrics-port", "9106"]


def _mounts(service: dict) -> dict[str, str]:
    """Container path -> "ro" or "rw"."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            mounts[volume["target"]] = "ro" if volume.get("read_only") else "rw"
        else:
            parts = str(volume).split(":")
            mounts[parts[1]] = "ro" if parts[2:] == ["ro"] else "rw"
    return mounts


def test_secrets_are_made_once_and_read_from_files_never_from_the_compose_environment():
    services = compose_config()
    made = services["secrets"]
    assert made["command"][-3:] == ["shared.credentials", "init", "/run/modelworks"] and made["restart"] == "no"
    assert made["network_mode"] == "none" and _mounts(made)["/run/modelworks"] == "rw"
    for name in ["llm", "diffusion", "finetune", "worker", "gateway", "openai"]:
        service = services[name]
        assert service["depends_on"]["secrets"]["condition"] == "service_completed_successfully", name
        assert service["environment"]["MODELWORKS_API_KEY_FILE"] == "/run/modelworks/api_key", name
        assert "MODELWORKS_API_KEY" not in service["environment"], name
        assert _mounts(service)["/run/modelworks"] == "ro", name
        assert service["environment"]["MODELWORKS_BIND_ADDRESS"] == "0.0.0.0", "reachable on the compose network"
    assert services["gateway"]["environment"]["MODELWORKS_GATEWAY_AUTH_FILE"] == "/run/modelworks/gateway_auth"


def test_redis_needs_its_password_and_only_the_backend_reaches_it():
    services = compose_config()
    redis = services["redis"]
    assert "/run/modelworks/redis.conf" in redis["command"], "the config file with requirepass"
    assert "REDISCLI_AUTH" in " ".join(redis["healthcheck"]["test"])
    assert set(redis["networks"]) == {"backend"}
    for name in ["finetune", "worker"]:
        assert "backend" in services[name]["networks"], name
        assert services[name]["environment"]["MODELWORKS_REDIS_PASSWORD_FILE"] == "/run/modelworks/redis_password"
    for name in ["gateway", "openai", "llm", "diffusion"]:
        assert "backend" not in services[name]["networks"], f"{name} has no business with Redis"


def test_data_is_read_only_for_the_services_that_only_read_it():
    services = compose_config()
    for name in ["llm", "diffusion", "gateway", "openai"]:
        assert _mounts(services[name])["/data"] == "ro", name
    for name in ["models", "finetune", "worker"]:
        assert _mounts(services[name])["/data"] == "rw", name


def test_the_openai_api_reaches_every_replica_of_the_three_services():
    services = compose_config("docker-compose.yml", "docker-compose.cpu.yml")
    environment = services["openai"]["environment"]
    assert {key: environment[f"MODELWORKS_OPENAI__{key}_TARGET"] for key in ["LLM", "DIFFUSION", "FINETUNE"]} == {
        "LLM": "dns:///llm:50051",  # round_robin over DNS, like the gateway
        "DIFFUSION": "dns:///diffusion:50052",
        "FINETUNE": "dns:///finetune:50053",
    }
    assert "frontend" in services["openai"]["networks"], "the services it calls are on the frontend network"
    for name in ["llm", "diffusion", "finetune"]:
        assert "frontend" in services[name]["networks"], name
