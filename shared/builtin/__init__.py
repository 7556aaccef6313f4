"""Built-in models: built offline from small configs, saved in Hugging Face format, loaded like any other.

`ensure_builtin` builds a model once into `<models_dir>/builtin/<name>` (into a temporary folder renamed
into place, so a half-built model is never seen) and returns its folder. A file lock makes processes that
share a data dir (`make run` starts several services at once, replicas share a volume) build it once
between them: the others wait for it. A model built by an older recipe (its `BUILD_VERSION` changed) is
built again.
"""

from __future__ import annotations

import fcntl
import importlib
import shutil
import tempfile
from pathlib import Path

from shared.errors import NotFound

# builtin name -> module that has `build(name, out_dir)`
_BUILDERS = {
    "tiny-llm": "shared.builtin.tiny_llm",
    "llm-100m": "shared.builtin.tiny_llm",
    "tiny-sd": "shared.builtin.tiny_sd",
    "tiny-sdxl": "shared.builtin.tiny_sdxl",
    "tiny-sd3": "shared.builtin.tiny_sd3",
    "tiny-flux": "shared.builtin.tiny_flux",
    "tiny-controlnet-sd": "shared.builtin.tiny_controlnet",
    "tiny-controlnet-sdxl": "shared.builtin.tiny_controlnet",
    "tiny-controlnet-flux": "shared.builtin.tiny_controlnet",
    "tiny-embed": "shared.builtin.tiny_embed",
}


def builtin_names() -> list[str]:
    return sorted(_BUILDERS)


def builtin_dir(name: str, models_dir: Path) -> Path:
    return models_dir / "builtin" / name


BUILD_STAMP = "modelworks-builtin.json"


def _build_version(name: str) -> str:
    return str(getattr(importlib.import_module(_BUILDERS[name]), "BUILD_VERSION", 1))


def _is_current(target: Path, version: str) -> bool:
    stamp = target / BUILD_STAMP
    return stamp.exists() and stamp.read_text().strip() == version


def ensure_builtin(name: str, models_dir: Path) -> Path:
    if name not in _BUILDERS:
        raise NotFound(f"unknown built-in model {name!r}; built-in models are: {', '.join(builtin_names())}")
    target = builtin_dir(name, models_dir)
    version = _build_version(name)
    if _is_current(target, version):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with (target.parent / f".{name}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it: wait for it
        if not _is_current(target, version):
            _build(name, target, version)
    return target


def _build(name: str, target: Path, version: str) -> None:
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        importlib.import_module(_BUILDERS[name]).build(name, staging)
        (staging / BUILD_STAMP).write_text(version)
        if target.exists():  # an older build: move it aside, then replace it
            old = Path(tempfile.mkdtemp(prefix=f".{name}-old-", dir=target.parent))
            target.rename(old / name)
            shutil.rmtree(old, ignore_errors=True)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
