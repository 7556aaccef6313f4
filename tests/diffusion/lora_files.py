"""LoRA files as other tools write them, made in the tests from a peft LoRA by the documented key mapping
(docs/diffusion.md, "Community LoRAs"): Kohya / A1111 keys for UNet families, and Kohya's Flux keys in
Flux's original (BFL) block names, whose fused q/k/v layers carry the three LoRAs side by side."""

from __future__ import annotations

import re

import torch

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
# Flux's double-stream blocks only: Kohya names its single-stream blocks' fused layers at FLUX.1's own widths
FLUX_DOUBLE_ATTENTION = r"^transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0)$"


def random_lora(denoiser, seed: int, target_modules, rank: int = 4, alpha: int = 8) -> dict[str, torch.Tensor]:
    """A LoRA with random non-zero weights on `denoiser`; its peft state dict (keys as diffusers saves them)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules, init_lora_weights=False)
    denoiser.add_adapter(config)
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(denoiser).items()}
    denoiser.delete_adapters("default")
    return state


def kohya_unet(state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """`down_blocks.1.attentions.0...attn1.to_q.lora_A.weight` -> `lora_unet_down_blocks_1_..._to_q.lora_down.weight`
    (lora_B -> lora_up), with the scale as `<module>.alpha` (Kohya applies alpha / rank, as peft does)."""
    out = {}
    for key, tensor in state.items():
        module, _, part = key.rpartition(".lora_")
        stem = "lora_unet_" + module.replace(".", "_")
        out[f"{stem}.lora_down.weight" if part.startswith("A") else f"{stem}.lora_up.weight"] = tensor
        out[f"{stem}.alpha"] = torch.tensor(float(alpha))
    return out


def kohya_flux(state: dict[str, torch.Tensor], alpha: float, rank: int) -> dict[str, torch.Tensor]:
    """Double-stream block i's `attn.to_q/to_k/to_v` -> `lora_unet_double_blocks_i_img_attn_qkv`: the three
    downs stacked (rank 3r) and the three ups on the diagonal of one up, so it is exactly the three LoRAs;
    `attn.to_out.0` -> `..._img_attn_proj`."""
    blocks = sorted({int(m.group(1)) for k in state if (m := re.match(r"transformer_blocks\.(\d+)\.", k))})
    out = {}
    for i in blocks:
        prefix = f"transformer_blocks.{i}.attn"
        downs = [state[f"{prefix}.{p}.lora_A.weight"] for p in ("to_q", "to_k", "to_v")]
        ups = [state[f"{prefix}.{p}.lora_B.weight"] for p in ("to_q", "to_k", "to_v")]
        stem = f"lora_unet_double_blocks_{i}_img_attn_qkv"
        out[f"{stem}.lora_down.weight"] = torch.cat(downs)
        out[f"{stem}.lora_up.weight"] = torch.block_diag(*ups)
        out[f"{stem}.alpha"] = torch.tensor(float(alpha) * 3)  # alpha / (3 rank) = the peft LoRAs' alpha / rank
        stem = f"lora_unet_double_blocks_{i}_img_attn_proj"
        out[f"{stem}.lora_down.weight"] = state[f"{prefix}.to_out.0.lora_A.weight"]
        out[f"{stem}.lora_up.weight"] = state[f"{prefix}.to_out.0.lora_B.weight"]
        out[f"{stem}.alpha"] = torch.tensor(float(alpha))
    assert rank * 3 == out[f"lora_unet_double_blocks_{blocks[0]}_img_attn_qkv.lora_down.weight"].shape[0]
    return out


def save_peft_adapter(store_root, pipe, state: dict, name: str, base_model: str, rank: int = 4, alpha: int = 8):
    """`state` in diffusers' LoRA format for `pipe`'s family (its pipeline class's `save_lora_weights`, with the
    peft config, so alpha is kept), into the adapter store."""
    from peft import LoraConfig

    from shared.adapters import AdapterInfo, AdapterStore

    component = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    targets = sorted({key.rpartition(".lora_")[0].rpartition(".")[2] for key in state})
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets).to_dict()
    config["target_modules"] = sorted(config["target_modules"])

    def write(folder):
        type(pipe).save_lora_weights(
            folder, **{f"{component}_lora_layers": state, f"{component}_lora_adapter_metadata": config},
            safe_serialization=True,
        )  # fmt: skip

    AdapterStore(store_root).save(AdapterInfo(name=name, kind="diffusion", base_model=base_model), write)


def save_file_adapter(store_root, tensors: dict, name: str, base_model: str, key_format: str) -> None:
    """A LoRA file as downloaded, put into the adapter store as an operator would."""
    from safetensors.torch import save_file

    from shared.adapters import AdapterInfo, AdapterStore

    info = AdapterInfo(name=name, kind="diffusion", base_model=base_model, imported_format=key_format)
    AdapterStore(store_root).save(
        info, lambda folder: save_file(tensors, str(folder / "pytorch_lora_weights.safetensors"))
    )
