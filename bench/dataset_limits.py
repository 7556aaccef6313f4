"""Dataset validation against hostile uploads: the API process's peak memory and the time to answer.

Each upload is validated by `DatasetStore.accept` (what UploadDataset runs) in a fresh child process with
the default limits; the child reports its peak RSS (VmHWM) after its imports and after validating, so the
difference is what validation took. The files are generated in a temp dir and deleted after:
- a 512 MB JSONL of tiny chat messages (the most records and messages per byte the limits allow), accepted;
- a zip whose zip64 end record claims 10,000,000 entries, refused from the end record alone;
- a zip whose end record claims 1 entry over a real directory of 300,000, refused by walking the directory.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.report import Row

UPLOAD_BYTES = 512 * 1024 * 1024
DIRECTORY_ENTRIES = 300_000
CLAIMED_ENTRIES = 10_000_000

CHILD = """
import json, sys, time
from pathlib import Path

from services.finetune.datasets import DatasetStore
from shared.errors import ServiceError
from shared.settings import FinetuneSettings


def peak_mib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024


path, fmt, root = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
store = DatasetStore(root, FinetuneSettings())
before = peak_mib()
start = time.perf_counter()
upload = store.begin("bench", fmt)
try:
    with path.open("rb") as file:
        while chunk := file.read(4 * 1024 * 1024):  # the gRPC upload's chunks, at most max_message_bytes
            upload.write(chunk)
    outcome = f"accepted, {store.accept(upload).num_records:,} records"
except ServiceError as error:
    upload.discard()
    outcome = f"{error.code}: {error.message[:100]}"
print(json.dumps({"before": before, "after": peak_mib(), "seconds": time.perf_counter() - start, "outcome": outcome}))
"""


def tiny_chat_jsonl(path: Path) -> None:
    """Lines of 512 one-character messages (the per-record limit) until the upload limit."""
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}] * 256
    line = (json.dumps({"messages": messages}, separators=(",", ":")) + "\n").encode()
    with path.open("wb") as file:
        file.write(line * (UPLOAD_BYTES // len(line)))


def end_record(entries: int, size: int, offset: int) -> bytes:
    count = min(entries, 0xFFFF)
    return struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, count, count, size, offset, 0)


def zip64_claiming(path: Path, entries: int) -> None:
    """Only the end records: a zip64 end record claiming `entries`, its locator, and the classic end record."""
    zip64 = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, entries, entries, 0, 0)
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, 0, 1)
    path.write_bytes(zip64 + locator + end_record(0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF))


def understated_directory(path: Path, entries: int) -> None:
    """A central directory of `entries` empty files behind an end record that claims one."""
    header = struct.Struct("<4s4B4HL2L5H2L")
    directory = b"".join(
        header.pack(b"PK\x01\x02", 20, 3, 20, 0, 0, 0, 0, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0, 0) + f"{i:06d}.png".encode()
        for i in range(entries)
    )
    path.write_bytes(directory + end_record(1, len(directory), 0))


def validate(path: Path, fmt: str, workdir: Path) -> dict:
    root = Path(__file__).resolve().parent.parent
    args = [sys.executable, "-c", CHILD, str(path), fmt, str(workdir / "datasets")]
    done = subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=600, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(workdir: Path) -> list[Row]:
    cases = [
        ("512 MB JSONL, 512 tiny messages a line", "jsonl", tiny_chat_jsonl),
        (
            f"zip64 end record claiming {CLAIMED_ENTRIES:,} entries",
            "imagefolder_zip",
            lambda p: zip64_claiming(p, CLAIMED_ENTRIES),
        ),
        (
            f"zip claiming 1 entry over {DIRECTORY_ENTRIES:,}",
            "imagefolder_zip",
            lambda p: understated_directory(p, DIRECTORY_ENTRIES),
        ),
    ]
    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="dataset-limits-"))
    try:
        for label, fmt, build in cases:
            path = scratch / ("upload.jsonl" if fmt == "jsonl" else "upload.zip")
            build(path)
            result = validate(path, fmt, scratch)
            path.unlink()
            grown = result["after"] - result["before"]
            rows.append(Row(label, "peak RSS while validating (MiB)", f"{result['after']:.0f}",
                            f"{result['before']:.0f} (after imports; +{grown:.0f})", None))  # fmt: skip
            rows.append(Row(label, "time to answer (s)", f"{result['seconds']:.2f}", result["outcome"], None))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return rows


NOTE = (
    "Each upload validated by DatasetStore.accept in a fresh process with the default limits; peak RSS is the"
    " process's VmHWM. Goal: under 1 GiB, refusals in seconds. The upload is copied to staging in 4 MiB chunks."
)
