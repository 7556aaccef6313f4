"""A built-in text embedding model: a small BERT-style encoder with random weights and a real tokenizer.

Built offline like `tiny_llm` (the same byte-level BPE tokenizer, trained on the standard library's source),
saved in Hugging Face format and loaded with `AutoModel.from_pretrained`, as real encoders (BGE, E5) are.
Its vectors carry no meaning; what the tests check is the serving path: batching, pooling, normalizing.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import BertConfig, BertModel

from shared.builtin.tiny_llm import train_tokenizer

BUILD_VERSION = 1
SEED = 4321
VOCAB_SIZE = 4096
MAX_POSITIONS = 512


def build(name: str, out_dir: Path) -> None:
    tokenizer = train_tokenizer(VOCAB_SIZE)
    tokenizer.model_max_length = MAX_POSITIONS
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=MAX_POSITIONS,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(SEED)
    BertModel(config, add_pooling_layer=False).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
