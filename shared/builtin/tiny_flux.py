"""Built-in Flux: a tiny Flux transformer with distilled guidance, a CLIP and a T5 encoder, random weights.

Shaped as diffusers' own Flux tests build theirs (2x2 latent patches packed into tokens, rotary axes, a
guidance embedding as FLUX.1-dev has), saved in diffusers format and loaded by `from_pretrained` like
black-forest-labs/FLUX.1-dev. 64x64 images by default (set in its model entry: Flux's own default is 1024).
"""

from __future__ import annotations

from pathlib import Path

import torch

from shared.builtin.text_encoders import (
    clip_text_encoder,
    save_builtin_pipeline,
    t5_encoder,
    t5_tokenizer,
    tiny_vae,
    train_clip_tokenizer,
)

BUILD_VERSION = 1
TRAINING_DEFAULTS = {"learning_rate": 1e-3}
SEED = 4324
LATENT_CHANNELS = 4


def build(name: str, out_dir: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tokenizer, tokenizer_2 = train_clip_tokenizer(), t5_tokenizer()
    torch.manual_seed(SEED)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=LATENT_CHANNELS * 4,  # a packed 2x2 patch of latents per token
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=[4, 4, 8],
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096
    )
    pipe = FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=tiny_vae(LATENT_CHANNELS, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=clip_text_encoder(tokenizer),
        tokenizer=tokenizer,
        text_encoder_2=t5_encoder(tokenizer_2),
        tokenizer_2=tokenizer_2,
    )
    save_builtin_pipeline(pipe, out_dir, TRAINING_DEFAULTS)
