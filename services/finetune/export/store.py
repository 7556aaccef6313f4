"""The export store: adapters written out as merged models or GGUF files, under `<data dir>/exports/<name>/`.

Each export folder holds its files and `export.json` (what was exported, from which adapter and base, in which
format, by whom). An export is written into a staging folder and renamed into place, so a reader sees a whole
export or none, and an export that fails or is interrupted leaves nothing behind. Torch-free: the API lists,
reads and deletes exports; `services.finetune.export` writes them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shared.adapters import ADAPTER_NAME_RE, ADAPTER_NAME_RULE
from shared.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

METADATA_FILE = "export.json"


@dataclass(frozen=True)
class ExportInfo:
    name: str
    adapter: str
    base_model: str
    format: str  # merged (a Hugging Face folder in safetensors) or gguf
    dtype: str = ""  # merged: the weights' dtype
    gguf_type: str = ""  # gguf: F16, BF16 or Q8_0
    method: str = ""  # the adapter's method
    created_at: float = 0.0
    owner: str = ""
    files: dict[str, int] = field(default_factory=dict)  # relative path -> bytes

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())


def validate_export_name(name: str) -> str:
    if not ADAPTER_NAME_RE.match(name) or ".." in name:
        raise InvalidArgument(f"invalid export name {name!r}: use {ADAPTER_NAME_RULE}")
    return name


class ExportStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, name: str) -> Path:
        return self.root / validate_export_name(name)

    def get(self, name: str) -> ExportInfo:
        try:
            meta = json.loads((self.path(name) / METADATA_FILE).read_text())
        except FileNotFoundError:
            raise NotFound(f"export {name!r} not found") from None
        except (OSError, ValueError):
            raise FailedPrecondition(f"export {name!r} has unreadable metadata; delete it and export again") from None
        known = ExportInfo.__dataclass_fields__
        return ExportInfo(**{k: v for k, v in meta.items() if k in known and k != "name"}, name=name)

    def list(self) -> list[ExportInfo]:
        if not self.root.is_dir():
            return []
        found = []
        for child in sorted(self.root.iterdir()):
            if child.is_dir() and ADAPTER_NAME_RE.match(child.name) and (child / METADATA_FILE).is_file():
                try:
                    found.append(self.get(child.name))
                except (NotFound, FailedPrecondition):  # deleted meanwhile, or unreadable
                    continue
        return found

    def open_file(self, name: str, relative: str):
        """One file of an export, opened for reading; NOT_FOUND for a name it does not list."""
        info = self.get(name)
        if relative not in info.files:
            listed = ", ".join(sorted(info.files))
            raise NotFound(f"export {name!r} has no file {relative!r}; its files: {listed}")
        return (self.path(name) / relative).open("rb")

    def require_free(self, name: str) -> None:
        if self.path(name).exists():
            raise AlreadyExists(f"export {name!r} already exists; choose another name or delete it first")

    @contextmanager
    def writing(self, info: ExportInfo) -> Iterator[Path]:
        """A staging folder to write the export's files into; on a clean exit it is listed in `export.json`
        and renamed into place (AlreadyExists if the name was taken meanwhile), else removed."""
        target = self.path(info.name)
        self.require_free(info.name)
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{info.name}-", dir=self.root))
        try:
            yield staging
            files = {str(p.relative_to(staging)): p.stat().st_size for p in sorted(staging.rglob("*")) if p.is_file()}
            meta = asdict(info) | {"created_at": info.created_at or time.time(), "files": files}
            del meta["name"]
            (staging / METADATA_FILE).write_text(json.dumps(meta, indent=2))
            try:
                os.rename(staging, target)
            except OSError:
                if target.exists():
                    raise AlreadyExists(f"export {info.name!r} already exists") from None
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def delete(self, name: str) -> None:
        target = self.path(name)
        if not target.exists():
            raise NotFound(f"export {name!r} not found")
        doomed = Path(tempfile.mkdtemp(prefix=f".deleting-{name}-", dir=self.root))
        os.rename(target, doomed / name)
        shutil.rmtree(doomed, ignore_errors=True)
