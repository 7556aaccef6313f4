"""The dataset store: uploaded training data, validated whole before it is accepted.

`<data dir>/datasets/<id>/` holds the file (`data.jsonl` or `data.zip`) and `dataset.json`. An upload
streams into a staging file (bounded by `finetune.max_upload_bytes`), is validated line by line or member
by member — errors name the line or file and what is wrong — and is renamed into place only when valid.

- JSONL (LLM): every line one of `{"prompt", "completion"}`, `{"messages": [{"role", "content"}, ...]}` or
  `{"text"}`, all lines of one type.
- imagefolder zip (diffusion): images plus `metadata.jsonl` with `{"file_name", "text"}` per image (the
  Hugging Face imagefolder layout). Zips are checked for path traversal, links, decompression bombs
  (total and per-file size, read as they inflate, not as the header claims), pixel counts, and members
  that are not images.

Torch-free: the API runs this.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import stat
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from shared.errors import InvalidArgument, NotFound, ResourceExhausted
from shared.settings import FinetuneSettings

FORMATS = {"jsonl": "data.jsonl", "imagefolder_zip": "data.zip"}
METADATA_FILE = "dataset.json"
ZIP_METADATA = "metadata.jsonl"
IMAGE_FORMATS = {"PNG", "JPEG", "WEBP", "BMP", "GIF"}
MAX_ASPECT_RATIO = 8  # a 1,000,000×64 strip is few pixels, but resized to a 512 short side it is 8 gigapixels
ROLES = {"system", "user", "assistant"}
DATASET_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
MAX_NAME = 128


@dataclass(frozen=True)
class DatasetRecord:
    id: str
    name: str
    format: str
    num_records: int
    size_bytes: int
    record_type: str  # prompt_completion | chat | text | image_caption
    created_at: float
    bundled: bool = False

    @property
    def kind(self) -> str:
        return "llm" if self.format == "jsonl" else "diffusion"


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise InvalidArgument(f"dataset format {fmt!r} is not supported; use one of {', '.join(FORMATS)}")
    return fmt


# -- JSONL --------------------------------------------------------------------------------------------


def _record_type(line_no: int, record) -> str:
    if not isinstance(record, dict):
        raise InvalidArgument(f"line {line_no}: expected a JSON object, got {type(record).__name__}")
    keys = set(record)
    if keys >= {"prompt", "completion"}:
        for key in ("prompt", "completion"):
            if not isinstance(record[key], str):
                raise InvalidArgument(f"line {line_no}: {key!r} must be a string")
        if not record["completion"]:
            raise InvalidArgument(f"line {line_no}: 'completion' is empty; there is nothing to learn")
        return "prompt_completion"
    if "messages" in keys:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise InvalidArgument(f"line {line_no}: 'messages' must be a non-empty list")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                raise InvalidArgument(f"line {line_no}: messages[{i}] needs a string 'content'")
            if message.get("role") not in ROLES:
                raise InvalidArgument(
                    f"line {line_no}: messages[{i}].role is {message.get('role')!r}; use system, user or assistant"
                )
        if not any(m["role"] == "assistant" and m["content"] for m in messages):
            raise InvalidArgument(f"line {line_no}: no assistant turn with content; there is nothing to learn")
        return "chat"
    if "text" in keys:
        if not isinstance(record["text"], str) or not record["text"]:
            raise InvalidArgument(f"line {line_no}: 'text' must be a non-empty string")
        return "text"
    raise InvalidArgument(
        f"line {line_no}: expected {{'prompt', 'completion'}}, {{'messages'}} or {{'text'}}, got keys {sorted(keys)}"
    )


def read_jsonl(path: Path, limits: FinetuneSettings | None = None) -> tuple[list[dict], str]:
    """Every record of a JSONL dataset and their one record type; InvalidArgument names the bad line."""
    max_chars = limits.max_record_chars if limits else None
    max_records = limits.max_dataset_records if limits else None
    records: list[dict] = []
    record_type = ""
    with path.open("rb") as file:
        for line_no, raw in enumerate(file, start=1):
            if max_chars is not None and len(raw) > max_chars * 4:
                raise InvalidArgument(f"line {line_no}: longer than the limit of {max_chars} characters")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidArgument(f"line {line_no}: not valid UTF-8") from None
            if max_chars is not None and len(text) > max_chars:
                raise InvalidArgument(f"line {line_no}: longer than the limit of {max_chars} characters")
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                raise InvalidArgument(f"line {line_no}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            kind = _record_type(line_no, record)
            if record_type and kind != record_type:
                raise InvalidArgument(
                    f"line {line_no}: a {kind} record in a dataset of {record_type} records; use one type per dataset"
                )
            record_type = kind
            records.append(record)
            if max_records is not None and len(records) > max_records:
                raise InvalidArgument(f"the dataset has more than {max_records} records (finetune.max_dataset_records)")
    if not records:
        raise InvalidArgument("the dataset has no records")
    return records, record_type


# -- imagefolder zip ----------------------------------------------------------------------------------


def _safe_member_name(name: str) -> bool:
    parts = name.split("/")
    return not (name.startswith("/") or "\\" in name or ".." in parts or any(p.startswith("~") for p in parts[:1]))


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int, budget: list[int]) -> bytes:
    """A member's bytes, inflated in chunks against its own limit and the zip's remaining total budget."""
    chunks, size = [], 0
    with archive.open(info) as member:
        while chunk := member.read(1 << 16):
            size += len(chunk)
            budget[0] -= len(chunk)
            if size > limit:
                raise InvalidArgument(f"zip member {info.filename!r} inflates past the limit of {limit} bytes")
            if budget[0] < 0:
                raise InvalidArgument("the zip inflates past the total limit (finetune.max_unzipped_bytes)")
            chunks.append(chunk)
    return b"".join(chunks)


def _check_image(name: str, data: bytes, max_pixels: int) -> None:
    import io
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.format not in IMAGE_FORMATS:
                    raise InvalidArgument(f"{name!r} is a {image.format} image; use PNG, JPEG, WEBP, BMP or GIF")
                width, height = image.size
                if max(width, height) > MAX_ASPECT_RATIO * max(1, min(width, height)):
                    raise InvalidArgument(
                        f"{name!r} is {width}x{height}; sides may differ at most {MAX_ASPECT_RATIO}-fold"
                    )
                if width * height > max_pixels:
                    raise InvalidArgument(
                        f"{name!r} is {width}x{height}; the limit is {max_pixels} pixels (finetune.max_image_pixels)"
                    )
                image.load()  # decodes it: a truncated or corrupt image fails here
    except InvalidArgument:
        raise
    except Exception:
        raise InvalidArgument(f"{name!r} is not a readable image") from None


def _ignored(name: str) -> bool:
    return name.startswith("__MACOSX/") or Path(name).name == ".DS_Store" or name.endswith("/")


def metadata_member(names: list[str]) -> tuple[str, str]:
    """The zip's `metadata.jsonl` and the folder prefix its file names are relative to ("" at the top)."""
    found = [n for n in names if not _ignored(n) and Path(n).name == ZIP_METADATA]
    if len(found) != 1:
        raise InvalidArgument(f"the zip needs exactly one {ZIP_METADATA} (found {len(found)})")
    root = str(Path(found[0]).parent)
    return found[0], "" if root == "." else root + "/"


