"""The containers for real: Docker's daemon, the `cpu` image and the compose stack, for `make test-compose`.

Collected only when MODELWORKS_TEST_COMPOSE=1 (`make test-compose` sets it; `make test` leaves these out).
Uses the running Docker daemon, or starts one when it can (root, `dockerd` installed) and stops it after,
by its pid. Where no daemon can run, every test skips and says why.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from tests.harness import REPO_ROOT, free_port, wait_for

PROJECT = f"mwtest{os.getpid()}"  # one project per run: two runs never tear down each other's stack
IMAGE = "modelworks:compose-test"  # not an operator's own modelworks:cpu
ARTIFACTS = REPO_ROOT / "test-artifacts"
COMPOSE_FILES = ["docker-compose.yml", "docker-compose.cpu.yml", "tests/compose/compose.test.yml"]
SERVICES = ["redis", "llm", "diffusion", "finetune", "worker", "gateway", "openai"]
# The operator's own secrets, which the `secrets` service writes instead of random ones.
API_KEY = "compose-test-key-0123456789abcdef"
LOGIN = ("tester", "compose-test-password")


def run(args: list[str], timeout: float = 120, check: bool = True, env: dict | None = None, **kwargs):
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO_ROOT, **kwargs)
    if check and result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args)} exited {result.returncode}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
        )
    return result


def default_mtu() -> int:
    """The MTU of the default route's interface: containers must not send bigger packets than the VM can."""
    route = run(["ip", "route", "show", "default"], check=False).stdout.split()
    if "dev" in route:
        path = Path(f"/sys/class/net/{route[route.index('dev') + 1]}/mtu")
        if path.is_file():
            return int(path.read_text())
    return 1500


