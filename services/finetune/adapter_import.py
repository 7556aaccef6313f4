"""Importing a diffusion LoRA file made elsewhere: diffusers' own format, or Kohya / A1111 keys as Civitai
serves them, or Flux's original (BFL) key names.

The file is streamed into a staging folder and checked without loading a tensor: its safetensors header is
read, every tensor must lie inside the file, and its keys must be of a format diffusers' LoRA converters take
(anything else is refused with the keys that were found). The diffusion service converts it when it first
loads it, and checks then that it matches the base model's layers. Never imports torch.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

from services.finetune.staging import StagedUpload
from shared.errors import InvalidArgument

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the name the diffusion service loads
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit

# key format -> what its tensor names look like (the whole name)
_FORMATS = {
    "diffusers": re.compile(r"^(unet|transformer|text_encoder(_2)?)\..*lora.*\.weight$"),
    "kohya": re.compile(r"^lora_(unet|te\d?)_\w+\.(lora_down\.weight|lora_up\.weight|alpha|dora_scale)$"),
    "flux-original": re.compile(
        r"^(diffusion_model\.)?(double_blocks|single_blocks|final_layer|img_in|txt_in|time_in|vector_in|guidance_in)"
        r"\..+\.(lora_A|lora_B|lora_down|lora_up|down|up)(\.weight)?$"
    ),
}
_EXTRA_OK = re.compile(r"^(.+\.alpha|.+\.dora_scale|__metadata__)$")  # scales that ride along with any format


class AdapterImport(StagedUpload):
    """A streamed LoRA file in a staging folder: `write` chunks, then check its keys."""

    def __init__(self, root: Path, limit: int):
        super().__init__(root, LORA_WEIGHTS, limit, "finetune.max_adapter_import_bytes")


def tensor_names(path: Path) -> list[str]:
    """The tensors of a safetensors file, read from its header; InvalidArgument for anything else, or for a
    tensor whose bytes lie outside the file (a truncated download)."""
    size = path.stat().st_size
    with path.open("rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise InvalidArgument("the file is not a safetensors file (too short); send the .safetensors LoRA file")
        (header_bytes,) = struct.unpack("<Q", prefix)
        if not 2 <= header_bytes <= min(MAX_HEADER_BYTES, size - 8):
            raise InvalidArgument("the file is not a safetensors file (no valid header); .ckpt and .pt are not taken")
        try:
            header = json.loads(file.read(header_bytes))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidArgument("the file's safetensors header is not valid JSON") from exc
    if not isinstance(header, dict):
        raise InvalidArgument("the file's safetensors header is not a table of tensors")
    data_bytes = size - 8 - header_bytes
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        valid = isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
        if not (valid and 0 <= offsets[0] <= offsets[1] <= data_bytes):
            raise InvalidArgument(
                f"tensor {name!r} lies outside the file: it is truncated or damaged; download it again"
            )
    return [name for name in header if name != "__metadata__"]


def lora_format(names: list[str]) -> str:
    """The key format of a LoRA file's tensors; InvalidArgument, with what was found, for any other."""
    weights = [n for n in names if not _EXTRA_OK.match(n)]
    if not weights:
        raise InvalidArgument("the file holds no LoRA weights")
    for name, pattern in _FORMATS.items():
        if all(pattern.match(n) for n in weights):
            return name
    unmatched = [n for n in weights if not any(p.match(n) for p in _FORMATS.values())]
    if not unmatched:
        mixed = sorted({name for n in weights for name, p in _FORMATS.items() if p.match(n)})
        raise InvalidArgument(f"the file mixes LoRA key formats ({', '.join(mixed)}); a file holds one")
    shown = ", ".join(sorted(unmatched)[:3])
    raise InvalidArgument(
        f"{len(unmatched)} of the file's {len(weights)} LoRA tensors match no format served here (diffusers, "
        f"Kohya/A1111 lora_unet_/lora_te_ keys, or Flux's original names); found e.g. {shown}"
    )
