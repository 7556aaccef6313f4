"""LLM adapters: LoRA, DoRA, rsLoRA or p-tuning on a causal LM, from a JSONL dataset.

Records become (input ids, labels) with the loss only where the model should learn to write:
- `{"prompt", "completion"}`: the completion and EOS (the prompt is tokenized alone, as serving does);
- `{"messages"}`: the assistant turns, found by rendering the chat template on growing prefixes of the
  conversation and diffing the token ids (works for any prefix-stable template);
- `{"text"}`: every token.
Sequences are cut to `max_seq_length`; a record left with no label tokens is dropped with a warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from services.finetune.datasets import read_jsonl
from services.finetune.training.loop import TrainingResult
from services.finetune.training.recipe import RecipeContext, TrainingInputError, split_records
from shared.locations import pretrained_location

log = logging.getLogger(__name__)

IGNORE = -100


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def label_tokens(self) -> int:
        """Positions whose next token carries loss (labels are shifted by one in the loss)."""
        return sum(1 for label in self.labels[1:] if label != IGNORE)


def _ids(encoded) -> list[int]:
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def encode_record(tokenizer, record: dict, record_type: str) -> Example:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if record_type == "prompt_completion":
        prompt = _ids(tokenizer(record["prompt"]))
        completion = _ids(tokenizer(record["completion"], add_special_tokens=False)) + eos
        return Example(prompt + completion, [IGNORE] * len(prompt) + completion)
    if record_type == "text":
        ids = _ids(tokenizer(record["text"])) + eos
        return Example(ids, list(ids))
    return _chat_example(tokenizer, record["messages"])


def _chat_example(tokenizer, messages: list[dict]) -> Example:
    def render(turns, generation_prompt=False) -> list[int]:
        return _ids(tokenizer.apply_chat_template(turns, tokenize=True, add_generation_prompt=generation_prompt))

    full = render(messages)
    labels = [IGNORE] * len(full)
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:k], generation_prompt=True)  # up to and with the assistant header
        through = render(messages[: k + 1])
        if full[: len(through)] != through or through[: len(before)] != before:
            raise TrainingInputError(
                "the model's chat template renders a conversation differently as it grows, so its assistant "
                "turns cannot be located; use prompt/completion records for this model"
            )
        labels[len(before) : len(through)] = full[len(before) : len(through)]
    return Example(full, labels)


class LLMRecipe:
    def __init__(self, context: RecipeContext):
        self.context = context
        self.hp = context.hyperparameters

    def setup(self) -> None:
        from peft import LoraConfig, PromptEncoderConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        ctx, hp = self.context, self.hp
        location, kwargs = pretrained_location(ctx.base_model, ctx.settings)
        self.tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        model = AutoModelForCausalLM.from_pretrained(location, dtype=ctx.base_dtype(), use_safetensors=True, **kwargs)
        model.to(ctx.device)
        model.config.use_cache = False
        records, record_type = read_jsonl(ctx.dataset_path)
        examples = self._examples(records, record_type)
        seed = hp.seed if hp.seed is not None else 42
        self.train_examples, self.val_examples = split_records(examples, hp.validation_fraction, seed)
        if hp.method == "p_tuning":
            config = PromptEncoderConfig(
                task_type="CAUSAL_LM",
                num_virtual_tokens=hp.num_virtual_tokens,
                encoder_hidden_size=model.config.hidden_size,
            )
            self.virtual_tokens = hp.num_virtual_tokens
        else:
            config = LoraConfig(
                task_type="CAUSAL_LM",
                r=hp.lora_r,
                lora_alpha=hp.lora_alpha,
                lora_dropout=hp.lora_dropout,
                target_modules=list(hp.target_modules) if hp.target_modules != ("all-linear",) else "all-linear",
                use_dora=hp.method == "dora",
                use_rslora=hp.method == "rslora",
            )
            self.virtual_tokens = 0
        torch.manual_seed(seed)  # the adapter's initial weights
        self.model = get_peft_model(model, config)
        for parameter in self.model.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()  # trainable weights stay float32 under autocast

    def _examples(self, records: list[dict], record_type: str) -> list[Example]:
        limit = self.hp.max_seq_length
        examples, dropped = [], 0
        for record in records:
            example = encode_record(self.tokenizer, record, record_type)
            example = Example(example.input_ids[:limit], example.labels[:limit])
            if example.label_tokens == 0:
                dropped += 1
                continue
            examples.append(example)
        if dropped and self.context.hooks:
            self.context.hooks.warning(
                f"{dropped} records had nothing to learn within max_seq_length {limit} and were left out"
            )
        if not examples:
            raise TrainingInputError(f"no record has anything to learn within max_seq_length {limit}; raise it")
        return examples

    def count_items(self, examples: list[Example]) -> int:
        return sum(e.label_tokens for e in examples)

    def loss_sum(self, model, examples: list[Example]) -> tuple[torch.Tensor, int]:
        """Summed next-token cross-entropy over label tokens; right-padded batch."""
        length = max(len(e.input_ids) for e in examples)
        device = self.context.device
        input_ids = torch.full((len(examples), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(examples), length), dtype=torch.long)
        for row, example in enumerate(examples):
            n = len(example.input_ids)
            input_ids[row, :n] = torch.tensor(example.input_ids)
            labels[row, :n] = torch.tensor(example.labels)
            mask[row, :n] = 1
        input_ids, labels, mask = input_ids.to(device), labels.to(device), mask.to(device)
        logits = model(input_ids=input_ids, attention_mask=mask).logits[:, -length:]  # p-tuning prepends tokens
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
            labels[:, 1:].reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        )
        return loss, int((labels[:, 1:] != IGNORE).sum())

    def train(self) -> TrainingResult:
        self.trainer = self.context.trainer(
            self.model, self.train_examples, self.val_examples, self.loss_sum, self.count_items
        )
        return self.trainer.run()

    def save(self, out_dir: Path) -> dict:
        self.model.save_pretrained(out_dir, save_embedding_layers=False)
        return {"num_virtual_tokens": self.virtual_tokens} if self.virtual_tokens else {}

    def cleanup(self) -> None:
        self.model = self.trainer = None
        if self.context.device.type == "cuda":
            torch.cuda.empty_cache()
