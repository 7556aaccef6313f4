"""Samplers by the names AUTOMATIC1111 and ComfyUI users know, built from a checkpoint's scheduler config.

Noise-prediction families (SD 1.x/2.x, SDXL) take the ten classic samplers; flow-matching families (SD3,
Flux) take flow-matching Euler and its sigma schedules (and Heun where the pipeline plans its own sigmas). A
family we do not describe runs its checkpoint's own scheduler only. Schedulers keep per-run state (step
index, multistep history) and are not thread-safe, so every batch gets a fresh one; the loaded model is never
touched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from shared.diffusion_families import Family
from shared.errors import InvalidArgument


def _factory(class_name: str, **overrides: Any) -> Callable[[dict], Any]:
    def make(config: dict) -> Any:
        import diffusers

        return getattr(diffusers, class_name).from_config(config, **overrides)

    return make


NOISE_SCHEDULERS: dict[str, Callable[[dict], Any]] = {
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

_FLOW_EULER = "FlowMatchEulerDiscreteScheduler"
_FLOW_FLAGS = ("stochastic_sampling", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


def _flow_euler(flag: str | None = None) -> Callable[[dict], Any]:
    """Flow-matching Euler with at most `flag` on: every other flag off, whatever the checkpoint's config says
    (two sigma schedules at once are refused by diffusers, and "Euler" must be plain Euler)."""
    return _factory(_FLOW_EULER, **{name: name == flag for name in _FLOW_FLAGS})


FLOW_SCHEDULERS: dict[str, Callable[[dict], Any]] = {
    "Euler": _flow_euler(),
    "Euler a": _flow_euler("stochastic_sampling"),  # fresh noise each step, as ancestral samplers
    "Euler Karras": _flow_euler("use_karras_sigmas"),
    "Euler Exponential": _flow_euler("use_exponential_sigmas"),
    "Euler Beta": _flow_euler("use_beta_sigmas"),
    "Heun": _factory("FlowMatchHeunDiscreteScheduler"),
}
# Flux hands the scheduler its own sigmas and resolution shift, which Heun cannot take
_FLOW_WITHOUT_CUSTOM_SIGMAS = {"Heun"}

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
    _FLOW_EULER: "Euler",
    "FlowMatchHeunDiscreteScheduler": "Heun",
}


def schedulers_for(family: Family) -> dict[str, Callable[[dict], Any]]:
    if family.samplers == "noise":
        return NOISE_SCHEDULERS
    if family.samplers == "flow":
        if family.name == "flux":
            return {k: v for k, v in FLOW_SCHEDULERS.items() if k not in _FLOW_WITHOUT_CUSTOM_SIGMAS}
        return FLOW_SCHEDULERS
    return {}


def scheduler_names(family: Family) -> list[str]:
    return list(schedulers_for(family))


def check_scheduler(name: str, family: Family) -> str:
    allowed = schedulers_for(family)
    if name not in allowed:
        if not allowed:
            raise InvalidArgument(
                f"{family.name} models run their checkpoint's own scheduler; leave scheduler empty, not {name!r}"
            )
        raise InvalidArgument(
            f"scheduler {name!r} does not fit this {family.name} model; available: {', '.join(allowed)}"
        )
    return name


def name_of(scheduler: Any) -> str:
    """Our name for a checkpoint's own scheduler (its class name when we have none)."""
    class_name = type(scheduler).__name__
    config = scheduler.config
    if class_name == "DPMSolverMultistepScheduler" and config.get("use_karras_sigmas"):
        return "DPM++ 2M Karras"
    if class_name == _FLOW_EULER:
        for flag, name in (("use_karras_sigmas", "Euler Karras"), ("use_exponential_sigmas", "Euler Exponential"),
                           ("use_beta_sigmas", "Euler Beta"), ("stochastic_sampling", "Euler a")):  # fmt: skip
            if config.get(flag):
                return name
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


def build_scheduler(name: str, family: Family, config: dict) -> Any:
    return schedulers_for(family)[check_scheduler(name, family)](config)
