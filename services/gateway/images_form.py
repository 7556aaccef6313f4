"""What the Images form sends: one typed value, `ImageForm`, checked and turned into a `GenerateImagesRequest`.

Its fields are the form's inputs in the order `/generate_images` takes them, with the API's defaults (None
for steps, guidance and size: the model's own, as the service resolves them), so a new setting is one field
here and one component in `images_layout.py`.
"""

from __future__ import annotations

import inspect
import io
from collections.abc import Callable
from dataclasses import astuple, dataclass, fields
from typing import Any

import gradio as gr
from PIL import Image, ImageChops

from modelworks.diffusion.v1 import diffusion_pb2
from services.gateway import validation

NO_ADAPTER = "(base model)"
NO_CONTROLNET = "(none)"
MODEL_SCHEDULER = "(model default)"


@dataclass(frozen=True)
class ImageForm:
    """Images to make, as the form and the API give them (unchecked). None leaves a value to the model."""

    prompt: str | None = None
    negative_prompt: str | None = None
    model: str | None = None  # None or "": the service's default model
    scheduler: str | None = MODEL_SCHEDULER
    steps: float | None = None
    guidance: float | None = None
    width: float | None = None
    height: float | None = None
    seed: float | None = -1
    num_images: float | None = 1
    adapter: str | None = NO_ADAPTER
    adapter_scale: float | None = 1.0
    init_image: Any = None  # a PIL image: image-to-image from it
    strength: float | None = 0.75
    mask: Any = None  # painted over the init image (the editor's value), or a PIL image (white repaints): inpainting
    mask_blur: float | None = 0
    controlnet: str | None = NO_CONTROLNET  # one ControlNet from the form (the gRPC API composes several)
    control_image: Any = None  # a PIL image: the control map, or a photo with control_preprocess "canny"
    control_preprocess: str | None = "none"
    control_scale: float | None = 1.0
    control_start: float | None = 0.0
    control_end: float | None = 1.0

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def values(self) -> tuple:
        return astuple(self)

    def request(self) -> diffusion_pb2.GenerateImagesRequest:
        """The request, each value checked first (a `gr.Error` that says what to change)."""
        request = diffusion_pb2.GenerateImagesRequest(
            model=self.model or "",
            prompt=validation.required_text(self.prompt, "The prompt"),
            negative_prompt=(self.negative_prompt or "").strip(),
            num_images=validation.whole_number(self.num_images, 1, 64, "Number of images"),
            scheduler="" if self.scheduler in (None, "", MODEL_SCHEDULER) else self.scheduler,
            seed=validation.optional_seed(self.seed),
            preview=True,
        )
        if self.steps is not None:
            request.steps = validation.whole_number(self.steps, 1, 1000, "Steps")
        if self.guidance is not None:
            request.guidance_scale = validation.number_in_range(self.guidance, 0, 30, "Guidance scale")
        if self.init_image is None:
            if self.width is not None:
                request.width = validation.image_side(self.width, "Width")
            if self.height is not None:
                request.height = validation.image_side(self.height, "Height")
        else:
            buffer = io.BytesIO()
            self.init_image.convert("RGB").save(buffer, format="PNG")
            request.init_image = buffer.getvalue()
            request.strength = validation.number_in_range(self.strength, 0, 1, "Strength")
        mask = mask_png(self.mask, self.init_image)
        if mask:
            if self.init_image is None:
                raise gr.Error("Inpainting needs an init image: upload one, then paint over it where to repaint.")
            request.mask_image = mask
            request.mask_blur = validation.whole_number(self.mask_blur, 0, 64, "Mask blur")
        if self.controlnet not in (None, "", NO_CONTROLNET):
            request.control.append(self._control())
        if self.adapter not in (None, "", NO_ADAPTER):
            request.adapter = self.adapter
            request.adapter_scale = validation.number_in_range(self.adapter_scale, 0, 2, "Adapter scale")
        return request

    def _control(self) -> diffusion_pb2.ControlInput:
        if self.control_image is None:
            raise gr.Error(
                f"ControlNet {self.controlnet} needs a control image: upload an edge map, or a photo with canny."
            )
        buffer = io.BytesIO()
        self.control_image.convert("RGB").save(buffer, format="PNG")
        return diffusion_pb2.ControlInput(
            model=self.controlnet,
            image=buffer.getvalue(),
            preprocess="canny" if self.control_preprocess == "canny" else "",
            scale=validation.number_in_range(self.control_scale, 0, 2, "ControlNet weight"),
            start=validation.number_in_range(self.control_start, 0, 1, "ControlNet start"),
            end=validation.number_in_range(self.control_end, 0, 1, "ControlNet end"),
        )


def mask_png(value: Any, init_image: Any) -> bytes:
    """The inpainting mask as PNG bytes (white repaints), or b"" where nothing is masked. From the editor: where
    any layer is painted, brought to the init image's size (the editor may show it scaled); from the API: a
    PIL image, read by its luminance as the service reads it."""
    if value is None:
        return b""
    if isinstance(value, dict):
        layers = [layer for layer in value.get("layers") or [] if layer is not None]
        if not layers:
            return b""
        painted = layers[0].convert("RGBA").getchannel("A")
        for layer in layers[1:]:
            painted = ImageChops.lighter(painted, layer.convert("RGBA").getchannel("A").resize(painted.size))
        if painted.getbbox() is None:  # nothing painted
            return b""
        mask = painted.point(lambda alpha: 255 if alpha else 0)
        if init_image is not None and mask.size != init_image.size:
            mask = mask.resize(init_image.size, Image.NEAREST)
    else:
        mask = value.convert("L")
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return buffer.getvalue()


def form_signature(fn: Callable) -> Callable:
    """Give `fn(*form)` a signature naming each input with its default: the API page shows them and Gradio
    takes every input but the prompt as optional."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    parameters = [inspect.Parameter(f.name, kind, default=f.default) for f in fields(ImageForm)]
    parameters[0] = inspect.Parameter("prompt", kind)
    fn.__signature__ = inspect.Signature(parameters)
    return fn
