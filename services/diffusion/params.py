"""Image requests as clients send them, and their validated, defaulted form."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from typing import Any

from services.diffusion.control import Control, ControlSpec, resolve_controls
from services.diffusion.images import decode_init_image, decode_mask, fit_mask
from services.diffusion.schedulers import check_scheduler, check_steps
from shared.adapters import validate_adapter_name
from shared.diffusion_families import FAMILIES, Family
from shared.errors import FailedPrecondition, InvalidArgument
from shared.settings import DiffusionSettings

DEFAULT_STRENGTH = 0.75  # image-to-image
DEFAULT_INPAINT_STRENGTH = 1.0  # diffusers' inpainting default: the masked area starts from pure noise
MAX_ADAPTER_SCALE = 10.0
MAX_MASK_BLUR = 64  # pixels; A1111's slider stops there too


@dataclass(frozen=True)
class ImageSpec:
    """Fields as received; zero or None means "the model's default"."""

    prompt: str = ""
    negative_prompt: str = ""
    width: int = 0
    height: int = 0
    steps: int = 0
    guidance_scale: float | None = None
    seed: int | None = None
    num_images: int = 0
    scheduler: str = ""
    adapter: str = ""
    adapter_scale: float | None = None
    init_image: bytes = b""
    strength: float | None = None
    preview: bool = False
    mask_image: bytes = b""
    mask_blur: int = 0
    control: tuple[ControlSpec, ...] = ()


@dataclass(frozen=True)
class ModelDefaults:
    width: int
    height: int
    steps: int
    guidance_scale: float
    scheduler: str  # the name reported in PNG metadata
    scheduler_override: str | None  # None: the checkpoint's own scheduler
    train_timesteps: int = 1000  # the schedule the model was trained on: no sampler plans more steps than it has
    inpainting_only: bool = False  # a 9-channel inpainting UNet: it cannot run without a mask
    family: Family = FAMILIES["sd"]
    size_multiple: int = 8  # pixels per latent patch side: sizes must be a multiple of it
    modes: frozenset[str] = frozenset({"text2img", "img2img", "inpaint"})  # the pipelines this model has
    controlnets: dict[str, str] = field(default_factory=dict)  # every configured ControlNet -> its base family
    usable_controlnets: tuple[str, ...] = ()  # those of its family whose encoder matches this model's UNet


@dataclass(frozen=True)
class ImageRequest:
    """A validated request: everything the engine needs, nothing left to default."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seeds: tuple[int, ...]
    scheduler: str | None  # a name its family allows (`schedulers.schedulers_for`), or None for the checkpoint's own
    scheduler_label: str
    adapter: str | None
    adapter_scale: float
    init_image: Any | None  # PIL image, already at width x height
    mask: Any | None  # PIL "L" image at width x height, only 0 (keep) and 255 (repaint)
    strength: float | None
    preview: bool
    mask_blur: int = 0  # the paste-back's soft edge, in pixels
    control: tuple[Control, ...] = ()

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one pipeline call (prompts and seeds may differ)."""
        return (
            self.width,
            self.height,
            self.steps,
            self.guidance_scale,
            self.scheduler,
            self.adapter,
            self.adapter_scale,
            self.init_image is not None,
            self.mask is not None,  # inpainting runs its own pipeline
            self.strength,
            self.mask_blur,
            bool(self.negative_prompt),  # SDXL encodes "no negative prompt" as zeros, an empty one as CLIP's ""
            tuple(control.key() for control in self.control),  # the same ControlNets at the same weights
        )


def _check_finite(name: str, value: float | None) -> None:
    if value is not None and not math.isfinite(value):
        raise InvalidArgument(f"{name} must be a finite number")


def _check_size(name: str, value: int, maximum: int, multiple: int) -> None:
    if value % multiple or value < multiple:
        raise InvalidArgument(f"{name} must be a positive multiple of {multiple} for this model, got {value}")
    if value > maximum:
        raise InvalidArgument(f"{name} is {value}; the maximum is {maximum}")


def _check_mode(spec: ImageSpec, defaults: ModelDefaults) -> None:
    """A mask needs the image it masks, an inpainting model needs a mask, and the model must have the pipeline."""
    if spec.mask_image and not spec.init_image:
        raise InvalidArgument("mask_image needs init_image: send the image to inpaint with its mask")
    if spec.mask_blur and not spec.mask_image:
        raise InvalidArgument("mask_blur applies to inpainting only; send mask_image with it")
    if not 0 <= spec.mask_blur <= MAX_MASK_BLUR:
        raise InvalidArgument(f"mask_blur must be in [0, {MAX_MASK_BLUR}] pixels, got {spec.mask_blur}")
    if defaults.inpainting_only and not spec.mask_image:
        raise FailedPrecondition(
            "this is an inpainting model; send init_image and mask_image (white = repaint, black = keep)"
        )
    mode = "inpaint" if spec.mask_image else "img2img" if spec.init_image else "text2img"
    if mode not in defaults.modes:
        raise FailedPrecondition(
            f"this {defaults.family.name} model has no {mode} pipeline; it serves {', '.join(sorted(defaults.modes))}"
        )
    if spec.control and mode != "text2img":
        raise FailedPrecondition("control applies to text-to-image; send it without init_image and mask_image")
    if spec.negative_prompt and not defaults.family.negative_prompt:
        raise InvalidArgument(
            f"{defaults.family.name} models take no negative_prompt (their guidance is distilled); leave it empty"
        )


def _resolve_strength(spec: ImageSpec, steps: int) -> float | None:
    """Image-to-image defaults to 0.75, inpainting to 1.0, as diffusers' pipelines do."""
    if not spec.init_image:
        if spec.strength is not None:
            raise InvalidArgument("strength applies to image-to-image only; send init_image with it")
        return None
    if spec.strength is not None:
        strength = spec.strength
    else:
        strength = DEFAULT_INPAINT_STRENGTH if spec.mask_image else DEFAULT_STRENGTH
    if not 0 <= strength <= 1:
        raise InvalidArgument(f"strength must be in [0, 1], got {strength:g}")
    if int(steps * strength) < 1:
        raise InvalidArgument(
            f"strength {strength:g} x {steps} steps leaves no denoising step; raise strength or steps"
        )
    return strength


