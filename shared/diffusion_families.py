"""Diffusion pipeline families: which diffusers classes serve a checkpoint, and how each family is driven.

A family is read from the checkpoint (`model_index.json`'s pipeline class) or set in the model entry
(`diffusion.family`). The must-have families are described here; a checkpoint of another family that
diffusers' AutoPipeline knows (Flux.2, Qwen-Image, Z-Image, ...) loads through the same path and is served
with its own scheduler and its pipeline's own defaults. Torch-free at import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FamilyName = Literal["auto", "sd", "sdxl", "sd3", "flux"]
SamplerKind = Literal["noise", "flow", "own"]  # epsilon/v-prediction samplers, flow-matching ones, or none to pick


@dataclass(frozen=True)
class Family:
    name: str
    text2img: str  # diffusers class names
    img2img: str | None
    inpaint: str | None
    samplers: SamplerKind
    distilled_guidance: bool  # guidance_scale is an input of the model (Flux), not classifier-free guidance
    negative_prompt: bool
    default_steps: int
    default_guidance: float
    max_sequence_length: int | None = None  # T5 tokens of the prompt; None: the family has no T5 encoder
    controlnet: str | None = None  # the text-to-image pipeline with ControlNets; None: not served for this family


FAMILIES: dict[str, Family] = {
    "sd": Family(
        "sd", "StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline",
        "noise", False, True, 25, 7.5, controlnet="StableDiffusionControlNetPipeline",
    ),
    "sdxl": Family(
        "sdxl", "StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline",
        "noise", False, True, 30, 5.0, controlnet="StableDiffusionXLControlNetPipeline",
    ),
    "sd3": Family(
        "sd3", "StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline",
        "flow", False, True, 28, 7.0, max_sequence_length=256,
    ),
    "flux": Family(
        "flux", "FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline",
        "flow", True, False, 28, 3.5, max_sequence_length=512, controlnet="FluxControlNetPipeline",
    ),
}  # fmt: skip

_BY_CLASS = {
    class_name: family
    for family in FAMILIES.values()
    for class_name in (family.text2img, family.img2img, family.inpaint)
}


def family_of_class(class_name: str) -> Family | None:
    """The must-have family whose text-to-image, image-to-image or inpainting pipeline this is."""
    return _BY_CLASS.get(class_name)


OTHER_DEFAULT_STEPS, OTHER_DEFAULT_GUIDANCE = 30, 4.0  # set a model entry's own for such a checkpoint


def other_family(class_name: str, negative_prompt: bool) -> Family:
    """A family diffusers' AutoPipeline knows and we do not describe: served with its checkpoint's scheduler, and
    image-to-image or inpainting where AutoPipeline has a pipeline for it; a negative prompt where its pipeline
    takes one."""
    return Family(
        class_name, class_name, None, None, "own", False, negative_prompt, OTHER_DEFAULT_STEPS, OTHER_DEFAULT_GUIDANCE
    )
