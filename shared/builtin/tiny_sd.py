"""Built-in Stable Diffusion: a tiny UNet, VAE and CLIP text encoder with random weights.

Made offline and deterministically (fixed seed) from small configs, with a real CLIP-style BPE tokenizer
trained on the Python standard library's source. Saved as a diffusers pipeline folder, so it loads with
`StableDiffusionPipeline.from_pretrained` exactly like a real checkpoint. 64×64 images by default.
"""

from __future__ import annotations

from pathlib import Path

import torch

from shared.builtin.text_encoders import save_builtin_pipeline, tiny_vae, train_clip_tokenizer

BUILD_VERSION = 2  # bump when the recipe changes, so existing data dirs rebuild it
# Fine-tuning defaults for jobs on this random-weight model (see shared.locations.TRAINING_DEFAULTS_FILE)
TRAINING_DEFAULTS = {"learning_rate": 1e-3}

SEED = 4321


def build(name: str, out_dir: Path) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = train_clip_tokenizer()
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=2,
    )
    vae = tiny_vae(4)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=5,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    save_builtin_pipeline(pipe, out_dir, TRAINING_DEFAULTS)