def _resolve_images(spec: ImageSpec, defaults: ModelDefaults, limits: DiffusionSettings) -> tuple:
    """The output size, and the init image and mask decoded and brought to it."""
    init_image = decode_init_image(spec.init_image) if spec.init_image else None
    mask = decode_mask(spec.mask_image) if spec.mask_image else None
    if mask is not None and mask.size != init_image.size:
        raise InvalidArgument(
            f"mask_image is {mask.width}x{mask.height} but init_image is {init_image.width}x{init_image.height}; "
            "send a mask of the image's size"
        )
    multiple = defaults.size_multiple
    if init_image is not None:  # unset sizes follow the init image (rounded down to the model's multiple)
        width = spec.width or max(multiple, init_image.width // multiple * multiple)
        height = spec.height or max(multiple, init_image.height // multiple * multiple)
    else:
        width, height = spec.width or defaults.width, spec.height or defaults.height
    _check_size("width", width, limits.max_width, multiple)
    _check_size("height", height, limits.max_height, multiple)
    if init_image is not None and init_image.size != (width, height):
        init_image = init_image.resize((width, height))
    if mask is not None:
        mask = fit_mask(mask, (width, height))
    return width, height, init_image, mask


def resolve_request(spec: ImageSpec, defaults: ModelDefaults, limits: DiffusionSettings) -> ImageRequest:
    """Apply the model's defaults and check every field; each error says what is allowed."""
    for name in ("prompt", "negative_prompt"):  # before anything tokenizes them
        length = len(getattr(spec, name))
        if length > limits.max_prompt_chars:
            raise InvalidArgument(
                f"{name} is {length} characters; the limit is {limits.max_prompt_chars} (diffusion.max_prompt_chars)"
            )
    for name in ("guidance_scale", "adapter_scale", "strength"):
        _check_finite(name, getattr(spec, name))
    if spec.steps > limits.max_steps:
        raise InvalidArgument(f"steps is {spec.steps}; the maximum is {limits.max_steps}")
    if spec.num_images > limits.max_num_images:
        raise InvalidArgument(f"num_images is {spec.num_images}; the maximum is {limits.max_num_images}")
    if spec.guidance_scale is not None and spec.guidance_scale < 0:
        raise InvalidArgument(f"guidance_scale must be >= 0 (0 turns guidance off), got {spec.guidance_scale:g}")
    if spec.adapter_scale is not None and abs(spec.adapter_scale) > MAX_ADAPTER_SCALE:
        raise InvalidArgument(f"adapter_scale must be within ±{MAX_ADAPTER_SCALE:g}, got {spec.adapter_scale:g}")
    if spec.adapter_scale is not None and not spec.adapter:
        raise InvalidArgument("adapter_scale is set but no adapter is named")
    if spec.adapter:
        validate_adapter_name(spec.adapter)
    scheduler = check_scheduler(spec.scheduler, defaults.family) if spec.scheduler else defaults.scheduler_override
    steps = spec.steps or defaults.steps
    if steps >= defaults.train_timesteps:
        raise InvalidArgument(
            f"steps is {steps}; this model's noise schedule has {defaults.train_timesteps} timesteps, "
            f"so at most {defaults.train_timesteps - 1} steps"
        )
    check_steps(scheduler or defaults.scheduler, steps, spec.strength if spec.init_image else None)
    _check_mode(spec, defaults)

    strength = _resolve_strength(spec, steps)
    width, height, init_image, mask = _resolve_images(spec, defaults, limits)

    count = spec.num_images or 1
    base_seed = spec.seed if spec.seed is not None else secrets.randbits(32)
    return ImageRequest(
        prompt=spec.prompt,
        negative_prompt=spec.negative_prompt,
        width=width,
        height=height,
        steps=steps,
        guidance_scale=defaults.guidance_scale if spec.guidance_scale is None else spec.guidance_scale,
        seeds=tuple((base_seed + i) % 2**64 for i in range(count)),
        scheduler=scheduler,
        scheduler_label=scheduler or defaults.scheduler,
        adapter=spec.adapter or None,
        adapter_scale=1.0 if spec.adapter_scale is None else spec.adapter_scale,
        init_image=init_image,
        mask=mask,
        strength=strength,
        preview=spec.preview,
        mask_blur=spec.mask_blur,
        control=resolve_controls(spec.control, defaults, (width, height)),
    )
