"""The Images tab's components: the form on the left, live preview and status on the right, the gallery below.

Only layout lives here; `images.py` wires the events. `ImagesLayout.form` lists the form's components in
the order of `ImageForm`'s fields; `api_form` their hidden twins for `/generate_images`, which start at the
API's defaults (None: the model's steps, guidance and size, where a slider must start at a number).
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from services.gateway.images_form import MODEL_SCHEDULER, NO_ADAPTER, NO_CONTROLNET, ImageForm

DEFAULTS = ImageForm()
# where the sliders start until the picked model's own defaults arrive (page load fills them)
START = {"steps": 20, "guidance": 7.5, "width": 512, "height": 512}


@dataclass
class ImagesLayout:
    model: gr.Dropdown
    adapter: gr.Dropdown
    scheduler: gr.Dropdown
    refresh: gr.Button
    banner: gr.Markdown  # shown while the picked model has random weights
    model_info: gr.Markdown  # the picked model's family and what it takes
    generate: gr.Button
    preview: gr.Image
    status: gr.Markdown
    gallery: gr.Gallery
    form: list  # in `ImageForm` order
    api_form: list  # hidden twins of `form`, at the API's defaults

    def field(self, name: str) -> gr.components.Component:
        return self.form[ImageForm.names().index(name)]

    @property
    def defaults(self) -> list:
        """What a model sets when picked: steps, guidance, width, height."""
        return [self.field(name) for name in ("steps", "guidance", "width", "height")]


def build_images_layout() -> ImagesLayout:
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            prompt = gr.Textbox(label="Prompt", lines=2, elem_id="images-prompt")
            negative_prompt = gr.Textbox(label="Negative prompt", lines=1)
            model, scheduler, refresh = _pickers()
            banner = gr.Markdown(visible=False, elem_id="images-banner")
            model_info = gr.Markdown(elem_id="images-model-info")
            sampling = _sampling_inputs()
            adapter, adapter_scale = _adapter_inputs()
            init_image, strength, mask, mask_blur = _init_image_inputs()
            control = _control_inputs()
            generate = gr.Button("Generate", variant="primary", elem_id="images-generate")
        with gr.Column(scale=2):
            preview = gr.Image(label="Preview", interactive=False, height=256, elem_id="images-preview")
            status = gr.Markdown(elem_id="images-status")
    # fit_columns=False and scale-down: one 64×64 image stays 64×64 instead of filling the gallery's width
    gallery = gr.Gallery(
        label="Gallery", columns=8, height="auto", object_fit="scale-down", fit_columns=False, preview=False,
        elem_id="images-gallery", format="png",
    )  # fmt: skip
    by_name = {"prompt": prompt, "negative_prompt": negative_prompt, "model": model, "scheduler": scheduler,
               "adapter": adapter, "adapter_scale": adapter_scale, "init_image": init_image, "strength": strength,
               "mask": mask, "mask_blur": mask_blur, **control, **sampling}  # fmt: skip
    form = [by_name[name] for name in ImageForm.names()]
    api_form = [_api_twin(name, component) for name, component in zip(ImageForm.names(), form, strict=True)]
    return ImagesLayout(
        model, adapter, scheduler, refresh, banner, model_info, generate, preview, status, gallery, form, api_form
    )


def _api_twin(name: str, component: gr.components.Component) -> gr.components.Component:
    """A hidden input for the API with the field's default (None where the model decides) and the form
    component's bounds, so an API caller gets the same checks and messages as the form."""
    default = getattr(DEFAULTS, name)
    if isinstance(component, gr.Image | gr.ImageEditor):  # the API sends a mask as an image: white repaints
        return gr.Image(label=name, type="pil", visible=False)
    if isinstance(component, gr.Radio):
        return gr.Textbox(label=name, value=default, visible=False)
    if isinstance(component, gr.Slider | gr.Number):
        bounds = {"minimum": component.minimum, "maximum": component.maximum}
        precision = getattr(component, "precision", None)
        return gr.Number(label=name, value=default, precision=precision, visible=False, **bounds)
    return gr.Textbox(label=name, value=default, visible=False)


