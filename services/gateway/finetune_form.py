"""What the Fine-tune form sends: one typed value, `JobForm`, checked and turned into a `CreateJobRequest`.

Each hyperparameter is one field of `JobForm`, declared with a `Setting` that says how the form shows it
(label, hint, basic or advanced) and how its value is checked; the layout builds its component from that,
`/create_job` takes the fields in this order, and `hyperparameters()` fills the proto field of the same name.
So a new hyperparameter is one line here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import astuple, dataclass, field, fields
from typing import Any

import gradio as gr

from modelworks.finetune.v1 import finetune_pb2 as pb
from services.gateway import validation

KINDS = {"LLM": pb.JOB_KIND_LLM, "Diffusion": pb.JOB_KIND_DIFFUSION}
SETTING = "setting"  # the dataclass field metadata key of a hyperparameter's `Setting`


@dataclass(frozen=True)
class Setting:
    """How the form shows one hyperparameter, and how its value becomes the proto's (None leaves it unset)."""

    component: Callable[..., gr.components.Component]
    options: dict
    check: Callable[[Any], Any]
    basic: bool = False  # shown at once; the others are under "Advanced"

    def make(self, name: str) -> gr.components.Component:
        return self.component(elem_id=f"ft-{name.replace('_', '-')}", **self.options)


def _number(label: str, default: float, check: Callable, info: str | None, precision: int | None, basic: bool):
    options = {"label": label, "value": default, "precision": precision, "info": info}
    return field(default=default, metadata={SETTING: Setting(gr.Number, options, check, basic)})


def _count(label: str, high: int, info: str | None = None, basic: bool = False):
    """A whole number from 0 up to `high`; 0 (or blank) is the service's default."""
    return _number(label, 0, lambda value: validation.whole_number(value or 0, 0, high, label), info, 0, basic)


def _amount(label: str, high: float, info: str | None = None, basic: bool = False):
    """A number from 0 up to `high`; 0 (or blank) is the service's default."""
    return _number(label, 0, lambda value: validation.number_in_range(value or 0, 0, high, label), info, None, basic)


def _choice(label: str, choices: list[str], default: str, info: str | None = None, basic: bool = False):
    options = {"label": label, "choices": choices, "value": default, "info": info, "allow_custom_value": True}
    return field(default=default, metadata={SETTING: Setting(gr.Dropdown, options, lambda v: v or "", basic)})


def _text(label: str, parse: Callable, placeholder: str):
    options = {"label": label, "placeholder": placeholder}
    return field(default=None, metadata={SETTING: Setting(gr.Textbox, options, parse)})


def _flag(label: str):
    return field(default=False, metadata={SETTING: Setting(gr.Checkbox, {"label": label}, bool)})


def _modules(value: str | None) -> list[str]:
    return [name for name in (value or "").replace(",", " ").split() if name]


def _fraction(value: float | None) -> float | None:
    """-1 (or blank) leaves the validation split to the service."""
    if value in (None, "", -1):
        return None
    return validation.number_in_range(value, 0, 0.5, "Validation fraction")


