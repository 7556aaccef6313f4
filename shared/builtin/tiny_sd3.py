"""Built-in SD3: a tiny MMDiT transformer, two projected CLIP encoders and a T5 encoder, random weights.

Shaped as diffusers' own SD3 tests build theirs, with flow matching (`FlowMatchEulerDiscreteScheduler`),
saved in diffusers format and loaded by `from_pretrained` like stabilityai/stable-diffusion-3.5-medium.
64x64 images by default.
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
SEED = 4323
T5_DIM = 64  # the joint attention width: both CLIPs' hidden states (2 x 32) are padded to it


def build(name: str, out_dir: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer, tokenizer_3 = train_clip_tokenizer(), t5_tokenizer()
    torch.manual_seed(SEED)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=T5_DIM,
        pooled_projection_dim=64,  # both CLIPs' projected pooled outputs side by side
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(16, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=clip_text_encoder(tokenizer, projection_dim=32),
        tokenizer=tokenizer,
        text_encoder_2=clip_text_encoder(tokenizer, projection_dim=32),
        tokenizer_2=tokenizer,
        text_encoder_3=t5_encoder(tokenizer_3, d_model=T5_DIM),
        tokenizer_3=tokenizer_3,
    )
    save_builtin_pipeline(pipe, out_dir, TRAINING_DEFAULTS)