def _pickers() -> tuple[gr.Dropdown, gr.Dropdown, gr.Button]:
    with gr.Row(equal_height=False):
        # choices arrive from the service after load; API callers may name any model (the service checks)
        model = gr.Dropdown(label="Model", choices=[], scale=3, allow_custom_value=True, elem_id="images-model")
        scheduler = gr.Dropdown(
            label="Scheduler", choices=[MODEL_SCHEDULER], value=DEFAULTS.scheduler, scale=3, allow_custom_value=True
        )
        refresh = gr.Button("↻ Refresh", size="sm", scale=0, min_width=100, elem_id="images-refresh")
    return model, scheduler, refresh


def _sampling_inputs() -> dict:
    with gr.Row():
        steps = gr.Slider(1, 150, value=START["steps"], step=1, label="Steps")
        guidance = gr.Slider(
            0, 20, value=START["guidance"], step=0.5, label="Guidance scale", info="≤ 1 turns guidance off"
        )
    with gr.Row():
        width = gr.Slider(64, 1024, value=START["width"], step=8, label="Width")
        height = gr.Slider(64, 1024, value=START["height"], step=8, label="Height")
    with gr.Row():
        seed = gr.Number(label="Seed", value=DEFAULTS.seed, precision=0, info="-1 draws one; image i gets seed + i")
        num_images = gr.Slider(1, 8, value=DEFAULTS.num_images, step=1, label="Images")
    return {"steps": steps, "guidance": guidance, "width": width, "height": height, "seed": seed,
            "num_images": num_images}  # fmt: skip


def _init_image_inputs() -> tuple:
    with gr.Accordion("Image to image and inpainting", open=False):
        init_image = gr.Image(label="Init image (optional)", type="pil", sources=["upload", "clipboard"])
        strength = gr.Slider(
            0, 1, value=DEFAULTS.strength, step=0.05, label="Strength", info="how far from the init image"
        )
        mask = gr.ImageEditor(
            label="Inpainting: paint where to repaint (the init image shows here once uploaded)",
            type="pil", sources=[], layers=False, transforms=[], elem_id="images-mask",
            brush=gr.Brush(colors=["#ffffff"], color_mode="fixed", default_size=16),
        )  # fmt: skip
        mask_blur = gr.Slider(
            0,
            64,
            value=DEFAULTS.mask_blur,
            step=1,
            label="Mask blur",
            info="pixels of soft edge; 0 keeps the rest exact",
        )
    return init_image, strength, mask, mask_blur


def _control_inputs() -> dict:
    with gr.Accordion("ControlNet", open=False):
        controlnet = gr.Dropdown(
            label="ControlNet", choices=[NO_CONTROLNET], value=DEFAULTS.controlnet, allow_custom_value=True,
            elem_id="images-controlnet", info="the picked model's ControlNets",
        )  # fmt: skip
        image = gr.Image(label="Control image", type="pil", sources=["upload", "clipboard"])
        preprocess = gr.Radio(["none", "canny"], value="none", label="Preprocess", info="canny: send a photo")
        with gr.Row():
            scale = gr.Slider(0, 2, value=DEFAULTS.control_scale, step=0.05, label="Weight")
            start = gr.Slider(0, 1, value=DEFAULTS.control_start, step=0.05, label="Start")
            end = gr.Slider(0, 1, value=DEFAULTS.control_end, step=0.05, label="End")
    return {"controlnet": controlnet, "control_image": image, "control_preprocess": preprocess,
            "control_scale": scale, "control_start": start, "control_end": end}  # fmt: skip


def _adapter_inputs() -> tuple[gr.Dropdown, gr.Slider]:
    with gr.Row():
        adapter = gr.Dropdown(
            label="Adapter", choices=[NO_ADAPTER], value=DEFAULTS.adapter, allow_custom_value=True,
            elem_id="images-adapter",
        )  # fmt: skip
        adapter_scale = gr.Slider(0, 2, value=DEFAULTS.adapter_scale, step=0.05, label="Adapter scale")
    return adapter, adapter_scale
