"""One model's pipelines (text-to-image, and image-to-image and inpainting where its family has them) sharing
the loaded components, and the keyword arguments each takes for a batch of requests."""

from __future__ import annotations

import collections
import inspect
import logging
from typing import Any

import torch

from services.diffusion.images import latent_preview_png
from shared.diffusion_families import Family

log = logging.getLogger(__name__)

MODES = ("text2img", "img2img", "inpaint")
_AUTO_CLASSES = {"img2img": "AutoPipelineForImage2Image", "inpaint": "AutoPipelineForInpainting"}


def _derive(pipeline, family: Family, mode: str):
    """The family's pipeline for `mode` over the same components (`from_pipe`: no second copy of weights)."""
    import diffusers

    class_name = getattr(family, mode) or _AUTO_CLASSES[mode]
    try:
        derived = getattr(diffusers, class_name).from_pipe(pipeline)
    except (ValueError, KeyError, AttributeError) as exc:  # AutoPipeline has none for this family
        log.info("no pipeline for this mode", extra={"family": family.name, "mode": mode, "reason": str(exc)})
        return None
    derived.set_progress_bar_config(disable=True)
    return derived


CONTROL_PIPELINES_KEPT = 8  # ControlNet pipelines for distinct sets of ControlNets (each shares every weight)


class FamilyPipelines:
    def __init__(
        self, pipeline, family: Family, max_sequence_length: int | None = None, controlnets: dict | None = None
    ):
        self.family = family
        self.controlnets = controlnets or {}  # name -> ControlNetModel, of this family
        self._control: collections.OrderedDict[tuple[str, ...], Any] = collections.OrderedDict()
        self.by_mode = {"text2img": pipeline}
        for mode in ("img2img", "inpaint"):
            if (derived := _derive(pipeline, family, mode)) is not None:
                self.by_mode[mode] = derived
        self._sequence_length = max_sequence_length or family.max_sequence_length
        self._takes = {mode: set(inspect.signature(p.__call__).parameters) for mode, p in self.by_mode.items()}

    @property
    def text2img(self):
        return self.by_mode["text2img"]

    @property
    def modes(self) -> frozenset[str]:
        return frozenset(self.by_mode)

    def for_request(self, spec) -> tuple[str, Any]:
        if spec.control:
            return "control", self._control_pipeline(tuple(control.model for control in spec.control))
        mode = "inpaint" if spec.mask is not None else "img2img" if spec.init_image is not None else "text2img"
        return mode, self.by_mode[mode]

    def _control_pipeline(self, names: tuple[str, ...]):
        """The family's ControlNet pipeline over the loaded components with these ControlNets (one, or several
        composed by diffusers' MultiControlNetModel), kept for the next request that names the same ones."""
        if names in self._control:
            self._control.move_to_end(names)
            return self._control[names]
        import diffusers

        models = [self.controlnets[name] for name in names]
        multi = diffusers.FluxMultiControlNetModel if self.family.name == "flux" else diffusers.MultiControlNetModel
        controlnet = models[0] if len(models) == 1 else multi(models)
        pipe = getattr(diffusers, self.family.controlnet).from_pipe(self.text2img, controlnet=controlnet)
        pipe.set_progress_bar_config(disable=True)
        self._control[names] = pipe
        while len(self._control) > CONTROL_PIPELINES_KEPT:
            self._control.popitem(last=False)
        return pipe

    def call_kwargs(
        self, mode: str, spec, prompts: list, negatives: list, init_images: list, masks: list, controls: list
    ) -> dict:
        """What this family's pipeline takes for a batch: size where it takes one (SD's image-to-image keeps its
        init image's size, already brought to the request's), T5 length, images, masks and strength."""
        takes = self._takes.get(mode) or self._takes["text2img"]
        kwargs: dict[str, Any] = dict(
            prompt=prompts, num_inference_steps=spec.steps, guidance_scale=spec.guidance_scale, output_type="pil"
        )
        if any(negatives):
            kwargs["negative_prompt"] = negatives
        if "width" in takes:
            kwargs |= dict(width=spec.width, height=spec.height)
        if self._sequence_length and "max_sequence_length" in takes:
            kwargs["max_sequence_length"] = self._sequence_length
        if mode in ("img2img", "inpaint"):
            kwargs |= dict(image=init_images, strength=spec.strength)
        if mode == "inpaint":
            kwargs["mask_image"] = masks
        if mode == "control":
            kwargs |= self._control_kwargs(spec.control, controls, self.family.name == "flux")
        return kwargs

    @staticmethod
    def _control_kwargs(first: tuple, controls: list[tuple], flux: bool) -> dict:
        """Each ControlNet's images, weight and span; `controls` holds each batch image's request's control
        inputs, `first` the batch's (they share everything but the images). One ControlNet takes an image per
        batch image; several take, per batch image, one per ControlNet (SD, SDXL) or, per ControlNet, one per
        batch image (Flux)."""
        single = len(first) == 1
        if single:
            images = [row[0].image for row in controls]
        elif flux:
            images = [[row[k].image for row in controls] for k in range(len(first))]
        else:
            images = [[c.image for c in row] for row in controls]
        return dict(
            **{"control_image" if flux else "image": images},
            controlnet_conditioning_scale=first[0].scale if single else [c.scale for c in first],
            control_guidance_start=[c.start for c in first],
            control_guidance_end=[c.end for c in first],
        )

    def preview_png(self, latents: torch.Tensor, width: int, height: int) -> bytes:
        """One image's latents as a small RGB preview; packed latents (Flux's 2x2 patches as tokens) are
        unpacked to channels x height x width first."""
        pipe = self.text2img
        if latents.ndim == 2 and hasattr(pipe, "_unpack_latents"):
            latents = pipe._unpack_latents(latents[None], height, width, pipe.vae_scale_factor)[0]
        return latent_preview_png(latents)