def read_imagefolder_zip(path: Path, limits: FinetuneSettings) -> list[dict]:
    """The `metadata.jsonl` records of an imagefolder zip, every member checked; InvalidArgument says what is wrong."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        raise InvalidArgument("the upload is not a zip file") from None
    with archive:
        infos = [i for i in archive.infolist() if not i.is_dir()]
        if len(infos) > limits.max_zip_members:
            raise InvalidArgument(f"the zip has {len(infos)} files; the limit is {limits.max_zip_members}")
        by_name: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            name = info.filename
            if not _safe_member_name(name):
                raise InvalidArgument(f"zip member {name!r} has an unsafe path (absolute, '..' or backslashes)")
            if stat.S_ISLNK(info.external_attr >> 16):
                raise InvalidArgument(f"zip member {name!r} is a symbolic link; links are not allowed")
            if info.flag_bits & 0x1:
                raise InvalidArgument(f"zip member {name!r} is encrypted")
            if _ignored(name):
                continue  # archivers' droppings, not data
            by_name[name] = info
        metadata_name, root = metadata_member(list(by_name))
        budget = [limits.max_unzipped_bytes]
        raw = _read_member(archive, by_name[metadata_name], limits.max_image_bytes, budget)
        records = _image_records(raw, root, by_name, limits)
        referenced = {root + r["file_name"] for r in records}
        for name, info in by_name.items():
            if name == metadata_name:
                continue
            if name not in referenced:
                raise InvalidArgument(f"zip member {name!r} is not listed in {ZIP_METADATA}")
            _check_image(name, _read_member(archive, info, limits.max_image_bytes, budget), limits.max_image_pixels)
    return records


def _image_records(raw: bytes, root: str, members: dict, limits: FinetuneSettings) -> list[dict]:
    records, seen = [], set()
    for line_no, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"{ZIP_METADATA} line {line_no}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("file_name"), str):
            raise InvalidArgument(f"{ZIP_METADATA} line {line_no}: needs a string 'file_name'")
        if not isinstance(record.get("text"), str):
            raise InvalidArgument(f"{ZIP_METADATA} line {line_no}: needs a string 'text' (the caption)")
        name = record["file_name"]
        if not _safe_member_name(name) or root + name not in members:
            raise InvalidArgument(f"{ZIP_METADATA} line {line_no}: {name!r} is not a file in the zip")
        if name in seen:
            raise InvalidArgument(f"{ZIP_METADATA} line {line_no}: {name!r} is listed twice")
        seen.add(name)
        records.append({"file_name": name, "text": record["text"]})
        if len(records) > limits.max_dataset_records:
            raise InvalidArgument(f"more than {limits.max_dataset_records} images (finetune.max_dataset_records)")
    if not records:
        raise InvalidArgument(f"{ZIP_METADATA} lists no images")
    return records


# -- the store ----------------------------------------------------------------------------------------


class DatasetUpload:
    """A streamed upload in a staging file: `write` chunks, then `DatasetStore.accept` validates it."""

    def __init__(self, staging: Path, name: str, fmt: str, limit: int):
        self.staging, self.name, self.format, self._limit = staging, name, fmt, limit
        self.size = 0
        self._file = (staging / FORMATS[fmt]).open("wb")

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self._limit:
            raise ResourceExhausted(f"the upload is over the limit of {self._limit} bytes (finetune.max_upload_bytes)")
        self._file.write(chunk)

    def close(self) -> None:
        self._file.close()

    def discard(self) -> None:
        self.close()
        shutil.rmtree(self.staging, ignore_errors=True)


class DatasetStore:
    def __init__(self, root: Path, limits: FinetuneSettings):
        self.root = Path(root)
        self.limits = limits

    def begin(self, name: str, fmt: str) -> DatasetUpload:
        check_format(fmt)
        if not name.strip() or len(name) > MAX_NAME:
            raise InvalidArgument(f"a dataset needs a name of 1-{MAX_NAME} characters")
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".upload-", dir=self.root))
        return DatasetUpload(staging, name, fmt, self.limits.max_upload_bytes)

    def accept(self, upload: DatasetUpload, dataset_id: str | None = None, bundled: bool = False) -> DatasetRecord:
        """Validate the whole upload and move it into place; the staging folder is gone either way."""
        upload.close()
        try:
            data_path = upload.staging / FORMATS[upload.format]
            if upload.format == "jsonl":
                records, record_type = read_jsonl(data_path, self.limits)
            else:
                records, record_type = read_imagefolder_zip(data_path, self.limits), "image_caption"
            record = DatasetRecord(
                id=dataset_id or f"ds-{secrets.token_hex(8)}",
                name=upload.name,
                format=upload.format,
                num_records=len(records),
                size_bytes=upload.size,
                record_type=record_type,
                created_at=time.time(),
                bundled=bundled,
            )
            (upload.staging / METADATA_FILE).write_text(json.dumps(asdict(record), indent=2))
            os.rename(upload.staging, self.root / record.id)
            return record
        finally:
            shutil.rmtree(upload.staging, ignore_errors=True)

    def get(self, dataset_id: str) -> DatasetRecord:
        if not DATASET_ID_RE.match(dataset_id or ""):
            raise NotFound(f"dataset {dataset_id!r} not found")
        try:
            meta = json.loads((self.root / dataset_id / METADATA_FILE).read_text())
        except (FileNotFoundError, ValueError):
            raise NotFound(f"dataset {dataset_id!r} not found") from None
        return DatasetRecord(**meta)

    def data_path(self, record: DatasetRecord) -> Path:
        return self.root / record.id / FORMATS[record.format]

    def list(self) -> list[DatasetRecord]:
        if not self.root.is_dir():
            return []
        found = []
        for child in self.root.iterdir():
            if DATASET_ID_RE.match(child.name) and (child / METADATA_FILE).exists():
                found.append(self.get(child.name))
        return sorted(found, key=lambda r: r.created_at, reverse=True)

    def add_bytes(self, name: str, fmt: str, data: bytes, dataset_id: str, bundled: bool = False) -> DatasetRecord:
        """Store a dataset from memory (the bundled samples) unless one with this id exists."""
        if (self.root / dataset_id / METADATA_FILE).exists():
            return self.get(dataset_id)
        upload = self.begin(name, fmt)
        try:
            upload.write(data)
            return self.accept(upload, dataset_id=dataset_id, bundled=bundled)
        except FileExistsError:  # another process stored it first
            return self.get(dataset_id)
        except OSError:
            if (self.root / dataset_id / METADATA_FILE).exists():
                return self.get(dataset_id)
            raise
