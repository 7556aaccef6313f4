"""Built-in SDXL: a tiny UNet with SDXL's size and crop conditioning, two CLIP text encoders, random weights.

Shaped as diffusers' own SDXL tests build theirs (the second encoder's projected pooled output and six
time ids feed the UNet's added embedding), saved in diffusers format and loaded by `from_pretrained` like
stabilityai/stable-diffusion-xl-base-1.0. 64x64 images by default.
"""

from __future__ import annotations

from pathlib import Path

import torch

from shared.builtin.text_encoders import clip_text_encoder, save_builtin_pipeline, tiny_vae, train_clip_tokenizer

BUILD_VERSION = 1
TRAINING_DEFAULTS = {"learning_rate": 1e-3}
SEED = 4322
TIME_EMBED_DIM = 8


def build(name: str, out_dir: Path) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer = train_clip_tokenizer()
    torch.manual_seed(SEED)
    text_encoder = clip_text_encoder(tokenizer)
    text_encoder_2 = clip_text_encoder(tokenizer, projection_dim=32)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + 32,  # six time ids + the pooled text
        cross_attention_dim=64,  # both encoders' hidden states side by side
        norm_num_groups=2,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(4),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
    )
    save_builtin_pipeline(pipe, out_dir, TRAINING_DEFAULTS)