@dataclass(frozen=True)
class JobForm:
    """A fine-tune job as the form and the API give it (unchecked). Defaults are the form's."""

    dataset_id: str | None = None
    kind: str | None = "LLM"
    base_model: str | None = None
    adapter_name: str | None = None
    # the hyperparameters, in the form's order; basic ones first
    method: str | None = _choice("Method", ["lora"], "lora", "what the base model offers", basic=True)
    epochs: float | None = _count("Epochs", 1000, "0: the model's default (3)", basic=True)
    max_steps: float | None = _count("Max steps", 1_000_000, "0: from epochs; overrides them", basic=True)
    learning_rate: float | None = _amount("Learning rate", 1, "0: 2e-4 (p-tuning 1e-2)", basic=True)
    batch_size: float | None = _count("Batch size", 1024, "0: 4 (LLM), 1 (diffusion)")
    gradient_accumulation_steps: float | None = _count("Gradient accumulation", 1024, "0: 1")
    lora_r: float | None = _count("LoRA rank", 1024, "0: 16 (LLM), 8 (diffusion)")
    lora_alpha: float | None = _amount("LoRA alpha", 1e4, "0: 2 × rank")
    lora_dropout: float | None = _amount("LoRA dropout", 0.9, "0: none")
    target_modules: str | None = _text("Target modules", _modules, "default for the model")
    warmup_ratio: float | None = _amount("Warm-up ratio", 0.9, "0: none")
    lr_scheduler: str | None = _choice("LR schedule", ["cosine", "linear", "constant"], "cosine")
    max_grad_norm: float | None = _amount("Max gradient norm", 1e4, "0: 1.0")
    mixed_precision: str | None = _choice(
        "Mixed precision", ["auto", "no", "bf16", "fp16"], "auto", "auto: bf16 where native; fp16 needs CUDA"
    )
    validation_fraction: float | None = _number(
        "Validation fraction", -1, _fraction, "-1: 0.1 with ≥ 20 records, else none", None, False
    )
    early_stopping_patience: float | None = _count("Early-stopping patience", 1000, "0: off")
    seed: float | None = _number("Seed", -1, validation.optional_seed, "-1: 42, the same run each time", 0, False)
    max_seq_length: float | None = _count("Max sequence length (LLM)", 1_000_000, "0: 512")
    resolution: float | None = _count("Resolution (diffusion)", 2048, "0: the model's")
    save_steps: float | None = _count("Checkpoint every (steps)", 1_000_000, "0: a quarter of the steps, ≤ 100")
    eval_steps: float | None = _count("Evaluate every (steps)", 1_000_000, "0: each epoch")
    num_virtual_tokens: float | None = _count("Virtual tokens (p-tuning)", 512, "0: 20")
    random_crop: bool | None = _flag("Random crop (diffusion)")
    random_flip: bool | None = _flag("Random flip (diffusion)")
    quantization: str | None = _choice(
        "Base quantization (LLM)", ["none", "bnb-nf4", "bnb-int8"], "none", "bnb-nf4: QLoRA, the base in 4 bits"
    )
    gradient_checkpointing: bool | None = _flag("Gradient checkpointing (less memory, slower steps)")
    optimizer: str | None = _choice(
        "Optimizer", ["adamw", "adamw_8bit", "paged_adamw_8bit"], "adamw", "8-bit: a quarter of the state; paged: CUDA"
    )
    test_fraction: float | None = _amount("Test fraction", 0.5, "0: none; held out, scored once at the end")
    aspect_buckets: bool | None = field(  # sent only when unticked: on is the service's default
        default=True,
        metadata={SETTING: Setting(gr.Checkbox, {"label": "Aspect-ratio buckets (diffusion)", "value": True},
                                   lambda on: None if on else False)},
    )  # fmt: skip
    class_prompt: str | None = _text(
        "Class prompt (diffusion, DreamBooth prior preservation)", lambda v: (v or "").strip(), "none: off"
    )
    num_class_images: float | None = _count("Class images", 1000, "0: 50 with a class prompt")
    prior_loss_weight: float | None = _amount("Prior loss weight", 100, "0: 1.0")
    guidance_scale: float | None = _amount("Guidance trained at (FLUX.1-dev bases)", 100, "0: 3.5")

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def settings(cls) -> dict[str, Setting]:
        """The hyperparameters' settings by field name, in the form's order."""
        return {f.name: f.metadata[SETTING] for f in fields(cls) if SETTING in f.metadata}

    def values(self) -> tuple:
        return astuple(self)

    def hyperparameters(self) -> pb.Hyperparameters:
        """Each hyperparameter checked; 0 or blank leaves it to the service's default for the model and data."""
        checked = {name: setting.check(getattr(self, name)) for name, setting in self.settings().items()}
        return pb.Hyperparameters(**{name: value for name, value in checked.items() if value is not None})

    def request(self) -> pb.CreateJobRequest:
        """The job to create; a `gr.Error` that says what to change when an input is bad."""
        if not self.dataset_id:
            raise gr.Error("Pick a dataset, or upload one first.", print_exception=False)
        if self.kind not in KINDS:
            raise gr.Error("Kind must be LLM or Diffusion.", print_exception=False)
        if not self.base_model:
            raise gr.Error("Pick a base model to fine-tune.", print_exception=False)
        return pb.CreateJobRequest(
            kind=KINDS[self.kind],
            base_model=self.base_model,
            dataset_id=self.dataset_id,
            adapter_name=validation.adapter_name(self.adapter_name),
            hyperparameters=self.hyperparameters(),
        )
