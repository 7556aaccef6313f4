"""Where a configured model's files are, and what its config files say, without importing torch.

`pretrained_location` is what `from_pretrained` reads (building a built-in model on first use); the
fine-tune API, which must stay free of torch, uses `prepared_folder` and `read_json` to check a job
against a base model's architecture before any worker sees it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from shared import gguf
from shared.builtin import builtin_dir, ensure_builtin
from shared.errors import FailedPrecondition
from shared.registry import parse_source
from shared.settings import ModelEntry, Settings

# A model folder may say which fine-tuning defaults suit it (the built-in random-weight models do):
# {"learning_rate": ..., "epochs": ..., "<method>": {...overrides for that method}}
TRAINING_DEFAULTS_FILE = "modelworks-training.json"


def pretrained_location(entry: ModelEntry, settings: Settings) -> tuple[str, dict[str, Any]]:
    """Where `from_pretrained` reads the entry's weights, with the keyword arguments that go with it."""
    source = parse_source(entry.source)
    kwargs: dict[str, Any] = {"trust_remote_code": entry.trust_remote_code}
    if gguf.is_gguf(entry):  # converted by the prepare step; serving never converts
        return str(gguf.converted_folder(entry, settings)), kwargs
    if source.kind == "builtin":
        return str(ensure_builtin(source.ref, settings.models_dir)), kwargs
    if source.kind == "local":
        if not Path(source.ref).is_dir():
            raise FileNotFoundError(f"model {entry.name!r}: {source.ref} is not a directory")
        return source.ref, kwargs
    kwargs["revision"] = source.revision
    kwargs["local_files_only"] = not settings.allow_downloads
    return source.ref, kwargs


def prepared_folder(entry: ModelEntry, settings: Settings) -> Path:
    """The local folder of an already prepared model; FailedPrecondition if it is not there yet."""
    source = parse_source(entry.source)
    if gguf.is_gguf(entry):
        folder = gguf.converted_folder(entry, settings)
    elif source.kind == "builtin":
        folder = builtin_dir(source.ref, settings.models_dir)
    elif source.kind == "local":
        folder = Path(source.ref)
    else:
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(source.ref, revision=source.revision, local_files_only=True))
        except Exception:
            folder = Path("/nonexistent")
    if not folder.is_dir():
        raise FailedPrecondition(
            f"model {entry.name!r} is not prepared on this host; run `python -m shared.models prepare` first"
        )
    return folder


def read_json(folder: Path, name: str) -> dict[str, Any]:
    """A config file of a model folder ({} when absent)."""
    path = folder / name
    return json.loads(path.read_text()) if path.is_file() else {}
