"""LLM adapters: LoRA, DoRA, rsLoRA or p-tuning on a causal LM (full precision, or QLoRA on an NF4/int8
base), from a JSONL dataset.

Records become (input ids, labels) with the loss only where the model should learn to write:
- `{"prompt", "completion"}`: the completion and EOS (the prompt is tokenized alone, as serving does);
- `{"messages"}`: the assistant turns, located in linear time: the conversation is rendered once, and once
  more with markers for the contents, which places every turn; the first and last turns are checked against
  renders of their prefixes (prefix-stable templates make each a prefix of the whole). The text is then
  tokenized piece by piece between turn edges. A template or tokenizer that defeats this (contents altered,
  tokens merged across an edge) falls back to the exact, quadratic way: tokenize every prefix and diff;
- `{"text"}`: every token.
Sequences are cut to `max_seq_length`; a record left with no label tokens is dropped with a warning.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from services.finetune.datasets import read_jsonl
from services.finetune.training.data import DataPipeline
from services.finetune.training.errors import TrainingInputError
from services.finetune.training.loop import TrainingResult
from services.finetune.training.recipe import RecipeContext, Split, split_records
from shared.loaders import from_pretrained_on
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


@dataclass(frozen=True)
class TokenBatches:
    """Tokenized examples as right-padded batches (in the DataLoader's workers)."""

    pad_id: int

    def prepare(self, example: Example, seed: int) -> Example:
        return example  # tokenized up front: the records with nothing to learn are dropped before training

    def collate(self, examples: list[Example]) -> dict:
        length = max(len(e.input_ids) for e in examples)
        input_ids = torch.full((len(examples), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(examples), length), dtype=torch.long)
        for row, example in enumerate(examples):
            n = len(example.input_ids)
            input_ids[row, :n] = torch.tensor(example.input_ids)
            labels[row, :n] = torch.tensor(example.labels)
            mask[row, :n] = 1
        items = sum(e.label_tokens for e in examples)
        return {"input_ids": input_ids, "labels": labels, "attention_mask": mask, "items": items}


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


def _render(tokenizer, turns: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)


def _exact_span(tokenizer, messages: list[dict], k: int, full_text: str) -> tuple[int, int]:
    """Assistant turn k's characters in `full_text`, after its header through its end, from prefix renders."""
    before = _render(tokenizer, messages[:k], generation_prompt=True)  # up to and with the assistant header
    through = _render(tokenizer, messages[: k + 1])
    if not (full_text.startswith(through) and through.startswith(before)):
        raise TrainingInputError(
            "the model's chat template renders a conversation differently as it grows, so its assistant "
            "turns cannot be located; use prompt/completion records for this model"
        )
    return len(before), len(through)


MARKER = re.compile("\ue000(\\d+)\ue001")  # private-use characters: no template writes them


def _content_positions(tokenizer, messages: list[dict], full_text: str) -> list[tuple[int, int]] | None:
    """Where each message's content lies in `full_text`, from one render with markers for contents; None if
    the template does not copy contents verbatim (then markers put back do not give the real render)."""
    marked = [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]
    pieces = MARKER.split(_render(tokenizer, marked))
    rebuilt, positions, at = [], [None] * len(messages), 0
    for i, piece in enumerate(pieces):
        text = piece if i % 2 == 0 else messages[int(piece)]["content"]
        if i % 2:
            positions[int(piece)] = (at, at + len(text))
        rebuilt.append(text)
        at += len(text)
    if "".join(rebuilt) != full_text or None in positions:
        return None
    return positions


def _assistant_spans(tokenizer, messages: list[dict], full_text: str) -> list[tuple[int, int]]:
    """Characters of each assistant turn in `full_text`, after its header through its end, in linear time.

    The first and last turns are located exactly by rendering their prefixes; the header and end the first
    shows are then found around every other turn's content (placed by one marked render). A template that
    defeats this (contents altered, turns framed differently) is handled by rendering every prefix."""
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    first = _exact_span(tokenizer, messages, turns[0], full_text)
    last = _exact_span(tokenizer, messages, turns[-1], full_text)
    positions = _content_positions(tokenizer, messages, full_text)
    if positions is None:
        return [_exact_span(tokenizer, messages, k, full_text) for k in turns]
    start, end = positions[turns[0]]
    header, trailer = full_text[first[0] : start], full_text[end : first[1]]
    spans = []
    for k in turns:
        start, end = positions[k]
        span = (start - len(header), end + len(trailer))
        if full_text[span[0] : start] != header or full_text[end : span[1]] != trailer or span[0] < first[0]:
            return [_exact_span(tokenizer, messages, k, full_text) for k in turns]
        spans.append(span)
    if spans[0] != first or spans[-1] != last:
        return [_exact_span(tokenizer, messages, k, full_text) for k in turns]
    return spans


def _tokenize_pieces(tokenizer, text: str, edges: list[int]) -> tuple[list[int], list[int]] | None:
    """`text`'s token ids and the token index of each edge, if tokenizing between edges gives the whole's tokens."""
    ids, at = [], []
    for start, end in zip([0, *edges], [*edges, len(text)], strict=True):
        at.append(len(ids))
        ids.extend(_ids(tokenizer(text[start:end], add_special_tokens=False)))
    if ids != _ids(tokenizer(text, add_special_tokens=False)):
        return None
    return ids, at[1:]


def _chat_example(tokenizer, messages: list[dict]) -> Example:
    """Loss on the assistant turns, found in linear time (see the module docstring)."""
    full_text = _render(tokenizer, messages)
    spans = _assistant_spans(tokenizer, messages, full_text)
    edges = sorted({edge for span in spans for edge in span})
    pieces = _tokenize_pieces(tokenizer, full_text, edges)
    if pieces is None:
        return _chat_example_by_prefixes(tokenizer, messages)
    full, at = pieces
    index = dict(zip(edges, at, strict=True))
    labels = [IGNORE] * len(full)
    for start, end in spans:
        labels[index[start] : index[end]] = full[index[start] : index[end]]
    return Example(full, labels)


def _chat_example_by_prefixes(tokenizer, messages: list[dict]) -> Example:
    """The exact, quadratic way: tokenize each prefix of the conversation and diff the ids."""

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
        model = self._base_model(AutoModelForCausalLM, location, kwargs)
        examples = self._examples(*read_jsonl(ctx.dataset_path))
        seed = hp.seed
        if ctx.validation_dataset_path is None:
            self.split = split_records(examples, hp.validation_fraction, seed, hp.test_fraction)
        else:  # a dataset of its own validates: every training record trains, but for a test split
            split = split_records(examples, 0.0, seed, hp.test_fraction)
            validation = self._examples(*read_jsonl(ctx.validation_dataset_path), "validation dataset")
            self.split = Split(split.train, validation, split.test)
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

    def _base_model(self, auto_class, location: str, kwargs: dict):
        """The frozen base: full precision, or quantized for QLoRA (prepared as peft does: norms and the
        head in float32); with gradient checkpointing if the job asks."""
        ctx, hp = self.context, self.hp
        quantization = hp.quantization or "none"
        model = from_pretrained_on(auto_class, location, kwargs, ctx.base_dtype(), ctx.device, quantization)
        model.config.use_cache = False
        if quantization != "none":  # norms and the head in float32, as peft prepares a k-bit base
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        if hp.gradient_checkpointing:  # non-reentrant: frozen inputs need no requires_grad trick
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        return model

    def _examples(self, records: list[dict], record_type: str, source: str = "dataset") -> list[Example]:
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
                f"{dropped} {source} records had nothing to learn within max_seq_length {limit} and were left out"
            )
        if not examples:
            raise TrainingInputError(
                f"no {source} record has anything to learn within max_seq_length {limit}; raise it"
            )
        return examples

    def batch_of(self, examples: list[Example]) -> dict:
        """A training batch of `examples` on the training device (for measurements outside the loop)."""
        batch = TokenBatches(self.pad_id).collate(examples)
        return {k: v.to(self.context.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    @staticmethod
    def count_items(batch: dict) -> int:
        return batch["items"]

    @staticmethod
    def loss_sum(model, batch: dict) -> tuple[torch.Tensor, int]:
        """Summed next-token cross-entropy over label tokens; right-padded batch."""
        labels = batch["labels"]
        length = labels.shape[1]
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits[:, -length:]  # p-tuning prepends tokens
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
            labels[:, 1:].reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        )
        return loss, int((labels[:, 1:] != IGNORE).sum())

    def train(self) -> TrainingResult:
        data = TokenBatches(self.pad_id)
        self.trainer = self.context.trainer(
            self.model, DataPipeline(data.prepare, data.collate), self.split, self.loss_sum, self.count_items
        )
        return self.trainer.run()

    def save(self, out_dir: Path) -> None:
        self.model.save_pretrained(out_dir, save_embedding_layers=False)

    def cleanup(self) -> None:
        self.model = self.trainer = None
        if self.context.device.type == "cuda":
            torch.cuda.empty_cache()
