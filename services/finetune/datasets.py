"""The dataset store: uploaded training data, validated whole before it is accepted.

`<data dir>/datasets/<id>/` holds the file (`data.jsonl` or `data.zip`) and `dataset.json`. An upload
streams into a staging file (bounded by `finetune.max_upload_bytes`), is validated line by line or member
by member — errors name the line or file and what is wrong — and is renamed into place only when valid.
Validation holds one line or one member in memory at a time, never the whole dataset.

- JSONL (LLM): every line one of `{"prompt", "completion"}`, `{"messages": [{"role", "content"}, ...]}` or
  `{"text"}`, all lines of one type; lines, nesting depth and messages per record bounded.
- imagefolder zip (diffusion): images plus `metadata.jsonl` with `{"file_name", "text"}` per image (the
  Hugging Face imagefolder layout). Zips are checked for too many entries (from the end record and a walk
  of the central directory, before `zipfile` parses it), path traversal, links, decompression bombs (total
  and per-file size, read as they inflate, not as the header claims), pixel counts, sides, and members
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
import struct
import time
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

from services.finetune.staging import StagedUpload
from shared.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
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
    owner: str = ""  # the name of the API key that uploaded it; bundled samples have none
    mean_aspect: float = 1.0  # diffusion: the images' mean max(w, h) / min(w, h), for the training budget

    @property
    def kind(self) -> str:
        return "llm" if self.format == "jsonl" else "diffusion"


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise InvalidArgument(f"dataset format {fmt!r} is not supported; use one of {', '.join(FORMATS)}")
    return fmt


# -- JSONL --------------------------------------------------------------------------------------------

JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
NOT_A_BRACKET = re.compile(r"[^\[\]{}]+")
INNERMOST_PAIR = re.compile(r"\[\]|\{\}")


def json_depth_exceeds(text: str, max_depth: int) -> bool:
    """Whether the JSON text nests deeper than `max_depth`, found without recursion (json.loads recurses).

    Strings are cut out, then the innermost bracket pairs are peeled off once per level, each pass in C:
    work is bounded by `max_depth` passes over the brackets alone.
    """
    if text.count("[") + text.count("{") <= max_depth:
        return False
    brackets = NOT_A_BRACKET.sub("", JSON_STRING.sub("", text))
    for _ in range(max_depth):
        brackets, peeled = INNERMOST_PAIR.subn("", brackets)
        if not brackets or not peeled:
            return False  # fully peeled, or unbalanced: json.loads says what is wrong
    return True


def _check_messages(line_no: int, messages, max_messages: int | None) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidArgument(f"line {line_no}: 'messages' must be a non-empty list")
    if max_messages is not None and len(messages) > max_messages:
        raise InvalidArgument(
            f"line {line_no}: {len(messages)} messages; the limit is {max_messages} (finetune.max_messages_per_record)"
        )
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise InvalidArgument(f"line {line_no}: messages[{i}] needs a string 'content'")
        if message.get("role") not in ROLES:
            raise InvalidArgument(
                f"line {line_no}: messages[{i}].role is {message.get('role')!r}; use system, user or assistant"
            )
    if not any(m["role"] == "assistant" and m["content"] for m in messages):
        raise InvalidArgument(f"line {line_no}: no assistant turn with content; there is nothing to learn")


def _record_type(line_no: int, record, max_messages: int | None = None) -> str:
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
        _check_messages(line_no, record["messages"], max_messages)
        return "chat"
    if "text" in keys:
        if not isinstance(record["text"], str) or not record["text"]:
            raise InvalidArgument(f"line {line_no}: 'text' must be a non-empty string")
        return "text"
    raise InvalidArgument(
        f"line {line_no}: expected {{'prompt', 'completion'}}, {{'messages'}} or {{'text'}}, got keys {sorted(keys)}"
    )


def _lines(file, max_chars: int | None) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line, reading no more than one line past the limit into memory."""
    max_bytes = max_chars * 4 if max_chars is not None else None  # UTF-8: at most 4 bytes a character
    line_no = 0
    while raw := file.readline(-1 if max_bytes is None else max_bytes + 1):
        line_no += 1
        if max_bytes is not None and len(raw) > max_bytes:
            raise InvalidArgument(f"line {line_no}: longer than the limit of {max_chars} characters")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidArgument(f"line {line_no}: not valid UTF-8") from None
        if max_chars is not None and len(text) > max_chars:
            raise InvalidArgument(f"line {line_no}: longer than the limit of {max_chars} characters")
        yield line_no, text


