"""Tiny text encoders and their tokenizers for the built-in diffusion models, built offline.

CLIP (with or without its projection, as SDXL, SD3 and Flux use them) and T5's encoder (SD3, Flux), each with
a tokenizer trained on the Python standard library's source: real tokenizer classes with real vocabularies,
saved and loaded by `from_pretrained` like a checkpoint's.
"""

from __future__ import annotations

import json

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from shared.builtin.corpus import stdlib_corpus
from shared.builtin.tiny_sd import train_clip_tokenizer

T5_VOCAB_SIZE = 1024
T5_CORPUS_FILES = 20  # Unigram training is slow: a tenth of the BPE tokenizers' corpus is plenty for 1k pieces
T5_SPECIALS = ["<pad>", "</s>", "<unk>"]  # T5's order: pad 0, eos 1, unk 2


def clip_tokenizer():
    return train_clip_tokenizer()


def clip_text_encoder(tokenizer, hidden_size: int = 32, projection_dim: int | None = None):
    """CLIP's text transformer; with `projection_dim`, the variant whose pooled output is projected (SDXL's second
    encoder, SD3's two)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=hidden_size,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=77,
        projection_dim=projection_dim or hidden_size,
    )
    return CLIPTextModelWithProjection(config) if projection_dim else CLIPTextModel(config)


def t5_tokenizer():
    """A SentencePiece-style Unigram vocabulary in T5's layout, as `T5Tokenizer` builds its own."""
    from transformers import T5Tokenizer

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    trainer = trainers.UnigramTrainer(
        vocab_size=T5_VOCAB_SIZE, special_tokens=T5_SPECIALS, unk_token="<unk>", show_progress=False
    )
    tokenizer.train_from_iterator(stdlib_corpus(T5_CORPUS_FILES), trainer=trainer)
    vocab = [(piece, score) for piece, score in json.loads(tokenizer.to_str())["model"]["vocab"]]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def t5_encoder(tokenizer, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config)


def tiny_vae(latent_channels: int, shift_factor: float | None = None, scaling_factor: float = 0.18215):
    """A two-level VAE: one latent per 2x2 pixels, as tiny-sd's (real checkpoints have four levels, 8x8)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=latent_channels,
        norm_num_groups=2,
        shift_factor=shift_factor,  # SD3's and Flux's VAEs shift latents before scaling them
        scaling_factor=scaling_factor,
        use_quant_conv=shift_factor is None,
        use_post_quant_conv=shift_factor is None,
    )
