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


def spawn_service(
    service: str, workdir: Path, config: dict, env: dict[str, str] | None = None, timeout: float = 300
) -> ServiceProcess:
    """Run `python -m services.<service>` with `config` as its YAML config, on free loopback ports."""
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    ready = workdir / "ready.json"
    ready.unlink(missing_ok=True)
    log_path = workdir / f"{service}.log"
    full_env = {**os.environ, "MODELWORKS_CONFIG": str(config_path), **(env or {})}
    argv = [
        sys.executable,
        "-m",
        f"services.{service}",
        "--bind",
        "127.0.0.1",
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--ready-file",
        str(ready),
    ]
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(argv, cwd=REPO_ROOT, env=full_env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: ready.exists() or process.poll() is not None, timeout, f"the {service} service to start")
    except BaseException:
        process.kill()
        raise
    if process.poll() is not None:
        raise RuntimeError(f"the {service} service exited with {process.returncode}:\n{log_path.read_text()}")
    ports = json.loads(ready.read_text())
    return ServiceProcess(process, f"127.0.0.1:{ports['port']}", ports["metrics_port"], log_path)