def _parse_line(line_no: int, text: str, max_depth: int | None):
    if max_depth is not None and json_depth_exceeds(text, max_depth):
        raise InvalidArgument(f"line {line_no}: nested deeper than the limit of {max_depth} (finetune.max_json_depth)")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"line {line_no}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:  # also with a limit: unbalanced brackets pass the depth scan, then json.loads recurses
        raise InvalidArgument(f"line {line_no}: nested too deeply to read") from None


def iter_jsonl(path: Path, limits: FinetuneSettings | None = None) -> Iterator[tuple[dict, str]]:
    """Each record of a JSONL dataset with its type, one line in memory at a time; InvalidArgument names the
    bad line. With `limits` (the API), lines, nesting, messages and records are bounded by the settings."""
    max_chars = limits.max_record_chars if limits else None
    max_depth = limits.max_json_depth if limits else None
    max_messages = limits.max_messages_per_record if limits else None
    max_records = limits.max_dataset_records if limits else None
    record_type, count = "", 0
    with path.open("rb") as file:
        for line_no, text in _lines(file, max_chars):
            if not text.strip():
                continue
            record = _parse_line(line_no, text, max_depth)
            kind = _record_type(line_no, record, max_messages)
            if record_type and kind != record_type:
                raise InvalidArgument(
                    f"line {line_no}: a {kind} record in a dataset of {record_type} records; use one type per dataset"
                )
            record_type, count = kind, count + 1
            if max_records is not None and count > max_records:
                raise InvalidArgument(f"the dataset has more than {max_records} records (finetune.max_dataset_records)")
            yield record, kind
    if not count:
        raise InvalidArgument("the dataset has no records")


def scan_jsonl(path: Path, limits: FinetuneSettings | None = None) -> tuple[int, str]:
    """The number of records of a JSONL dataset and their one type, every line checked, none kept."""
    count, record_type = 0, ""
    for _, kind in iter_jsonl(path, limits):
        count, record_type = count + 1, kind
    return count, record_type


def read_jsonl(path: Path, limits: FinetuneSettings | None = None) -> tuple[list[dict], str]:
    """Every record of a JSONL dataset and their one record type (the worker's training data)."""
    records, record_type = [], ""
    for record, kind in iter_jsonl(path, limits):
        records.append(record)
        record_type = kind
    return records, record_type


# -- imagefolder zip ----------------------------------------------------------------------------------

EOCD = struct.Struct("<4s4H2LH")  # signature, disks, entries on this disk, entries, directory size, offset, comment
EOCD_SIGNATURE = b"PK\x05\x06"
ZIP64_LOCATOR = struct.Struct("<4sLQL")
ZIP64_LOCATOR_SIGNATURE = b"PK\x06\x07"
ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")  # ..., entries on this disk, entries, directory size, offset
ZIP64_EOCD_SIGNATURE = b"PK\x06\x06"
DIRECTORY_ENTRY = struct.Struct("<4s4B4HL2L5H2L")
DIRECTORY_ENTRY_SIGNATURE = b"PK\x01\x02"
MAX_MEMBER_NAME = 1024  # bytes; no image's path is longer
MAX_EXTRA_FIELD = 256  # bytes; archivers write under 100, and zipfile's parse of it is quadratic in its length


@dataclass(frozen=True)
class ZipDirectory:
    """Where a zip's central directory is and how many entries its end record claims."""

    entries: int
    start: int
    size: int


def _end_of_directory(file, file_size: int) -> ZipDirectory:
    """The (zip64) end-of-central-directory record, found as `zipfile` finds it: at the very end, or after
    the comment in the last 64 KiB; the zip64 record sits just before its locator, just before the end record."""
    tail_size = min(file_size, EOCD.size + (1 << 16))
    file.seek(file_size - tail_size)
    tail = file.read(tail_size)
    bare = tail[-EOCD.size : -EOCD.size + 4] == EOCD_SIGNATURE and tail[-2:] == b"\0\0"  # no comment
    at = len(tail) - EOCD.size if bare else tail.rfind(EOCD_SIGNATURE)
    if at < 0 or at + EOCD.size > len(tail):
        raise InvalidArgument("the upload is not a zip file")
    _, _, _, _, entries, size, _, _ = EOCD.unpack_from(tail, at)
    end = file_size - tail_size + at
    if end >= ZIP64_LOCATOR.size + ZIP64_EOCD.size:
        file.seek(end - ZIP64_LOCATOR.size - ZIP64_EOCD.size)
        zip64 = file.read(ZIP64_EOCD.size + ZIP64_LOCATOR.size)
        locator = ZIP64_LOCATOR.unpack_from(zip64, ZIP64_EOCD.size)
        record = ZIP64_EOCD.unpack_from(zip64)
        if locator[0] == ZIP64_LOCATOR_SIGNATURE and record[0] == ZIP64_EOCD_SIGNATURE:
            entries, size = record[7], record[8]
            end -= ZIP64_LOCATOR.size + ZIP64_EOCD.size
    return ZipDirectory(entries=entries, start=end - size, size=size)


