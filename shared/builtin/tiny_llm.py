"""Built-in causal LMs: a Llama-style model with random weights and a real byte-level BPE tokenizer.

Made offline and deterministically: the tokenizer is trained on the Python standard library's own
source files (always present, no download), the weights come from a fixed seed. The result is saved in
Hugging Face format and loaded with `from_pretrained` like any checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from shared.builtin.corpus import stdlib_corpus
from shared.locations import TRAINING_DEFAULTS_FILE

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"

# ChatML, with the BOS token up front: the template owns BOS, so the rendered text is tokenized
# without special tokens and BOS is never doubled.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

BUILD_VERSION = 2  # bump when a variant changes, so existing data dirs rebuild it

# name -> (vocab size, Llama config fields)
VARIANTS: dict[str, tuple[int, dict]] = {
    # ~0.6M parameters: fast enough for every test. A long context (rotary positions, as in Llama 3) lets a
    # test hold a request running by construction: 100k tokens take minutes even at thousands per second.
    # Weights drawn wider than transformers' default (std 0.3, not 0.02) give confident, not flat, logits,
    # so a short fine-tuning job visibly moves the loss (≈9 → <0.01 on the bundled sample), p-tuning too.
    "tiny-llm": (
        4096,
        dict(
            initializer_range=0.3,
            hidden_size=64,
            intermediate_size=176,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=131072,
        ),
    ),
    # ~100M parameters: the benchmark's stand-in for a small real model.
    "llm-100m": (
        8192,
        dict(
            hidden_size=768,
            intermediate_size=2048,
            num_hidden_layers=12,
            num_attention_heads=12,
            num_key_value_heads=12,
            max_position_embeddings=2048,
        ),
    ),
}

SEED = 1234


def train_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(stdlib_corpus(), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
            ),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        model_max_length=None,
    )


# Fine-tuning defaults for jobs on these random-weight models (the fine-tune API reads them from the model
# folder): the usual defaults for real checkpoints (2e-4, 3 epochs) barely move a random model.
TRAINING_DEFAULTS = {
    "tiny-llm": {"learning_rate": 5e-3, "epochs": 15, "p_tuning": {"learning_rate": 0.1, "epochs": 60}},
}


def build(name: str, out_dir: Path) -> None:
    """Write tokenizer, config, generation config and safetensors weights of `name` into `out_dir`."""
    vocab_size, fields = VARIANTS[name]
    tokenizer = train_tokenizer(vocab_size)
    tokenizer.model_max_length = fields["max_position_embeddings"]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)],
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **fields,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    if name in TRAINING_DEFAULTS:
        (out_dir / TRAINING_DEFAULTS_FILE).write_text(json.dumps(TRAINING_DEFAULTS[name], indent=2))
