"""ControlNet inputs of a request: each names a ControlNet of the model's family, with its control image (or a
photo to turn into an edge map), weight and the span of steps it applies to."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from services.diffusion.canny import canny
from services.diffusion.images import decode_image
from shared.errors import FailedPrecondition, InvalidArgument, NotFound

MAX_CONTROLS = 4
MAX_SCALE = 2.0
PREPROCESSORS = ("", "canny")


@dataclass(frozen=True)
class ControlSpec:
    """As received; None means the default."""

    model: str
    image: bytes
    scale: float | None = None
    start: float | None = None
    end: float | None = None
    preprocess: str = ""


@dataclass(frozen=True)
class Control:
    model: str
    image: Any  # PIL RGB at the output size
    scale: float
    start: float
    end: float

    def key(self) -> tuple:
        """What must match for two requests to share a pipeline call (the image is each request's own)."""
        return (self.model, self.scale, self.start, self.end)


def resolve_controls(specs: tuple[ControlSpec, ...], defaults, size: tuple[int, int]) -> tuple[Control, ...]:
    """Check each input against the ControlNets configured and those that fit this model (`ModelDefaults`)."""
    if len(specs) > MAX_CONTROLS:
        raise InvalidArgument(f"{len(specs)} control inputs were sent; at most {MAX_CONTROLS} apply at once")
    names = [spec.model for spec in specs]
    if len(set(names)) < len(names):
        raise InvalidArgument("each ControlNet may appear once in control; send one image per ControlNet")
    return tuple(_resolve(i, spec, defaults, size) for i, spec in enumerate(specs))


def _check_model(field: str, name: str, defaults) -> None:
    family, usable = defaults.family.name, defaults.usable_controlnets
    if name not in defaults.controlnets:
        raise NotFound(
            f"{field}.model {name!r} is not a configured ControlNet; this model takes: {', '.join(usable) or 'none'}"
        )
    if defaults.controlnets[name] != family:
        raise FailedPrecondition(
            f"{field}.model {name!r} is a ControlNet for {defaults.controlnets[name]} models, not {family}"
        )
    if name not in usable:
        raise FailedPrecondition(
            f"{field}.model {name!r} does not fit this model's UNet (another architecture of {family}); "
            f"this model takes: {', '.join(usable) or 'none'}"
        )


def _resolve(index: int, spec: ControlSpec, defaults, size) -> Control:
    field = f"control[{index}]"
    _check_model(field, spec.model, defaults)
    scale = 1.0 if spec.scale is None else spec.scale
    start = 0.0 if spec.start is None else spec.start
    end = 1.0 if spec.end is None else spec.end
    for name, value in (("scale", scale), ("start", start), ("end", end)):
        if not math.isfinite(value):
            raise InvalidArgument(f"{field}.{name} must be a finite number")
    if not 0 <= scale <= MAX_SCALE:
        raise InvalidArgument(f"{field}.scale must be in [0, {MAX_SCALE:g}], got {scale:g}")
    if not 0 <= start < end <= 1:
        raise InvalidArgument(f"{field} must have 0 <= start < end <= 1, got start {start:g} and end {end:g}")
    if spec.preprocess not in PREPROCESSORS:
        raise InvalidArgument(f"{field}.preprocess {spec.preprocess!r} is unknown; leave it empty or use 'canny'")
    if not spec.image:
        raise InvalidArgument(f"{field}.image is empty; send the control map (PNG or JPEG)")
    image = decode_image(spec.image, f"{field}.image").convert("RGB")
    if image.size != size:
        image = image.resize(size)
    if spec.preprocess == "canny":
        image = canny(image)
    return Control(spec.model, image, scale, start, end)