@dataclass
class DockerDaemon:
    """The daemon the tests use; `process` is set only when the tests started it (and so must stop it)."""

    process: subprocess.Popen | None = None

    @staticmethod
    def answers() -> bool:
        return run(["docker", "info", "--format", "{{.ServerVersion}}"], check=False, timeout=30).returncode == 0

    @classmethod
    def find_or_start(cls) -> DockerDaemon:
        if not shutil.which("docker"):
            pytest.skip("SKIPPED LOUDLY: no `docker` CLI here (apt-get install docker.io docker-compose)")
        if cls.answers():
            return cls()
        if os.geteuid() != 0 or not shutil.which("dockerd"):
            pytest.skip("SKIPPED LOUDLY: no Docker daemon runs and this user cannot start one (needs root and dockerd)")
        ARTIFACTS.mkdir(exist_ok=True)
        log_path = ARTIFACTS / "dockerd.log"
        with log_path.open("w") as log:
            process = subprocess.Popen(
                ["dockerd", "--storage-driver=overlay2", f"--mtu={default_mtu()}"],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        daemon = cls(process)
        try:
            wait_for(lambda: process.poll() is not None or cls.answers(), 60, "dockerd to answer", interval=0.5)
        except TimeoutError:
            daemon.stop()
            pytest.skip(f"SKIPPED LOUDLY: dockerd did not answer within 60 s; see {log_path}")
        if process.poll() is not None:
            pytest.skip(f"SKIPPED LOUDLY: dockerd exited {process.returncode} at start; see {log_path}")
        return daemon

    def stop(self) -> None:
        """Stop the daemon these tests started (by its pid), and only that one."""
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


def compose_command() -> list[str]:
    """`docker compose` (v2) where the plugin exists, else Debian's `docker-compose` (v1)."""
    if run(["docker", "compose", "version"], check=False).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.skip("SKIPPED LOUDLY: neither `docker compose` nor `docker-compose` is installed")


# what the tests reach, as (service, container port); the host port is whatever compose published
ENDPOINTS = {
    "llm": ("llm", 50051),
    "llm-metrics": ("llm", 9101),
    "diffusion": ("diffusion", 50052),
    "finetune": ("finetune", 50053),
    "gateway": ("gateway", 7860),
    "gateway-metrics": ("gateway", 9105),
    "openai": ("openai", 8000),
    "openai-metrics": ("openai", 9106),
}


class BearerKey(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds `authorization: Bearer <key>` to each call, as every client of a keyed stack must."""

    def __init__(self, key: str):
        self._header = ("authorization", f"Bearer {key}")

    def _keyed(self, details):
        return details._replace(metadata=[*(details.metadata or ()), self._header])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._keyed(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._keyed(details), request)


@dataclass
class Stack:
    """The compose project under test, publishing on 127.0.0.1."""

    compose: list[str]
    env: dict[str, str]

    def __call__(self, *args: str, timeout: float = 600, check: bool = True):
        files = [a for f in COMPOSE_FILES for a in ("-f", f)]
        env_file = "tests/compose/test.env"  # not an operator's .env next to the compose file
        command = [*self.compose, "--env-file", env_file, "-p", PROJECT, *files, *args]
        return run(command, timeout=timeout, check=check, env=self.env)

    def channel(self, name: str) -> grpc.Channel:
        """A channel to an endpoint that sends the stack's API key on every call."""
        return grpc.intercept_channel(grpc.insecure_channel(self.address(name)), BearerKey(API_KEY))

    def address(self, name: str) -> str:
        """host:port of an endpoint of the service's first container."""
        service, port = ENDPOINTS[name]
        return f"127.0.0.1:{self.host_port(service, port)}"

    def host_port(self, service: str, port: int, index: int = 0) -> int:
        return int(self.inspect(service, index)["NetworkSettings"]["Ports"][f"{port}/tcp"][0]["HostPort"])

    def containers(self, service: str) -> list[str]:
        return sorted(self("ps", "-q", service).stdout.split())

    def inspect(self, service: str, index: int = 0) -> dict:
        """`docker inspect` of the service's container (replicas in the order compose numbers them)."""
        details = [json.loads(run(["docker", "inspect", c]).stdout)[0] for c in self.containers(service)]
        assert details, f"no container of {service}"
        return sorted(details, key=lambda d: int(d["Config"]["Labels"]["com.docker.compose.container-number"]))[index]

    def health(self, service: str, index: int = 0) -> str:
        state = self.inspect(service, index)["State"]
        return state.get("Health", {}).get("Status", state["Status"])

    def wait_healthy(self, services: list[str], timeout: float = 900) -> None:
        def all_healthy() -> bool:
            return all(self.health(s, i) == "healthy" for s in services for i in range(len(self.containers(s))))

        try:
            wait_for(all_healthy, timeout, f"{', '.join(services)} to be healthy", interval=2)
        except TimeoutError:
            states = {s: self.health(s) for s in services}
            raise TimeoutError(f"not healthy after {timeout:.0f} s: {states}; logs in {ARTIFACTS}") from None

    def save_logs(self) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        logs = self("logs", "--no-color", "--timestamps", check=False, timeout=120)
        (ARTIFACTS / "compose-logs.txt").write_text(logs.stdout + logs.stderr)


@pytest.fixture(scope="session")
def docker() -> Iterator[DockerDaemon]:
    daemon = DockerDaemon.find_or_start()
    yield daemon
    daemon.stop()


@pytest.fixture(scope="session")
def image(docker) -> str:
    """The `cpu` image, built (from a local base and the local torch wheel where nothing can be pulled)."""
    started = time.monotonic()
    run(["docker/build-image.sh", "cpu", IMAGE], timeout=1800)
    size = json.loads(run(["docker", "image", "inspect", IMAGE]).stdout)[0]["Size"]
    print(f"\nbuilt {IMAGE} in {time.monotonic() - started:.0f} s: {size / 1e9:.2f} GB")
    return IMAGE


def free_port_range(size: int) -> str:
    """`first-last`: `size` consecutive free loopback ports, for a service the tests scale to `size` replicas."""
    import socket

    for _ in range(200):
        first = free_port()
        try:
            sockets = [socket.create_server(("127.0.0.1", first + i)) for i in range(1, size)]
        except OSError:
            continue
        for sock in sockets:
            sock.close()
        return f"{first}-{first + size - 1}"
    raise RuntimeError(f"no {size} consecutive free ports")


@pytest.fixture(scope="session")
def stack(docker, image) -> Iterator[Stack]:
    # llm and worker get two host ports each: test_scale_out runs two replicas of both
    ports = {
        "llm": free_port_range(2),
        "llm-metrics": free_port_range(2),
        "diffusion": free_port(),
        "diffusion-metrics": free_port(),
        "finetune": free_port(),
        "finetune-metrics": free_port(),
        "worker-metrics": free_port_range(2),
        "gateway": free_port(),
        "gateway-metrics": free_port(),
        "openai": free_port(),
        "openai-metrics": free_port(),
    }
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("MODELWORKS_", "COMPOSE_"))},
        "MODELWORKS_IMAGE": image,
        "MODELWORKS_BIND": "127.0.0.1",
        "MODELWORKS_API_KEY": API_KEY,
        "MODELWORKS_GATEWAY_AUTH": ":".join(LOGIN),
        **{f"MODELWORKS_PORT_{name.upper().replace('-', '_')}": str(port) for name, port in ports.items()},
    }
    stack = Stack(compose_command(), env)
    stack("down", "-v", "--remove-orphans", check=False)  # what a crashed earlier run left
    try:
        stack("up", "-d", "--no-build", timeout=900)
        stack.wait_healthy(SERVICES)
        yield stack
    finally:
        stack.save_logs()
        stack("down", "-v", "--remove-orphans", check=False, timeout=300)
