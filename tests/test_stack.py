"""`python -m services` (what `make run` starts): the whole stack comes up, and Ctrl-C leaves nothing behind."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.harness import REPO_ROOT, wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return bool(state) and not state.startswith("Z")


def descendants_of(pid: int) -> list[int]:
    found, frontier = [], [pid]
    while frontier:
        children = children_of(frontier.pop())
        found += children
        frontier += children
    return found


def listening_addresses(pids: list[int]) -> set[str]:
    """The local addresses of the TCP sockets these processes listen on, read from /proc (no `ss` needed)."""
    inodes = set()
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        for fd in os.listdir(fd_dir) if os.path.isdir(fd_dir) else []:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    addresses = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        with open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and inode in inodes:  # 0A: LISTEN
                    addresses.add(_decode_address(local.split(":")[0], family))
    return addresses


def is_loopback_address(address: str) -> bool:
    """127.0.0.0/8 and ::1, also as an IPv4-mapped IPv6 address (a dual-stack socket bound to 127.0.0.1)."""
    ip = ipaddress.ip_address(address)
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


def _decode_address(hex_address: str, family: int) -> str:
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))  # /proc prints 32-bit words little-endian
    return socket.inet_ntop(family, words)


def _get(url: str) -> bytes | None:
    try:
        return urllib.request.urlopen(url, timeout=5).read()
    except OSError:
        return None


def assert_the_terminal_is_quiet_and_the_files_hold_json(terminal: str, logs: Path) -> None:
    """Text mode: short lines for people, no JSON, no banners or warnings nobody can act on; each process's
    whole output in its own file, the services' as JSON entries."""
    lines = terminal.splitlines()
    assert not [line for line in lines if line.lstrip().startswith("{")], "JSON on the terminal in text mode"
    for noise in ("superuser privileges", "celery@", "torchvision", "Loading weights", "it/s]"):
        assert noise not in terminal, f"the terminal shows {noise!r}"
    assert "web app     http://127.0.0.1:" in terminal
    for service in ("llm", "diffusion", "finetune", "finetune-worker", "gateway", "openai"):
        entries = [json.loads(line) for line in (logs / f"{service}.log").read_text().splitlines() if line[:1] == "{"]
        assert entries and all(e["service"] == service for e in entries), f"{service}'s log file"
    assert (logs / "redis.log").read_text(), "Redis' own output is kept in its file"


def test_stack_starts_every_service_a_worker_the_web_app_and_the_openai_api_and_stops_cleanly(
    data_dir, smollm2, tmp_path
):
    llm_port, metrics_port, redis_port = free_port(), free_port(), free_port()
    diffusion_port, diffusion_metrics_port = free_port(), free_port()
    finetune_port, finetune_metrics_port, worker_metrics_port = free_port(), free_port(), free_port()
    gateway_port, gateway_metrics_port = free_port(), free_port()
    openai_port, openai_metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        "MODELWORKS_CONFIG": str(REPO_ROOT / "config" / "modelworks.yaml"),
        "MODELWORKS_DATA_DIR": str(data_dir),
        "MODELWORKS_LLM__PORT": str(llm_port),
        "MODELWORKS_LLM__METRICS_PORT": str(metrics_port),
        "MODELWORKS_DIFFUSION__PORT": str(diffusion_port),
        "MODELWORKS_DIFFUSION__METRICS_PORT": str(diffusion_metrics_port),
        "MODELWORKS_FINETUNE__PORT": str(finetune_port),
        "MODELWORKS_FINETUNE__METRICS_PORT": str(finetune_metrics_port),
        "MODELWORKS_FINETUNE__WORKER_METRICS_PORT": str(worker_metrics_port),
        "MODELWORKS_EMBEDDED_REDIS_PORT": str(redis_port),
        "MODELWORKS_GATEWAY_PORT": str(gateway_port),
        "MODELWORKS_GATEWAY_METRICS_PORT": str(gateway_metrics_port),
        "MODELWORKS_OPENAI__PORT": str(openai_port),
        "MODELWORKS_OPENAI__METRICS_PORT": str(openai_metrics_port),
        "MODELWORKS_SHUTDOWN_GRACE_S": "2",
    }
    env.pop("MODELWORKS_REDIS_URL", None)
    stack = subprocess.Popen(
        [sys.executable, "-m", "services"],
        cwd=REPO_ROOT,
        env=env,
        stdout=(tmp_path / "out.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        out = tmp_path / "out.log"
        said_ready = re.compile(r"^\S+ stack +ready$", re.M)
        wait_for(lambda: said_ready.search(out.read_text()), 300, "the stack to say it is ready", interval=0.5)
        # said only once true: every service serves at once, without waiting
        for port in (llm_port, diffusion_port, finetune_port):
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, f"port {port} is not serving yet"
        assert _get(f"http://127.0.0.1:{gateway_port}/") and _get(f"http://127.0.0.1:{openai_port}/health")
        client = redis.Redis(port=redis_port)
        assert client.ping() and client.config_get("appendonly")["appendonly"] == "yes"
        assert list(client.scan_iter("modelworks:worker:*")), "the worker has registered"
        worker_metrics = f"http://127.0.0.1:{worker_metrics_port}/metrics"
        assert b"modelworks_finetune_jobs_running" in urllib.request.urlopen(worker_metrics, timeout=5).read()
        page = _get(f"http://127.0.0.1:{gateway_port}/")
        assert b"ModelWorks" in page
        assert (
            b"modelworks_gateway_calls"
            in urllib.request.urlopen(f"http://127.0.0.1:{gateway_metrics_port}/metrics", timeout=5).read()
        )
        models = _get(f"http://127.0.0.1:{openai_port}/v1/models")
        assert b"smollm2-135m-instruct" in models
        assert (
            b"modelworks_openai_requests"
            in urllib.request.urlopen(f"http://127.0.0.1:{openai_metrics_port}/metrics", timeout=5).read()
        )
        children = children_of(stack.pid)
        assert len(children) == 7
        listening = listening_addresses([stack.pid, *descendants_of(stack.pid)])
        assert listening and all(map(is_loopback_address, listening)), f"listening beyond loopback: {listening}"
        stack.send_signal(signal.SIGINT)
        assert stack.wait(30) == 0
        assert not [pid for pid in children if alive(pid)], "the stack left processes behind"
        assert_the_terminal_is_quiet_and_the_files_hold_json(out.read_text(), data_dir / "logs")
    finally:
        if stack.poll() is None:  # a failed check: stop the stack as Ctrl-C would, or kill what is left
            left = descendants_of(stack.pid)
            stack.send_signal(signal.SIGINT)
            try:
                stack.wait(30)
            except subprocess.TimeoutExpired:
                stack.kill()
            for pid in left:
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)
