"""Samplers by the names AUTOMATIC1111 and ComfyUI users know, built from a checkpoint's scheduler config.

Schedulers keep per-run state (step index, multistep history) and are not thread-safe, so every batch
gets a fresh one; the loaded model is never touched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from shared.errors import InvalidArgument


def _factory(class_name: str, **overrides: Any) -> Callable[[dict], Any]:
    def make(config: dict) -> Any:
        import diffusers

        return getattr(diffusers, class_name).from_config(config, **overrides)

    return make


SCHEDULERS: dict[str, Callable[[dict], Any]] = {
    "DDIM": _factory("DDIMScheduler"),
    "Euler": _factory("EulerDiscreteScheduler"),
    "Euler a": _factory("EulerAncestralDiscreteScheduler"),
    "DPM++ 2M": _factory("DPMSolverMultistepScheduler"),
    "DPM++ 2M Karras": _factory("DPMSolverMultistepScheduler", use_karras_sigmas=True),
    "UniPC": _factory("UniPCMultistepScheduler"),
    "PNDM": _factory("PNDMScheduler"),
    "LMS": _factory("LMSDiscreteScheduler"),
    "Heun": _factory("HeunDiscreteScheduler"),
    "LCM": _factory("LCMScheduler"),
}

# PNDM starts with Runge-Kutta warm-up steps and cannot plan fewer than its order
MIN_STEPS = {"PNDM": 4}

# checkpoint scheduler class -> our name, to report a model's own scheduler
_NAMES_BY_CLASS = {
    "DDIMScheduler": "DDIM",
    "EulerDiscreteScheduler": "Euler",
    "EulerAncestralDiscreteScheduler": "Euler a",
    "DPMSolverMultistepScheduler": "DPM++ 2M",
    "UniPCMultistepScheduler": "UniPC",
    "PNDMScheduler": "PNDM",
    "LMSDiscreteScheduler": "LMS",
    "HeunDiscreteScheduler": "Heun",
    "LCMScheduler": "LCM",
}


def scheduler_names() -> list[str]:
    return list(SCHEDULERS)


def check_scheduler(name: str) -> str:
    if name not in SCHEDULERS:
        raise InvalidArgument(f"unknown scheduler {name!r}; available: {', '.join(SCHEDULERS)}")
    return name


def name_of(scheduler: Any) -> str:
    """Our name for a checkpoint's own scheduler (its class name when we have none)."""
    class_name = type(scheduler).__name__
    if class_name == "DPMSolverMultistepScheduler" and scheduler.config.get("use_karras_sigmas"):
        return "DPM++ 2M Karras"
    return _NAMES_BY_CLASS.get(class_name, class_name)


# LCM plans its steps within the schedule it was distilled on (`original_inference_steps`, 50)
LCM_MAX_STEPS = 50


def check_steps(name: str, steps: int, strength: float | None = None) -> None:
    """Refuse step counts a scheduler cannot plan (it would fail mid-request otherwise)."""
    minimum = MIN_STEPS.get(name, 1)
    if steps < minimum:
        raise InvalidArgument(f"the {name} scheduler needs at least {minimum} steps, got {steps}")
    if name == "LCM" and steps > int(LCM_MAX_STEPS * (strength or 1.0)):
        limit = int(LCM_MAX_STEPS * (strength or 1.0))
        raise InvalidArgument(f"the LCM scheduler allows at most {limit} steps here, got {steps}")


def build_scheduler(name: str, config: dict) -> Any:
    return SCHEDULERS[check_scheduler(name)](config)
