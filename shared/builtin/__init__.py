"""Built-in models: built offline from small configs, saved in Hugging Face format, loaded like any other.

`ensure_builtin` builds a model once into `<models_dir>/builtin/<name>` (into a temporary folder renamed
into place, so a half-built model is never seen) and returns its folder.
"""

from __future__ import annotations

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
}


def builtin_names() -> list[str]:
    return sorted(_BUILDERS)


def builtin_dir(name: str, models_dir: Path) -> Path:
    return models_dir / "builtin" / name


def ensure_builtin(name: str, models_dir: Path) -> Path:
    if name not in _BUILDERS:
        raise NotFound(f"unknown built-in model {name!r}; built-in models are: {', '.join(builtin_names())}")
    target = builtin_dir(name, models_dir)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        importlib.import_module(_BUILDERS[name]).build(name, staging)
        try:
            staging.rename(target)
        except OSError:
            if not target.exists():  # not a lost race with another builder
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
