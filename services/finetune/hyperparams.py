"""Fine-tuning hyperparameters: what a client sends, checked and completed with defaults before a job queues.

Zero or empty means "the default for this model and data"; every default is filled in, so the job record
shows exactly what trains. Errors name the field and the allowed range. Torch-free: the API runs this.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace

from shared.errors import InvalidArgument
from shared.quantization import TRAINABLE_QUANTIZATIONS

METHODS = ("lora", "dora", "rslora", "p_tuning")
LLM_METHODS = METHODS
DIFFUSION_METHODS = ("lora", "dora", "rslora")
LR_SCHEDULERS = ("linear", "cosine", "constant")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")  # auto: bf16 where the device computes it natively
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")  # the 8-bit ones: bitsandbytes; paged: CUDA only

# Linear layers a LoRA can target, by architecture (config.json `model_type`); the first list is the default.
LLM_TARGETS: dict[str, tuple[list[str], list[str]]] = {
    arch: (
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"],
    )
    for arch in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "granite")
}
LLM_TARGETS["gpt2"] = (["c_attn", "c_proj", "c_fc"], ["c_attn", "c_proj", "c_fc", "lm_head"])
LLM_TARGETS["phi3"] = (
    ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    ["qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"],
)
# Other architectures: every linear layer but the output head (peft's "all-linear"); names are then
# checked by the worker against the model itself.
ANY_ARCHITECTURE: tuple[list[str], list[str] | None] = (["all-linear"], None)
UNET_TARGETS = (
    ["to_q", "to_k", "to_v", "to_out.0"],
    ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"],
)
# SD3's and Flux's transformers: joint attention (image and text streams) and the feed-forwards beside it;
# Flux's single blocks add their MLP input and output projections.
_JOINT = (
    *("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"),
    *("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"),
)
TRANSFORMER_TARGETS = (["to_q", "to_k", "to_v", "to_out.0"], [*_JOINT, "proj_mlp", "proj_out"])
DIFFUSION_TARGETS = {
    "sd": UNET_TARGETS,
    "sdxl": UNET_TARGETS,
    "sd3": (["to_q", "to_k", "to_v", "to_out.0"], list(_JOINT)),
    "flux": TRANSFORMER_TARGETS,
}
# Output heads and embeddings: a LoRA there is vocabulary-sized (llm.allow_embedding_lora_targets).
EMBEDDING_MODULES = ("lm_head", "embed_tokens", "wte", "wpe", "embed_out", "word_embeddings")
MAX_LORA_RANK = 1024  # any job; LLM jobs are bounded by llm.max_lora_rank too

# What a field left at zero (or unset) becomes, unless the model folder's training defaults say otherwise
# (epochs, learning_rate) or the data decides (max_seq_length is capped by the model's context).
DEFAULTS: dict = {
    "method": "lora",
    "lr_scheduler": "cosine",
    "mixed_precision": "auto",
    "quantization": "none",
    "optimizer": "adamw",
    "epochs": 3,
    "learning_rate": {"adapter": 2e-4, "p_tuning": 1e-2},
    "batch_size": {"llm": 4, "diffusion": 1},  # then rounded up to a multiple of the worker's GPUs
    "gradient_accumulation_steps": 1,
    "lora_r": {"llm": 16, "diffusion": 8},  # lora_alpha defaults to twice the rank
    "max_grad_norm": 1.0,
    "max_seq_length": 512,
    "num_virtual_tokens": 20,
    "validation_fraction": 0.1,
    "validation_min_records": 20,  # fewer records: no validation split by default
    "seed": 42,
    "num_class_images": 50,
    "flux_guidance": 3.5,  # as diffusers' DreamBooth Flux script trains FLUX.1-dev
}


@dataclass(frozen=True)
class Hyperparameters:
    method: str = ""
    epochs: int = 0
    max_steps: int = 0
    learning_rate: float = 0.0
    batch_size: int = 0
    gradient_accumulation_steps: int = 0
    lora_r: int = 0
    lora_alpha: float = 0.0
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = ()
    warmup_ratio: float = 0.0
    lr_scheduler: str = ""
    max_grad_norm: float = 0.0
    mixed_precision: str = ""
    validation_fraction: float | None = None  # None: the default; 0: no validation
    early_stopping_patience: int = 0
    seed: int | None = None
    max_seq_length: int = 0
    resolution: int = 0
    save_steps: int = 0
    profile_steps: int = 0
    num_virtual_tokens: int = 0
    eval_steps: int = 0
    random_crop: bool = False
    random_flip: bool = False
    learning_rate_multiplier: float = 0.0  # scales the default learning rate (OpenAI's field)
    quantization: str = ""  # the frozen base's: none, bnb-nf4 (QLoRA), bnb-int8
    gradient_checkpointing: bool = False
    optimizer: str = ""
    test_fraction: float = 0.0  # held out from training and validation; evaluated once, at the end
    aspect_buckets: bool | None = None  # diffusion: None is on
    class_prompt: str = ""  # diffusion: DreamBooth prior preservation
    num_class_images: int = 0
    prior_loss_weight: float = 0.0
    guidance_scale: float = 0.0  # Flux bases with a guidance embedding

    def to_dict(self) -> dict:
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Hyperparameters:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["target_modules"] = tuple(values.get("target_modules", ()))
        return cls(**values)


@dataclass(frozen=True)
class TrainingData:
    """What resolving needs to know of the dataset and the base model."""

    kind: str  # "llm" or "diffusion"
    num_records: int
    architecture: str  # config.json model_type, or "unet"
    context_length: int = 0  # LLM
    native_resolution: int = 0  # diffusion
    family: str = ""  # diffusion: sd, sdxl, sd3 or flux
    guidance_embeds: bool = False  # diffusion: a Flux transformer that takes the guidance as an input
    size_multiple: int = 8  # diffusion: pixels a side of one latent patch (16 for real SD3 and Flux)
    has_chat_template: bool = False
    record_type: str = ""
    validation_records: int = 0  # a validation dataset's records; 0: none (validation_fraction splits the data)
    model_defaults: dict = field(default_factory=dict)  # the model folder's own fine-tuning defaults
    cuda_workers: bool | None = None  # None: no worker has said yet
    max_steps_limit: int = 1_000_000
    devices: int = 1  # DDP ranks per worker: the batch must split evenly across them
    targets: tuple[list[str], list[str] | None] = field(default=UNET_TARGETS)
    max_lora_rank: int = MAX_LORA_RANK  # LLM jobs: llm.max_lora_rank
    allow_embedding_targets: bool = False  # llm.allow_embedding_lora_targets


def optimizer_steps_per_epoch(train_records: int, batch_size: int, accumulation: int) -> int:
    """Full optimizer batches only (a partial last one is dropped, as DDP needs), at least one step an epoch."""
    return max(1, train_records // (batch_size * accumulation))


def _finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise InvalidArgument(f"hyperparameters.{name} must be a finite number, got {value}")


def _in_range(name: str, value: float, low: float, high: float, note: str = "") -> None:
    _finite(name, value)
    if not low <= value <= high:
        raise InvalidArgument(f"hyperparameters.{name} must be in [{low:g}, {high:g}]{note}, got {value:g}")


def _at_most(name: str, value: int, high: int) -> None:
    if value > high:
        raise InvalidArgument(f"hyperparameters.{name} must be at most {high}, got {value}")


def resolve(hp: Hyperparameters, data: TrainingData) -> tuple[Hyperparameters, int]:
    """Check every field and fill in the defaults; returns the resolved set and the job's total steps."""
    method = _method(hp, data)
    _check_bounds(hp, data)
    lr_scheduler, mixed_precision = _choices(hp, data)
    quantization, optimizer = _memory_choices(hp, data)
    target_modules = _target_modules(hp, method, data)
    max_seq_length, resolution = _input_size(hp, method, data)
    diffusion_options = _diffusion_options(hp, data)
    validation_fraction, train_records = _validation_split(hp, data)
    batch_size, accumulation = _batching(hp, data)
    suggested = {**data.model_defaults, **data.model_defaults.get(method, {})}
    epochs = hp.epochs or int(suggested.get("epochs", DEFAULTS["epochs"]))
    steps_per_epoch = optimizer_steps_per_epoch(train_records, batch_size, accumulation)
    total_steps = hp.max_steps or steps_per_epoch * epochs
    if total_steps > data.max_steps_limit:
        raise InvalidArgument(
            f"this job would train {total_steps} steps; the limit is {data.max_steps_limit}: "
            "lower epochs or set max_steps"
        )
    p_tuning = method == "p_tuning"
    lora_r = 0 if p_tuning else _lora_rank(hp, data)
    default_learning_rate = float(suggested.get("learning_rate", _default_learning_rate(method)))
    learning_rate = hp.learning_rate or default_learning_rate * (hp.learning_rate_multiplier or 1.0)
    resolved = replace(
        hp,
        method=method,
        epochs=epochs,
        learning_rate=learning_rate,
        learning_rate_multiplier=learning_rate / default_learning_rate,
        batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        lora_r=lora_r,
        lora_alpha=0.0 if p_tuning else (hp.lora_alpha or 2.0 * lora_r),
        target_modules=target_modules,
        lr_scheduler=lr_scheduler,
        max_grad_norm=hp.max_grad_norm or DEFAULTS["max_grad_norm"],
        mixed_precision=mixed_precision,
        quantization=quantization,
        optimizer=optimizer,
        validation_fraction=validation_fraction,
        seed=DEFAULTS["seed"] if hp.seed is None else hp.seed % 2**63,  # room for seed + epoch in a torch seed
        max_seq_length=max_seq_length,
        resolution=resolution,
        save_steps=hp.save_steps or max(1, min(100, total_steps // 4)),
        num_virtual_tokens=_virtual_tokens(hp, method),
        eval_steps=hp.eval_steps or max(1, steps_per_epoch),
        **diffusion_options,
    )
    return resolved, total_steps


def _method(hp: Hyperparameters, data: TrainingData) -> str:
    method = hp.method or DEFAULTS["method"]
    allowed = LLM_METHODS if data.kind == "llm" else DIFFUSION_METHODS
    if method not in allowed:
        raise InvalidArgument(
            f"hyperparameters.method {method!r} is not available for {data.kind} models; "
            f"use one of {', '.join(allowed)}"
        )
    return method


def _check_bounds(hp: Hyperparameters, data: TrainingData) -> None:
    """Numbers a client sent, each against its range (zero, the default, always passes)."""
    for name, high in (("epochs", 1000), ("batch_size", 1024), ("gradient_accumulation_steps", 1024)):
        _at_most(name, getattr(hp, name), high)
    _at_most("max_steps", hp.max_steps, data.max_steps_limit)
    _at_most("lora_r", hp.lora_r, MAX_LORA_RANK)
    if data.kind == "llm" and hp.lora_r > data.max_lora_rank:
        raise InvalidArgument(
            f"hyperparameters.lora_r must be at most {data.max_lora_rank} (the server's llm.max_lora_rank), "
            f"got {hp.lora_r}"
        )
    _at_most("profile_steps", hp.profile_steps, 50)
    _at_most("num_virtual_tokens", hp.num_virtual_tokens, 512)
    _at_most("early_stopping_patience", hp.early_stopping_patience, 1000)
    if hp.learning_rate:
        _in_range("learning_rate", hp.learning_rate, 1e-8, 1.0)
    if hp.learning_rate_multiplier:
        if hp.learning_rate:
            raise InvalidArgument("set learning_rate or learning_rate_multiplier, not both")
        _in_range("learning_rate_multiplier", hp.learning_rate_multiplier, 1e-3, 100.0)
    if hp.lora_alpha:
        _in_range("lora_alpha", hp.lora_alpha, 1e-3, 1e4)
    _in_range("lora_dropout", hp.lora_dropout, 0.0, 0.9)
    _in_range("warmup_ratio", hp.warmup_ratio, 0.0, 0.9)
    _in_range("max_grad_norm", hp.max_grad_norm, 0.0, 1e4)
    if hp.validation_fraction is not None:
        _in_range("validation_fraction", hp.validation_fraction, 0.0, 0.5)


def _choices(hp: Hyperparameters, data: TrainingData) -> tuple[str, str]:
    lr_scheduler = hp.lr_scheduler or DEFAULTS["lr_scheduler"]
    if lr_scheduler not in LR_SCHEDULERS:
        raise InvalidArgument(f"hyperparameters.lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}")
    mixed_precision = hp.mixed_precision or DEFAULTS["mixed_precision"]
    if mixed_precision not in MIXED_PRECISION:
        raise InvalidArgument(f"hyperparameters.mixed_precision must be one of {', '.join(MIXED_PRECISION)}")
    if mixed_precision == "fp16" and data.cuda_workers is False:
        raise InvalidArgument(
            "hyperparameters.mixed_precision fp16 needs a CUDA worker and every worker here runs on the CPU; "
            "use auto, bf16 or no"
        )
    return lr_scheduler, mixed_precision


def _memory_choices(hp: Hyperparameters, data: TrainingData) -> tuple[str, str]:
    """The base's quantization (QLoRA) and the optimizer: what lets a bigger model train in less memory."""
    quantization = hp.quantization or DEFAULTS["quantization"]
    if quantization not in TRAINABLE_QUANTIZATIONS:
        raise InvalidArgument(
            f"hyperparameters.quantization {quantization!r} cannot train; use one of "
            f"{', '.join(TRAINABLE_QUANTIZATIONS)} (bnb-nf4 is QLoRA)"
        )
    if quantization != "none" and data.kind != "llm":
        raise InvalidArgument("hyperparameters.quantization applies to LLM jobs; diffusion jobs train on a full base")
    optimizer = hp.optimizer or DEFAULTS["optimizer"]
    if optimizer not in OPTIMIZERS:
        raise InvalidArgument(f"hyperparameters.optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    if optimizer.startswith("paged_") and data.cuda_workers is False:
        raise InvalidArgument(
            f"hyperparameters.optimizer {optimizer} pages optimizer state between GPU and host memory, and every "
            "worker here runs on the CPU; use adamw_8bit or adamw"
        )
    return quantization, optimizer


def _target_modules(hp: Hyperparameters, method: str, data: TrainingData) -> tuple[str, ...]:
    """The layers a LoRA trains: the architecture's default, or the client's choice among its layers."""
    if data.record_type == "chat" and not data.has_chat_template:
        raise InvalidArgument("the dataset holds chat records but the base model has no chat template")
    if method == "p_tuning":
        if hp.target_modules:
            raise InvalidArgument("hyperparameters.target_modules does not apply to p_tuning (it trains no layers)")
        if data.record_type == "text":
            raise InvalidArgument("p_tuning needs prompts to condition: use prompt/completion or chat records")
        return ()
    defaults, allowed = data.targets
    target_modules = tuple(hp.target_modules or defaults)
    unknown = [t for t in target_modules if allowed is not None and t not in allowed]
    if unknown:
        raise InvalidArgument(
            f"hyperparameters.target_modules {', '.join(unknown)} are not LoRA-able layers of this "
            f"{data.architecture} model; choose from {', '.join(allowed)}"
        )
    embeddings = [t for t in target_modules if t.rsplit(".", 1)[-1] in EMBEDDING_MODULES]
    if embeddings and not data.allow_embedding_targets:
        raise InvalidArgument(
            f"hyperparameters.target_modules {', '.join(embeddings)} are the output head or the embeddings, "
            "whose LoRA is vocabulary-sized; this server refuses them (llm.allow_embedding_lora_targets is off)"
        )
    return target_modules


def _input_size(hp: Hyperparameters, method: str, data: TrainingData) -> tuple[int, int]:
    """(max_seq_length, 0) for an LLM job, (0, resolution) for a diffusion job."""
    if data.kind != "llm":
        resolution = hp.resolution or data.native_resolution
        step = data.size_multiple
        if resolution % step or not step <= resolution <= 2048:
            raise InvalidArgument(
                f"hyperparameters.resolution must be a multiple of {step} (this model's latent patch) in "
                f"[{step}, 2048], got {resolution}"
            )
        if hp.max_seq_length:
            raise InvalidArgument("hyperparameters.max_seq_length applies to LLM jobs only")
        return 0, resolution
    max_seq_length = hp.max_seq_length or min(
        DEFAULTS["max_seq_length"], data.context_length or DEFAULTS["max_seq_length"]
    )
    virtual = _virtual_tokens(hp, method)
    if data.context_length and max_seq_length + virtual > data.context_length:
        raise InvalidArgument(
            f"hyperparameters.max_seq_length {max_seq_length}"
            + (f" plus {virtual} virtual tokens" if virtual else "")
            + f" exceeds the model's context of {data.context_length}"
        )
    if hp.resolution:
        raise InvalidArgument("hyperparameters.resolution applies to diffusion jobs only")
    return max_seq_length, 0


def _validation_split(hp: Hyperparameters, data: TrainingData) -> tuple[float, int]:
    """The validation fraction (by default a tenth, with enough records) and the records left to train on.

    With a validation dataset nothing is held out for validation: the fraction is 0 and every record but
    the test split's trains."""
    if data.validation_records:
        if hp.validation_fraction is not None:
            raise InvalidArgument(
                "set hyperparameters.validation_fraction or a validation dataset, not both; leave "
                "validation_fraction unset to validate on validation_dataset_id"
            )
        train_records = data.num_records - _test_records(hp, data)
        if train_records < 1:
            raise InvalidArgument("the dataset leaves no training record after the test split")
        return 0.0, train_records
    fraction = hp.validation_fraction
    if fraction is None:
        fraction = DEFAULTS["validation_fraction"] if data.num_records >= DEFAULTS["validation_min_records"] else 0.0
    validation_records = math.floor(data.num_records * fraction)
    if fraction and validation_records < 1:
        raise InvalidArgument(
            f"hyperparameters.validation_fraction {fraction:g} of {data.num_records} records leaves no "
            "validation record; raise it or upload more data"
        )
    test_records = _test_records(hp, data)
    train_records = data.num_records - validation_records - test_records
    if train_records < 1:
        raise InvalidArgument("the dataset leaves no training record after the validation and test splits")
    if hp.early_stopping_patience and not validation_records:
        raise InvalidArgument(
            "hyperparameters.early_stopping_patience needs validation: a validation_fraction or a validation dataset"
        )
    return fraction, train_records


MAX_CLASS_IMAGES = 1000
DIFFUSION_ONLY = ("random_crop", "random_flip", "aspect_buckets", "class_prompt", "num_class_images")


def _diffusion_options(hp: Hyperparameters, data: TrainingData) -> dict:
    """Aspect buckets, DreamBooth prior preservation and Flux's trained guidance, resolved (diffusion jobs)."""
    if data.kind != "diffusion":
        given = [name for name in DIFFUSION_ONLY if getattr(hp, name) not in (None, False, "", 0)]
        given += [name for name in ("prior_loss_weight", "guidance_scale") if getattr(hp, name)]
        if given:
            raise InvalidArgument(f"hyperparameters.{', '.join(given)} apply to diffusion jobs only")
        return {}
    if len(hp.class_prompt) > 2000:
        raise InvalidArgument(f"hyperparameters.class_prompt is {len(hp.class_prompt)} characters; the limit is 2000")
    _at_most("num_class_images", hp.num_class_images, MAX_CLASS_IMAGES)
    if not hp.class_prompt and (hp.num_class_images or hp.prior_loss_weight):
        raise InvalidArgument(
            "hyperparameters.num_class_images and prior_loss_weight are for prior preservation: set class_prompt"
        )
    if hp.prior_loss_weight:
        _in_range("prior_loss_weight", hp.prior_loss_weight, 1e-3, 100.0)
    if hp.guidance_scale:
        if not data.guidance_embeds:
            raise InvalidArgument(
                "hyperparameters.guidance_scale applies to Flux bases with a guidance embedding (FLUX.1-dev); "
                f"this base is {data.family or 'not one'}"
            )
        _in_range("guidance_scale", hp.guidance_scale, 0.0, 100.0)
    prior = bool(hp.class_prompt)
    return {
        "aspect_buckets": True if hp.aspect_buckets is None else hp.aspect_buckets,
        "num_class_images": (hp.num_class_images or DEFAULTS["num_class_images"]) if prior else 0,
        "prior_loss_weight": (hp.prior_loss_weight or 1.0) if prior else 0.0,
        "guidance_scale": (hp.guidance_scale or DEFAULTS["flux_guidance"]) if data.guidance_embeds else 0.0,
    }


def _test_records(hp: Hyperparameters, data: TrainingData) -> int:
    """How many records `test_fraction` holds out (none unless asked)."""
    if not hp.test_fraction:
        return 0
    _in_range("test_fraction", hp.test_fraction, 0.0, 0.5)
    test_records = math.floor(data.num_records * hp.test_fraction)
    if test_records < 1:
        raise InvalidArgument(
            f"hyperparameters.test_fraction {hp.test_fraction:g} of {data.num_records} records leaves no test "
            "record; raise it or upload more data"
        )
    return test_records


def _batching(hp: Hyperparameters, data: TrainingData) -> tuple[int, int]:
    """(batch size, gradient accumulation); the batch splits evenly over a worker's GPUs."""
    batch_size = hp.batch_size or math.lcm(DEFAULTS["batch_size"][data.kind], data.devices)
    if batch_size % data.devices:
        raise InvalidArgument(
            f"hyperparameters.batch_size {batch_size} must be a multiple of the {data.devices} GPUs each worker "
            "trains on (finetune.devices)"
        )
    return batch_size, hp.gradient_accumulation_steps or DEFAULTS["gradient_accumulation_steps"]


def _lora_rank(hp: Hyperparameters, data: TrainingData) -> int:
    """The client's rank, else the default capped by the server's limit (LLM jobs)."""
    default = DEFAULTS["lora_r"][data.kind]
    return hp.lora_r or (min(default, data.max_lora_rank) if data.kind == "llm" else default)


def _default_learning_rate(method: str) -> float:
    return DEFAULTS["learning_rate"]["p_tuning" if method == "p_tuning" else "adapter"]


def _virtual_tokens(hp: Hyperparameters, method: str) -> int:
    return (hp.num_virtual_tokens or DEFAULTS["num_virtual_tokens"]) if method == "p_tuning" else 0
