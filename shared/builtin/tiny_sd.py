"""Built-in Stable Diffusion: a tiny UNet, VAE and CLIP text encoder with random weights.

Made offline and deterministically (fixed seed) from small configs, with a real CLIP-style BPE tokenizer
trained on the Python standard library's source. Saved as a diffusers pipeline folder, so it loads with
`StableDiffusionPipeline.from_pretrained` exactly like a real checkpoint. 64×64 images by default.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

from shared.builtin.corpus import stdlib_corpus
from shared.locations import TRAINING_DEFAULTS_FILE

BUILD_VERSION = 2  # bump when the recipe changes, so existing data dirs rebuild it
# Fine-tuning defaults for jobs on this random-weight model (see shared.locations.TRAINING_DEFAULTS_FILE)
TRAINING_DEFAULTS = {"learning_rate": 1e-3}

SEED = 4321
VOCAB_SIZE = 2048
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's own normalizer and pre-tokenizer (as transformers' CLIPTokenizer builds them)
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def train_clip_tokenizer():
    """A CLIP tokenizer whose vocab covers every byte (with and without `</w>`), so nothing is unknown."""
    from transformers import CLIPTokenizer

    tokenizer = Tokenizer(models.BPE(unk_token=EOS, end_of_word_suffix="</w>"))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[BOS, EOS],
        end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(stdlib_corpus(), trainer=trainer)
    model = json.loads(tokenizer.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        for token in (char, char + "</w>"):
            vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build(name: str, out_dir: Path) -> None:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
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
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=2,
    )
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
    pipe.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / TRAINING_DEFAULTS_FILE).write_text(json.dumps(TRAINING_DEFAULTS))