def _count_directory_entries(file, directory: ZipDirectory, limit: int) -> int:
    """The entries the central directory really holds (`zipfile` reads it by size, not by the claimed count),
    walked header by header and stopped past `limit`, so parsing it later is bounded."""
    if directory.start < 0:
        raise InvalidArgument("the zip's central directory is corrupt (it starts before the file)")
    file.seek(directory.start)
    count, offset = 0, 0
    while offset < directory.size:
        header = file.read(DIRECTORY_ENTRY.size)
        if len(header) != DIRECTORY_ENTRY.size or header[:4] != DIRECTORY_ENTRY_SIGNATURE:
            raise InvalidArgument(f"the zip's central directory is corrupt at entry {count + 1}")
        name_length, extra_length, comment_length = DIRECTORY_ENTRY.unpack(header)[12:15]
        if name_length > MAX_MEMBER_NAME or extra_length > MAX_EXTRA_FIELD:
            raise InvalidArgument(
                f"zip entry {count + 1} has a {name_length}-byte name and a {extra_length}-byte extra field; "
                f"the limits are {MAX_MEMBER_NAME} and {MAX_EXTRA_FIELD}"
            )
        file.seek(name_length + extra_length + comment_length, os.SEEK_CUR)
        offset += DIRECTORY_ENTRY.size + name_length + extra_length + comment_length
        count += 1
        if count > limit:
            raise InvalidArgument(
                f"the zip's directory holds more than {limit} entries, the limit (finetune.max_zip_members)"
            )
    return count


def check_zip_directory(path: Path, limits: FinetuneSettings) -> int:
    """Refuse a zip whose central directory holds too many entries before `zipfile` parses it (each parsed
    entry costs ~500 B and a few µs): first by the count its end record claims, then by walking it."""
    limit = limits.max_zip_members
    with path.open("rb") as file:
        directory = _end_of_directory(file, path.stat().st_size)
        if directory.entries > limit:
            raise InvalidArgument(
                f"the zip has {directory.entries} entries; the limit is {limit} (finetune.max_zip_members)"
            )
        return _count_directory_entries(file, directory, limit)


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


def _check_size(name: str, width: int, height: int, limits: FinetuneSettings) -> None:
    if max(width, height) > MAX_ASPECT_RATIO * max(1, min(width, height)):
        raise InvalidArgument(f"{name!r} is {width}x{height}; sides may differ at most {MAX_ASPECT_RATIO}-fold")
    if min(width, height) < limits.min_image_side:
        raise InvalidArgument(
            f"{name!r} is {width}x{height}; the shortest side allowed is {limits.min_image_side} pixels "
            "(finetune.min_image_side): training upscales it to the resolution"
        )
    if width * height > limits.max_image_pixels:
        raise InvalidArgument(
            f"{name!r} is {width}x{height}; the limit is {limits.max_image_pixels} pixels (finetune.max_image_pixels)"
        )


def _check_image(name: str, data: bytes, limits: FinetuneSettings) -> tuple[int, int]:
    """The image's (width, height), once it is known to decode and to fit the limits."""
    import io
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.format not in IMAGE_FORMATS:
                    raise InvalidArgument(f"{name!r} is a {image.format} image; use PNG, JPEG, WEBP, BMP or GIF")
                _check_size(name, *image.size, limits)
                image.load()  # decodes it: a truncated or corrupt image fails here
                return image.size
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


@dataclass(frozen=True)
class ImageFolder:
    records: list[dict]  # {"file_name", "text"}, file names relative to `metadata.jsonl`'s folder
    mean_aspect: float  # the mean of max(w, h) / min(w, h): resized to a short side, pixels grow by it


def _data_members(archive: zipfile.ZipFile, limits: FinetuneSettings) -> dict[str, zipfile.ZipInfo]:
    """The zip's files by name (archivers' droppings left out), each checked to be safe to read."""
    infos = [i for i in archive.infolist() if not i.is_dir()]
    if len(infos) > limits.max_zip_members:
        raise InvalidArgument(
            f"the zip has {len(infos)} files; the limit is {limits.max_zip_members} (finetune.max_zip_members)"
        )
    by_name: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        name = info.filename
        if not _safe_member_name(name):
            raise InvalidArgument(f"zip member {name!r} has an unsafe path (absolute, '..' or backslashes)")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise InvalidArgument(f"zip member {name!r} is a symbolic link; links are not allowed")
        if info.flag_bits & 0x1:
            raise InvalidArgument(f"zip member {name!r} is encrypted")
        if not _ignored(name):
            by_name[name] = info
    return by_name


