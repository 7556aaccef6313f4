"""Tiny text encoders and their tokenizers for the built-in diffusion models, built offline.

CLIP (with or without its projection, as SDXL, SD3 and Flux use them) and T5's encoder (SD3, Flux), each with
a tokenizer trained on the Python standard library's source: real tokenizer classes with real vocabularies,
saved and loaded by `from_pretrained` like a checkpoint's.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

from shared.builtin.corpus import stdlib_corpus
from shared.locations import TRAINING_DEFAULTS_FILE

T5_VOCAB_SIZE = 1024
T5_CORPUS_FILES = 20  # Unigram training is slow: a tenth of the BPE tokenizers' corpus is plenty for 1k pieces
T5_SPECIALS = ["<pad>", "</s>", "<unk>"]  # T5's order: pad 0, eos 1, unk 2


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


def save_builtin_pipeline(pipe, out_dir: Path, training_defaults: dict) -> None:
    """A built-in pipeline in diffusers format, with the fine-tuning defaults that suit its random weights."""
    pipe.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / TRAINING_DEFAULTS_FILE).write_text(json.dumps(training_defaults))
