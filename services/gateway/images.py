"""The Images tab: text-to-image, image-to-image and inpainting over `DiffusionService.GenerateImagesStream`.

Live progress shows the service's latent preview; finished images go to a gallery as the PNG files the
service made (so a download keeps their "parameters" chunk), each captioned with its seed and settings.
The layout is `images_layout.py`, the form's value `images_form.py`; this module wires the events.
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
import grpc
from PIL import Image

from modelworks.diffusion.v1 import diffusion_pb2
from modelworks.finetune.v1 import finetune_pb2
from services.gateway.adapters import adapter_names
from services.gateway.chat_request import BUILTIN_BANNER
from services.gateway.clients import QUICK_CALL_S, ServiceClients
from services.gateway.errors import call_or_warn, user_errors
from services.gateway.images_form import MODEL_SCHEDULER, NO_ADAPTER, NO_CONTROLNET, ImageForm, form_signature
from services.gateway.images_layout import ImagesLayout, build_images_layout
from services.gateway.streams import follow

GALLERY_LIMIT = 48
PRIVATE = {"api_visibility": "private"}


@dataclass
class ImagesTab:
    pickers: list  # model, adapter, scheduler, ControlNet
    refresh_pickers: Callable  # (model, adapter, scheduler, ControlNet) -> updates of `pickers`
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


def image_request(*form) -> diffusion_pb2.GenerateImagesRequest:
    """The request for what the form holds (in `ImageForm` order), each value checked first."""
    return ImageForm(*form).request()


def caption(image: diffusion_pb2.Image, request: diffusion_pb2.GenerateImagesRequest) -> str:
    parts = [f"seed {image.seed}", f"{image.width}×{image.height}", f"{request.steps} steps"]
    parts.append(f"guidance {request.guidance_scale:g}")
    parts.append(request.scheduler or "default scheduler")
    if request.adapter:
        parts.append(f"adapter {request.adapter} ×{request.adapter_scale:g}")
    for control in request.control:
        parts.append(f"ControlNet {control.model} ×{control.scale:g}")
    if request.mask_image:
        parts.append(f"inpaint strength {request.strength:g}")
    elif request.init_image:
        parts.append(f"img2img strength {request.strength:g}")
    return " · ".join(parts)


def model_summary(info: diffusion_pb2.ModelInfo) -> str:
    """One line on what the picked model is and takes, so the form's options can be read against it."""
    if not info.family:  # not loaded yet
        return ""
    parts = [f"**{info.family}**", f"{info.guidance} guidance"]
    parts.append("negative prompt" if info.negative_prompt else "no negative prompt")
    parts.append(", ".join(info.modes))
    parts.append(f"sizes in steps of {info.size_multiple} px")
    return " · ".join(parts)


def _generators(clients: ServiceClients, files: ImageFiles) -> tuple[Callable, Callable]:
    """The form's Generate (adding to this page's gallery) and `/generate_images` (its own images only)."""

    def generate(*args):
        """Make images for the form's values, showing each step's preview; the gallery keeps earlier ones."""
        *form, gallery = args
        request = ImageForm(*form).request()
        started = time.monotonic()
        gallery = list(gallery or [])
        with user_errors(clients.diffusion_service, "generate_images"):
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

    @form_signature
    def api_generate(*form):
        """Make images for `prompt`; every other input is optional (None: the model's own steps, guidance and
        size). Streams (preview, status, gallery); the last gallery holds this call's images."""
        for preview, status, gallery, _ in generate(*form, []):
            yield preview, status, gallery

    return generate, api_generate


def _pickers(clients: ServiceClients) -> tuple[Callable, Callable, Callable]:
    """The functions that fill the pickers, a model's defaults and the random-weights banner."""
    diffusion = clients.diffusion_service

    def models() -> list:
        return clients.diffusion.ListModels(diffusion_pb2.ListModelsRequest(), timeout=QUICK_CALL_S).models

    def refresh(current_model, current_adapter, current_scheduler, current_controlnet=NO_CONTROLNET):
        """The pickers as the services see them now, keeping the current picks where they still exist."""
        listed = call_or_warn(diffusion, "list_models", models, [])
        names = [m.name for m in listed]
        model = current_model if current_model in names else next((m.name for m in listed if m.is_default), None)
        # each family takes its own schedulers (flow-matching ones for SD3 and Flux)
        info = next((m for m in listed if m.name == model), None)
        schedulers = list(info.schedulers) if info else []
        controlnets = list(info.controlnets) if info else []
        adapters = adapter_names(clients, finetune_pb2.JOB_KIND_DIFFUSION, model)
        adapter = current_adapter if current_adapter in adapters else NO_ADAPTER
        return (
            gr.Dropdown(choices=names, value=model),
            gr.Dropdown(choices=[NO_ADAPTER, *adapters], value=adapter),
            gr.Dropdown(
                choices=[MODEL_SCHEDULER, *schedulers],
                value=current_scheduler if current_scheduler in schedulers else MODEL_SCHEDULER,
            ),
            gr.Dropdown(
                choices=[NO_CONTROLNET, *controlnets],
                value=current_controlnet if current_controlnet in controlnets else NO_CONTROLNET,
            ),
        )

    def model_defaults(model_name):
        """Steps, guidance and size of the chosen model, as the service reports them."""
        info = next((m for m in call_or_warn(diffusion, "list_models", models, []) if m.name == model_name), None)
        if info is None:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return (
            gr.Slider(value=info.default_steps),
            gr.Slider(value=info.default_guidance_scale),
            gr.Slider(value=info.default_width),
            gr.Slider(value=info.default_height),
        )

    def banner(model_name):
        """The random-weights banner, shown while the picked model is a built-in test model, and what the model
        takes (quiet when the service is down: the pickers' refresh says so)."""
        try:
            info = next((m for m in models() if m.name == model_name), None)
        except grpc.RpcError:
            return gr.skip(), gr.skip()
        shown = gr.Markdown(BUILTIN_BANNER, visible=bool(info and info.source.startswith("builtin:")))
        return shown, model_summary(info) if info else ""

    return refresh, model_defaults, banner


def build_images_tab(clients: ServiceClients, files: ImageFiles, concurrency_limit: int) -> ImagesTab:
    layout: ImagesLayout = build_images_layout()
    generate, api_generate = _generators(clients, files)
    gallery_items = gr.State([])
    shown = [layout.preview, layout.status, layout.gallery]
    images = {"concurrency_limit": concurrency_limit, "concurrency_id": "images"}
    layout.generate.click(generate, [*layout.form, gallery_items], [*shown, gallery_items], **images, **PRIVATE)
    gr.Button(visible=False).click(api_generate, layout.api_form, shown, api_name="generate_images", **images)
    refresh, model_defaults, banner = _pickers(clients)
    pickers = [layout.model, layout.adapter, layout.scheduler, layout.field("controlnet")]
    layout.refresh.click(refresh, pickers, pickers, **PRIVATE)
    layout.model.input(refresh, pickers, pickers, **PRIVATE).then(model_defaults, [layout.model], layout.defaults,
                                                                  **PRIVATE)  # fmt: skip
    # however the model changes (page load, a pick, Fine-tune's "Make images with this adapter")
    layout.model.change(banner, [layout.model], [layout.banner, layout.model_info], show_progress="hidden", **PRIVATE)
    # the mask is painted over the init image: the editor shows it as its background
    layout.field("init_image").change(
        lambda image: image, [layout.field("init_image")], [layout.field("mask")], show_progress="hidden", **PRIVATE
    )
    return ImagesTab(pickers, refresh, layout.defaults, model_defaults)
