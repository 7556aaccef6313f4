"""Built-in ControlNets for tiny-sd, tiny-sdxl and tiny-flux: each a copy of its base's UNet encoder
(`from_unet`) or of its first transformer block (`FluxControlNetModel.from_transformer`), as ControlNet
training starts, with its zero-initialized outputs given small random weights so that a control image
visibly steers the random-weight base. Saved in diffusers format, loaded by the family's ControlNet class."""

from __future__ import annotations

from pathlib import Path

import torch

from shared.builtin import ensure_builtin, tiny_flux, tiny_sd, tiny_sdxl

# rebuilt with any base
BUILD_VERSION = f"1-sd{tiny_sd.BUILD_VERSION}-sdxl{tiny_sdxl.BUILD_VERSION}-flux{tiny_flux.BUILD_VERSION}"
BASES = {"tiny-controlnet-sd": "tiny-sd", "tiny-controlnet-sdxl": "tiny-sdxl", "tiny-controlnet-flux": "tiny-flux"}
SEED = 4325
ZERO_CONV_STD = 0.05


def build(name: str, out_dir: Path) -> None:
    from diffusers import ControlNetModel, UNet2DConditionModel

    models_dir = out_dir.parent.parent  # out_dir is a staging folder in <models_dir>/builtin
    base = ensure_builtin(BASES[name], models_dir)
    if name == "tiny-controlnet-flux":
        _build_flux(base, out_dir)
        return
    unet = UNet2DConditionModel.from_pretrained(base / "unet", use_safetensors=True)
    # one stride-2 stage in the image's embedding: the tiny VAE has 2x2 pixels a latent (SD's have 8x8, and three)
    controlnet = ControlNetModel.from_unet(unet, conditioning_channels=3, conditioning_embedding_out_channels=(16, 32))
    torch.manual_seed(SEED)
    with torch.no_grad():
        zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
        for conv in [*zero_convs, controlnet.controlnet_cond_embedding.conv_out]:
            conv.weight.normal_(0, ZERO_CONV_STD)
    controlnet.save_pretrained(out_dir, safe_serialization=True)


def _build_flux(base: Path, out_dir: Path) -> None:
    from diffusers import FluxControlNetModel, FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(base / "transformer", use_safetensors=True)
    config = transformer.config
    controlnet = FluxControlNetModel.from_transformer(
        transformer,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=config.attention_head_dim,
        num_attention_heads=config.num_attention_heads,
    )
    torch.manual_seed(SEED)
    with torch.no_grad():
        zero_linears = [*controlnet.controlnet_blocks, *controlnet.controlnet_single_blocks]
        for linear in [*zero_linears, controlnet.controlnet_x_embedder]:
            linear.weight.normal_(0, ZERO_CONV_STD)
    controlnet.save_pretrained(out_dir, safe_serialization=True)
