"""The Images tab: text-to-image and image-to-image over `DiffusionService.GenerateImagesStream`.

Live progress shows the service's latent preview; finished images go to a gallery as the PNG files the
service made (so a download keeps their "parameters" chunk), each captioned with its seed and settings.
"""

from __future__ import annotations

import collections
import io
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
from PIL import Image

from modelworks.diffusion.v1 import diffusion_pb2
from modelworks.finetune.v1 import finetune_pb2
from services.gateway import validation
from services.gateway.adapters import adapter_names
from services.gateway.clients import QUICK_CALL_S, ServiceClients
from services.gateway.errors import call_or_warn, user_errors
from services.gateway.streams import follow

NO_ADAPTER = "(base model)"
MODEL_SCHEDULER = "(model default)"
GALLERY_LIMIT = 48


@dataclass
class ImagesTab:
    pickers: list  # model, adapter, scheduler
    refresh_pickers: Callable  # (model, adapter, scheduler) -> updates of `pickers`
    defaults: list  # steps, guidance, width, height
    model_defaults: Callable  # (model) -> updates of `defaults`


class ImageFiles:
    """A folder of this gateway's output PNGs, removed when the gateway stops; it keeps the newest
    `keep` files (Gradio serves its own copies, so older ones are only a fallback)."""

    def __init__(self, keep: int = 1000):
        self._folder = tempfile.TemporaryDirectory(prefix="modelworks-gateway-")
        self._saved: collections.deque[Path] = collections.deque()
        self._keep = keep
        self._lock = threading.Lock()

    def save(self, png: bytes, seed: int) -> str:
        path = Path(self._folder.name) / f"{seed}-{uuid.uuid4().hex[:8]}.png"
        path.write_bytes(png)
        with self._lock:
            self._saved.append(path)
            while len(self._saved) > self._keep:
                self._saved.popleft().unlink(missing_ok=True)
        return str(path)

    def close(self) -> None:
        self._folder.cleanup()


def image_request(
    prompt, negative_prompt, model, scheduler, steps, guidance, width, height, seed, num_images, adapter,
    adapter_scale, init_image, strength,
) -> diffusion_pb2.GenerateImagesRequest:  # fmt: skip
    """The request for what the form holds, each value checked first."""
    request = diffusion_pb2.GenerateImagesRequest(
        model=model or "",
        prompt=validation.required_text(prompt, "The prompt"),
        negative_prompt=(negative_prompt or "").strip(),
        steps=validation.whole_number(steps, 1, 1000, "Steps"),
        guidance_scale=validation.number_in_range(guidance, 0, 30, "Guidance scale"),
        num_images=validation.whole_number(num_images, 1, 64, "Number of images"),
        scheduler="" if scheduler in (None, "", MODEL_SCHEDULER) else scheduler,
        seed=validation.optional_seed(seed),
        preview=True,
    )
    if init_image is None:
        request.width = validation.image_side(width, "Width")
        request.height = validation.image_side(height, "Height")
    else:
        buffer = io.BytesIO()
        init_image.convert("RGB").save(buffer, format="PNG")
        request.init_image = buffer.getvalue()
        request.strength = validation.number_in_range(strength, 0, 1, "Strength")
    if adapter not in (None, "", NO_ADAPTER):
        request.adapter = adapter
        request.adapter_scale = validation.number_in_range(adapter_scale, 0, 2, "Adapter scale")
    return request


def caption(image: diffusion_pb2.Image, request: diffusion_pb2.GenerateImagesRequest) -> str:
    parts = [f"seed {image.seed}", f"{image.width}×{image.height}", f"{request.steps} steps"]
    parts.append(f"guidance {request.guidance_scale:g}")
    parts.append(request.scheduler or "default scheduler")
    if request.adapter:
        parts.append(f"adapter {request.adapter} ×{request.adapter_scale:g}")
    if request.init_image:
        parts.append(f"img2img strength {request.strength:g}")
    return " · ".join(parts)


