"""The adapter store: named LoRA adapters in PEFT format under `<data dir>/adapters/<name>/`.

Each adapter folder holds `adapter_config.json`, `adapter_model.safetensors` and `modelworks.json`
(kind, base model, job id, creation time, final metrics). Adapters are written into a temporary folder
and renamed into place, so readers see a whole adapter or none; names are validated so no name can
reach outside the store.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shared.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

log = logging.getLogger(__name__)

METADATA_FILE = "modelworks.json"
ADAPTER_NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,62}[A-Za-z0-9])?$")
ADAPTER_NAME_RULE = "1-64 letters, digits, '.', '_' or '-', starting and ending with a letter or digit"


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    kind: str  # "llm" or "diffusion"
    base_model: str
    method: str = "lora"  # lora, dora, rslora or p_tuning
    job_id: str = ""
    created_at: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    # A new id each time an adapter is saved: a name deleted and saved again gets a new version, so the
    # serving caches can tell a replaced adapter from the one they hold.
    version: str = ""
    owner: str = ""  # the name of the API key whose job made it ("local" with no keys configured)
    # How its base was held in training: "bnb-nf4" for QLoRA. It serves on the base model however that is
    # loaded; a base served unquantized gives slightly different outputs (docs/quantization.md).
    quantization: str = "none"
    imported_format: str = ""  # an imported LoRA file's key format (kohya, ...); empty: trained here


def validate_adapter_name(name: str) -> str:
    if not ADAPTER_NAME_RE.match(name) or ".." in name:
        raise InvalidArgument(f"invalid adapter name {name!r}: use {ADAPTER_NAME_RULE}")
    return name


def check_fits(info: AdapterInfo, kind: str, base_model_names: tuple[str, ...]) -> AdapterInfo:
    """`info`, if it is of `kind` and was trained on one of `base_model_names` (a model's name and source)."""
    if info.kind != kind:
        raise FailedPrecondition(f"adapter {info.name!r} is for {info.kind} models, not {kind} models")
    if info.base_model not in base_model_names:
        raise FailedPrecondition(
            f"adapter {info.name!r} was trained on base model {info.base_model!r}; "
            f"use it with that model, not {base_model_names[0]!r}"
        )
    return info


class AdapterStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, name: str) -> Path:
        return self.root / validate_adapter_name(name)

    def get(self, name: str) -> AdapterInfo:
        """The adapter's metadata; NotFound when no complete adapter has that name."""
        meta_path = self.path(name) / METADATA_FILE
        try:
            with meta_path.open("rb") as file:
                meta = json.load(file)
                identity = os.fstat(file.fileno())
        except FileNotFoundError:
            raise NotFound(f"adapter {name!r} not found in the adapter store") from None
        except (OSError, ValueError):
            raise FailedPrecondition(f"adapter {name!r} has unreadable metadata; save it again") from None
        if not isinstance(meta, dict):
            raise FailedPrecondition(f"adapter {name!r} has unreadable metadata; save it again")
        fields = {k: v for k, v in meta.items() if k in AdapterInfo.__dataclass_fields__ and k != "name"}
        if not fields.get("version"):  # written before versions existed: the file's identity stands in
            fields["version"] = f"{identity.st_ino}-{identity.st_mtime_ns}"
        try:
            return AdapterInfo(name=name, **fields)
        except TypeError:
            raise FailedPrecondition(f"adapter {name!r} has unreadable metadata; save it again") from None

    def get_for(self, name: str, kind: str, base_model_names: tuple[str, ...]) -> AdapterInfo:
        """The adapter's metadata, checked to be of `kind` and trained on one of `base_model_names`."""
        return check_fits(self.get(name), kind, base_model_names)

    def list(self) -> list[AdapterInfo]:
        """Every readable adapter; one with broken metadata is skipped (and logged), not fatal to the list."""
        if not self.root.is_dir():
            return []
        found = []
        for child in sorted(self.root.iterdir()):
            if child.is_dir() and ADAPTER_NAME_RE.match(child.name) and (child / METADATA_FILE).exists():
                try:
                    found.append(self.get(child.name))
                except (NotFound, FailedPrecondition) as exc:  # deleted meanwhile, or unreadable
                    log.warning("adapter skipped in listing", extra={"adapter": child.name, "reason": exc.message})
        return found

    def save(self, info: AdapterInfo, write: Callable[[Path], None]) -> Path:
        """Write an adapter atomically: `write(folder)` fills a staging folder that is renamed into place."""
        target = self.path(info.name)
        if target.exists():
            raise AlreadyExists(f"adapter {info.name!r} already exists; choose another name or delete it first")
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{info.name}-", dir=self.root))
        try:
            write(staging)
            meta = asdict(info) | {"created_at": info.created_at or time.time(), "version": uuid.uuid4().hex}
            del meta["name"]
            (staging / METADATA_FILE).write_text(json.dumps(meta, indent=2))
            try:
                os.rename(staging, target)  # atomic; fails if another writer got there first
            except OSError:
                if target.exists():
                    raise AlreadyExists(f"adapter {info.name!r} already exists") from None
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target

    def delete(self, name: str) -> None:
        target = self.path(name)
        if not target.exists():
            raise NotFound(f"adapter {name!r} not found in the adapter store")
        # rename first so readers never see a half-deleted adapter
        doomed = Path(tempfile.mkdtemp(prefix=f".deleting-{name}-", dir=self.root))
        os.rename(target, doomed / name)
        shutil.rmtree(doomed, ignore_errors=True)
