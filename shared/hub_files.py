"""Which files of a Hugging Face Hub repository the loaders read, so the prepare step downloads only those.

A hub repository often holds far more than one checkpoint: Stable Diffusion 1.5 has fp32, fp16 and non-EMA
weights per component, pickled `.bin` copies and single-file checkpoints at the top; Mistral repositories
hold `consolidated.safetensors` beside the transformers shards. `select_files` picks, from the repository's
file list (`HfApi().list_repo_files`), exactly what `shared.loaders` loads: configs, tokenizers and one set
of safetensors weights. Nothing here touches the network.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from shared.errors import InvalidArgument

HALF_VARIANT = "fp16"
HALF_DTYPES = ("float16", "bfloat16")

# `load_diffusion_pipeline` passes safety_checker=None and feature_extractor=None: their folders are not read
SKIPPED_COMPONENTS = frozenset({"safety_checker", "feature_extractor"})

# an LLM's top-level files besides its weights
LLM_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "chat_template.json",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
    }
)
LLM_SUFFIXES = (".jinja", ".tiktoken", ".model")  # chat templates, tiktoken and sentencepiece tokenizers
CHAT_TEMPLATES_DIR = "additional_chat_templates"  # transformers' extra named chat templates (*.jinja)
COMPONENT_SUFFIXES = (".json", ".txt", ".model")  # a pipeline component's config, scheduler and tokenizer files

# Safetensors weight names as transformers (`model`) and diffusers (`diffusion_pytorch_model`) write them,
# with an optional variant (`fp16`, `non_ema`, ...), the forms diffusers' `variant_compatible_siblings` reads:
#   model.safetensors, model.fp16.safetensors
#   model-00001-of-00002.safetensors, model.fp16-00001-of-00002.safetensors, model-00001-of-00002.fp16.safetensors
#   model.safetensors.index.json, model.safetensors.index.fp16.json, model.safetensors.fp16.index.json
_PREFIX = r"(?P<prefix>model|diffusion_pytorch_model)"
_SINGLE = re.compile(_PREFIX + r"(?:\.(?P<variant>\w+))?\.safetensors")
_SHARD = re.compile(_PREFIX + r"(?:\.(?P<variant>\w+))?-\d{5}-of-\d{5}(?:\.(?P<legacy>\w+))?\.safetensors")
_INDEX = re.compile(_PREFIX + r"\.safetensors(?:\.(?P<legacy>\w+))?\.index(?:\.(?P<variant>\w+))?\.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".onnx")


def select_files(
    files: Iterable[str],
    kind: str,
    variant: str | None = None,
    trust_remote_code: bool = False,
    model_index: dict[str, Any] | None = None,
) -> list[str]:
    """The files to download, sorted. `kind` is "llm", "embedding" or "diffusion"; `variant` (diffusion only,
    e.g. "fp16") picks each component's variant weights where it has them; `model_index` is the repository's
    model_index.json (without it, every component folder is taken). InvalidArgument if the loader could not
    load the repository."""
    files = sorted(set(files))
    if kind in ("llm", "embedding"):
        return _llm_files(files, trust_remote_code)
    if kind == "diffusion":
        return _diffusion_files(files, variant, trust_remote_code, model_index)
    if kind == "controlnet":  # one diffusers model folder: its config and safetensors weights
        weights = [f for f in files if re.fullmatch(r"diffusion_pytorch_model(\.fp16)?\.safetensors", f)]
        if not weights:
            raise InvalidArgument(
                "the repository has no diffusion_pytorch_model.safetensors at its top: not a ControlNet"
            )
        plain = [w for w in weights if ".fp16." not in w]
        return sorted(["config.json", (plain or weights)[0]])
    raise InvalidArgument(f"unknown model kind {kind!r}: expected llm, embedding, diffusion or controlnet")


def pick_variant(files: Iterable[str], dtype: str, model_index: dict[str, Any] | None = None) -> str | None:
    """The variant to download for an entry's dtype: fp16 for float16/bfloat16 when every weight component of
    the pipeline has fp16 safetensors; otherwise None (the full-precision weights, cast on load)."""
    if dtype not in HALF_DTYPES:
        return None
    by_folder = _by_folder(files)
    weighted = [c for c in _components(by_folder, model_index) if _has_weights(by_folder.get(c, []))]
    if weighted and all(_weights(by_folder[c], HALF_VARIANT) for c in weighted):
        return HALF_VARIANT
    return None


def prepared_variant(folder: Path) -> str | None:
    """The variant `from_pretrained` must be given to load a prepared pipeline folder: the one its components
    hold when some of them have no non-variant weights (prepare downloaded only the fp16 files), else None."""
    files = [p.relative_to(folder).as_posix() for p in folder.glob("*/*") if p.is_file()]
    found = [_variants(names) for names in _by_folder(files).values()]
    lacking = [variants for variants in found if variants and None not in variants]
    if not lacking:
        return None
    common = set.intersection(*lacking)
    return HALF_VARIANT if HALF_VARIANT in common else min(common, default=None)


def _llm_files(files: list[str], trust_remote_code: bool) -> list[str]:
    top = [f for f in files if "/" not in f]
    weights = _weights(top, None)
    if not weights:
        raise InvalidArgument(
            "the repository has no transformers safetensors weights (model.safetensors or "
            "model.safetensors.index.json); ModelWorks loads safetensors only"
        )
    extra = [f for f in top if f in LLM_FILES or f.endswith(LLM_SUFFIXES) or (trust_remote_code and f.endswith(".py"))]
    templates = [f for f in files if f.startswith(f"{CHAT_TEMPLATES_DIR}/") and f.endswith(".jinja")]
    return sorted({*weights, *extra, *templates})


def _diffusion_files(
    files: list[str], variant: str | None, trust_remote_code: bool, model_index: dict[str, Any] | None
) -> list[str]:
    if "model_index.json" not in files:
        raise InvalidArgument("the repository is not a diffusers pipeline (it has no model_index.json)")
    by_folder = _by_folder(files)
    selected = ["model_index.json"]
    if trust_remote_code:  # a custom pipeline's code sits at the top
        selected += [f for f in by_folder.get("", []) if f.endswith(".py")]
    for component in _components(by_folder, model_index):
        names = by_folder.get(component, [])
        weights = _weights(names, variant) or _weights(names, None)
        if not weights and _has_weights(names):
            raise InvalidArgument(f"the pipeline's {component} has no safetensors weights; ModelWorks loads only those")
        selected += weights
        indexes = {f for f, _ in _matches(_INDEX, names)}
        selected += [f for f in names if f.endswith(COMPONENT_SUFFIXES) and f not in indexes]
        if trust_remote_code:
            selected += [f for f in names if f.endswith(".py")]
    return sorted(set(selected))


def _by_folder(files: Iterable[str]) -> dict[str, list[str]]:
    """Files by their folder ("" for the top level); deeper files are not read by a pipeline and are left out."""
    folders: dict[str, list[str]] = {}
    for f in files:
        parts = f.split("/")
        if len(parts) <= 2:
            folders.setdefault(parts[0] if len(parts) == 2 else "", []).append(f)
    return folders


def _components(by_folder: dict[str, list[str]], model_index: dict[str, Any] | None) -> list[str]:
    """The component folders the pipeline loads: those model_index.json names with a library and class
    (`[null, null]` marks an absent one), less the skipped ones."""
    if model_index is None:
        names = [folder for folder in by_folder if folder]
    else:
        names = [
            name
            for name, value in model_index.items()
            if not name.startswith("_") and isinstance(value, list) and len(value) == 2 and all(value)
        ]
    return sorted(name for name in names if name not in SKIPPED_COMPONENTS)


def _weights(names: list[str], variant: str | None) -> list[str]:
    """One set of safetensors weights of `variant` (None: the plain ones) among one folder's files: the single
    file, else the index and its shards; [] if there are none."""
    single = [f for f, match in _matches(_SINGLE, names) if _variant(match) == variant]
    if single:
        return single
    indexes = {f: match["prefix"] for f, match in _matches(_INDEX, names) if _variant(match) == variant}
    shards = [
        f for f, match in _matches(_SHARD, names) if _variant(match) == variant and match["prefix"] in indexes.values()
    ]
    return [*indexes, *shards] if shards else []


def _variants(names: list[str]) -> set[str | None]:
    """The variants (None: plain) that one folder's files hold a whole set of safetensors weights of."""
    found = {_variant(match) for pattern in (_SINGLE, _SHARD, _INDEX) for _, match in _matches(pattern, names)}
    return {variant for variant in found if _weights(names, variant)}


def _matches(pattern: re.Pattern[str], names: list[str]) -> list[tuple[str, re.Match[str]]]:
    return [(f, match) for f in names if (match := pattern.fullmatch(f.rsplit("/", 1)[-1]))]


def _variant(match: re.Match[str]) -> str | None:
    groups = match.groupdict()
    return groups.get("variant") or groups.get("legacy")


def _has_weights(names: list[str]) -> bool:
    return any(f.endswith(_WEIGHT_SUFFIXES) for f in names)