def read_imagefolder_zip(path: Path, limits: FinetuneSettings) -> ImageFolder:
    """The `metadata.jsonl` records of an imagefolder zip, every member checked; InvalidArgument says what is wrong."""
    check_zip_directory(path, limits)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        raise InvalidArgument("the upload is not a zip file") from None
    with archive:
        by_name = _data_members(archive, limits)
        metadata_name, root = metadata_member(list(by_name))
        budget = [limits.max_unzipped_bytes]
        raw = _read_member(archive, by_name[metadata_name], limits.max_image_bytes, budget)
        records = _image_records(raw, root, by_name, limits)
        referenced = {root + r["file_name"] for r in records}
        aspects = []
        for name, info in by_name.items():
            if name == metadata_name:
                continue
            if name not in referenced:
                raise InvalidArgument(f"zip member {name!r} is not listed in {ZIP_METADATA}")
            width, height = _check_image(name, _read_member(archive, info, limits.max_image_bytes, budget), limits)
            aspects.append(max(width, height) / min(width, height))
    return ImageFolder(records, sum(aspects) / len(aspects))


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


class DatasetUpload(StagedUpload):
    """A streamed upload in a staging file: `write` chunks, then `DatasetStore.accept` validates it."""

    def __init__(self, root: Path, name: str, fmt: str, limit: int):
        super().__init__(root, FORMATS[fmt], limit, "finetune.max_upload_bytes")
        self.name, self.format = name, fmt


class DatasetStore:
    def __init__(self, root: Path, limits: FinetuneSettings):
        self.root = Path(root)
        self.limits = limits

    def begin(self, name: str, fmt: str) -> DatasetUpload:
        check_format(fmt)
        if not name.strip() or len(name) > MAX_NAME:
            raise InvalidArgument(f"a dataset needs a name of 1-{MAX_NAME} characters")
        return DatasetUpload(self.root, name, fmt, self.limits.max_upload_bytes)

    def accept(
        self, upload: DatasetUpload, dataset_id: str | None = None, bundled: bool = False, owner: str = ""
    ) -> DatasetRecord:
        """Validate the whole upload and move it into place; the staging folder is gone either way."""
        upload.close()
        try:
            data_path = upload.staging / FORMATS[upload.format]
            mean_aspect = 1.0
            if upload.format == "jsonl":
                num_records, record_type = scan_jsonl(data_path, self.limits)
            else:
                folder = read_imagefolder_zip(data_path, self.limits)
                num_records, record_type, mean_aspect = len(folder.records), "image_caption", folder.mean_aspect
            record = DatasetRecord(
                id=dataset_id or f"ds-{secrets.token_hex(8)}",
                name=upload.name,
                format=upload.format,
                num_records=num_records,
                size_bytes=upload.size,
                record_type=record_type,
                created_at=time.time(),
                bundled=bundled,
                owner=owner,
                mean_aspect=mean_aspect,
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

    def delete(self, dataset_id: str) -> DatasetRecord:
        """Remove a dataset: renamed out of the listing first (atomic), so a half-removed one never looks valid."""
        record = self.get(dataset_id)
        if record.bundled:
            raise FailedPrecondition(f"dataset {dataset_id!r} is a bundled sample; it cannot be deleted")
        doomed = self.root / f".deleting-{dataset_id}-{secrets.token_hex(4)}"
        try:
            os.rename(self.root / dataset_id, doomed)
        except FileNotFoundError:  # another call deleted it first
            raise NotFound(f"dataset {dataset_id!r} not found") from None
        shutil.rmtree(doomed, ignore_errors=True)
        return record

    def check_training_budget(self, record: DatasetRecord, resolution: int) -> None:
        """Refuse a diffusion job whose epoch would decode more pixels than `finetune.max_train_pixels`
        (each image is resized so its short side is `resolution`, so it grows with its aspect ratio)."""
        if record.kind != "diffusion":
            return
        pixels = round(record.num_records * resolution * resolution * record.mean_aspect)
        limit = self.limits.max_train_pixels
        if pixels > limit:
            raise ResourceExhausted(
                f"dataset {record.id!r} at resolution {resolution} is {pixels:,} pixels an epoch "
                f"({record.num_records} images, mean aspect {record.mean_aspect:.2f}); the limit is {limit:,} "
                "(finetune.max_train_pixels): lower the resolution or use fewer images"
            )

    def data_path(self, record: DatasetRecord) -> Path:
        return self.root / record.id / FORMATS[record.format]

    def open_data(self, record: DatasetRecord) -> BinaryIO:
        """The dataset's file for reading as uploaded; once open it reads whole even if deleted meanwhile."""
        try:
            return self.data_path(record).open("rb")
        except FileNotFoundError:  # deleted since `get`
            raise NotFound(f"dataset {record.id!r} not found") from None

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
