"""GGUF checkpoints (llama.cpp, Ollama): dequantized once, on the prepare step, into a Hugging Face folder.

A model entry's GGUF is a local file (`gguf:<path>`), a file inside an installed Python package
(`gguf:package:<package>/<file>`, found through the package, never a typed path), or a file of a hub
repository (`hf:<repo>` with `gguf_file: <name>`). `python -m shared.models prepare` reads it with
transformers (`gguf_file=`), copies the dequantized weights into a model built from its config (the
dequantized model itself refuses `save_pretrained`) and saves safetensors, tokenizer and chat template
under `<models dir>/gguf/<first 16 hex digits of the file's SHA-256>/`, in float16 (GGUF block scales are
float16). Serving loads that folder with `from_pretrained` like any other and never converts. Keyed by
content, a changed file is converted again, and the same file named two ways is converted once.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import shutil
import tempfile
from pathlib import Path

from shared.errors import FailedPrecondition, InvalidArgument, NotFound
from shared.settings import ModelEntry, Settings

log = logging.getLogger(__name__)

STAMP = "modelworks-gguf.json"
PACKAGE_PREFIX = "package:"


def is_gguf(entry: ModelEntry) -> bool:
    return entry.source.startswith("gguf:") or bool(entry.gguf_file)


def converted_dir(entry: ModelEntry, settings: Settings, download: bool = False) -> Path:
    return settings.models_dir / "gguf" / sha256(locate(entry, download))[:16]


def converted_folder(entry: ModelEntry, settings: Settings) -> Path:
    """The prepared folder serving loads; FailedPrecondition until `prepare` made it."""
    try:
        folder = converted_dir(entry, settings)
    except NotFound as exc:
        raise FailedPrecondition(exc.message) from None
    if not (folder / STAMP).is_file():
        raise FailedPrecondition(
            f"model {entry.name!r} is a GGUF checkpoint that has not been converted yet; run "
            "`python -m shared.models prepare` (`make models`) first"
        )
    return folder


def locate(entry: ModelEntry, download: bool = False) -> Path:
    """The entry's .gguf file (a hub file is downloaded only with `download`: on the prepare step)."""
    ref = entry.source.removeprefix("gguf:")
    if entry.source.startswith("hf:"):
        from huggingface_hub import hf_hub_download

        repo, _, revision = entry.source[3:].partition("@")
        try:
            return Path(
                hf_hub_download(repo, entry.gguf_file, revision=revision or None, local_files_only=not download)
            )
        except Exception:
            raise NotFound(f"model {entry.name!r}: {entry.gguf_file} of {repo} is not downloaded yet") from None
    if ref.startswith(PACKAGE_PREFIX):
        package, _, name = ref[len(PACKAGE_PREFIX) :].partition("/")
        spec = importlib.util.find_spec(package) if package else None  # finds it without importing it
        if spec is None or not spec.submodule_search_locations:
            raise NotFound(f"model {entry.name!r}: the Python package {package!r} is not installed")
        path = Path(next(iter(spec.submodule_search_locations))) / name
    else:
        path = Path(ref).expanduser()
    if not path.is_file():
        raise NotFound(f"model {entry.name!r}: no GGUF file at {path}")
    return path


_digests: dict[tuple, str] = {}


def sha256(path: Path) -> str:
    """The file's SHA-256 (remembered per path, size and modification time: services ask on every job)."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _digests:
        digest = hashlib.sha256()
        with path.open("rb") as file:
            while block := file.read(1 << 22):
                digest.update(block)
        _digests[key] = digest.hexdigest()
    return _digests[key]


def supported_architectures() -> list[str]:
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    return sorted(a for a in GGUF_CONFIG_MAPPING if a not in ("general", "tokenizer"))


def architecture(path: Path) -> str:
    """`general.architecture` of a GGUF file; InvalidArgument if it is not a readable GGUF file."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(path).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except Exception:
        raise InvalidArgument(f"{path.name} is not a readable GGUF file (truncated or not GGUF)") from None


def prepare(entry: ModelEntry, settings: Settings) -> Path:
    """Convert the entry's GGUF file unless the folder already holds this exact file's conversion."""
    path = locate(entry, download=True)
    arch = architecture(path)
    supported = supported_architectures()
    if arch not in supported:
        raise InvalidArgument(
            f"model {entry.name!r}: transformers cannot read {arch!r} GGUF files; supported: {', '.join(supported)}"
        )
    digest = sha256(path)
    target = settings.models_dir / "gguf" / digest[:16]
    if _converted_from(target) == digest:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with (target.parent / f".{target.name}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be converting it
        if _converted_from(target) != digest:
            _convert(path, target, digest, arch)
    return target


def _converted_from(folder: Path) -> str | None:
    try:
        return json.loads((folder / STAMP).read_text())["sha256"]
    except (OSError, ValueError, KeyError):
        return None


def _convert(path: Path, target: Path, digest: str, arch: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting a GGUF checkpoint", extra={"file": path.name, "architecture": arch})
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        folder, name = str(path.parent), path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        dequantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights are plain tensors from here on
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
        model.load_state_dict(dequantized.state_dict())
        model.generation_config = dequantized.generation_config
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / STAMP).write_text(json.dumps({"source": name, "sha256": digest, "architecture": arch}))
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=target.parent))
            target.rename(old / target.name)
            shutil.rmtree(old, ignore_errors=True)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