def build_images_tab(clients: ServiceClients, files: ImageFiles, concurrency_limit: int) -> ImagesTab:
    diffusion = clients.diffusion_service

    def generate(*args):
        *form, gallery = args
        request = image_request(*form)
        started = time.monotonic()
        gallery = list(gallery or [])
        with user_errors(diffusion, "generate_images"):
            yield None, "Waiting for the diffusion service…", gallery, gallery
            for event in follow(clients.diffusion.GenerateImagesStream(request)):
                if event is None:
                    yield gr.skip(), gr.skip(), gr.skip(), gr.skip()  # lets Gradio close this generator at once
                    continue
                if event.HasField("progress"):
                    progress = event.progress
                    preview = Image.open(io.BytesIO(progress.preview_png)) if progress.preview_png else gr.skip()
                    yield preview, f"Step {progress.step} of {progress.total_steps}", gr.skip(), gr.skip()
                elif event.HasField("result"):
                    made = [(files.save(i.png, i.seed), caption(i, request)) for i in event.result.images]
                    gallery = (made + gallery)[:GALLERY_LIMIT]
                    seeds = ", ".join(str(i.seed) for i in event.result.images)
                    note = f"{len(made)} image(s) in {time.monotonic() - started:.1f} s · seed(s) {seeds}"
                    yield gr.skip(), note, gallery, gallery

    def refresh(current_model, current_adapter, current_scheduler):
        models = call_or_warn(
            diffusion,
            "list_models",
            lambda: clients.diffusion.ListModels(diffusion_pb2.ListModelsRequest(), timeout=QUICK_CALL_S).models,
            [],
        )
        schedulers = call_or_warn(
            diffusion,
            "list_schedulers",
            lambda: clients.diffusion.ListSchedulers(diffusion_pb2.ListSchedulersRequest(), timeout=QUICK_CALL_S).names,
            [],
        )
        names = [m.name for m in models]
        model = current_model if current_model in names else next((m.name for m in models if m.is_default), None)
        adapters = adapter_names(clients, finetune_pb2.JOB_KIND_DIFFUSION, model)
        adapter = current_adapter if current_adapter in adapters else NO_ADAPTER
        return (
            gr.Dropdown(choices=names, value=model),
            gr.Dropdown(choices=[NO_ADAPTER, *adapters], value=adapter),
            gr.Dropdown(
                choices=[MODEL_SCHEDULER, *schedulers],
                value=current_scheduler if current_scheduler in schedulers else MODEL_SCHEDULER,
            ),
        )

    def model_defaults(model_name):
        """Steps, guidance and size of the chosen model, as the service reports them."""
        models = call_or_warn(
            diffusion,
            "list_models",
            lambda: clients.diffusion.ListModels(diffusion_pb2.ListModelsRequest(), timeout=QUICK_CALL_S).models,
            [],
        )
        info = next((m for m in models if m.name == model_name), None)
        if info is None:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return (
            gr.Slider(value=info.default_steps),
            gr.Slider(value=info.default_guidance_scale),
            gr.Slider(value=info.default_width),
            gr.Slider(value=info.default_height),
        )

    with gr.Row():
        with gr.Column(scale=3):
            prompt = gr.Textbox(label="Prompt", lines=2, elem_id="images-prompt")
            negative_prompt = gr.Textbox(label="Negative prompt", lines=1)
            with gr.Row():
                model = gr.Dropdown(label="Model", choices=[], allow_custom_value=True, elem_id="images-model")
                scheduler = gr.Dropdown(
                    label="Scheduler", choices=[MODEL_SCHEDULER], value=MODEL_SCHEDULER, allow_custom_value=True
                )
                refresh_button = gr.Button("↻ Refresh", size="sm", scale=0, min_width=100, elem_id="images-refresh")
            with gr.Row():
                steps = gr.Slider(1, 150, value=20, step=1, label="Steps")
                guidance = gr.Slider(0, 20, value=7.5, step=0.5, label="Guidance scale", info="≤ 1 turns guidance off")
            with gr.Row():
                width = gr.Slider(64, 1024, value=512, step=8, label="Width")
                height = gr.Slider(64, 1024, value=512, step=8, label="Height")
            with gr.Row():
                seed = gr.Number(label="Seed", value=-1, precision=0, info="-1 draws one; image i gets seed + i")
                num_images = gr.Slider(1, 8, value=1, step=1, label="Images")
            with gr.Row():
                adapter = gr.Dropdown(
                    label="Adapter",
                    choices=[NO_ADAPTER],
                    value=NO_ADAPTER,
                    allow_custom_value=True,
                    elem_id="images-adapter",
                )
                adapter_scale = gr.Slider(0, 2, value=1.0, step=0.05, label="Adapter scale")
            with gr.Accordion("Image to image", open=False):
                init_image = gr.Image(label="Init image (optional)", type="pil", sources=["upload", "clipboard"])
                strength = gr.Slider(0, 1, value=0.75, step=0.05, label="Strength", info="how far from the init image")
            generate_button = gr.Button("Generate", variant="primary", elem_id="images-generate")
        with gr.Column(scale=2):
            preview = gr.Image(label="Preview", interactive=False, height=256, elem_id="images-preview")
            status = gr.Markdown(elem_id="images-status")
    gallery = gr.Gallery(
        label="Gallery", columns=6, height=420, object_fit="contain", preview=False, elem_id="images-gallery",
        format="png",
    )  # fmt: skip
    gallery_items = gr.State([])
    inputs = [
        prompt, negative_prompt, model, scheduler, steps, guidance, width, height, seed, num_images, adapter,
        adapter_scale, init_image, strength, gallery_items,
    ]  # fmt: skip
    generate_button.click(
        generate,
        inputs,
        [preview, status, gallery, gallery_items],
        api_name="generate_images",
        concurrency_limit=concurrency_limit,
    )
    pickers, defaults = [model, adapter, scheduler], [steps, guidance, width, height]
    refresh_button.click(refresh, pickers, pickers, api_visibility="private")
    model.input(refresh, pickers, pickers, api_visibility="private").then(
        model_defaults, [model], defaults, api_visibility="private"
    )
    return ImagesTab(pickers, refresh, defaults, model_defaults)
