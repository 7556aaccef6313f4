"""Image bytes in and out: decoding init images and masks, PNGs with their parameters, cheap latent previews."""

from __future__ import annotations

import io
import json

import torch
from PIL import Image, ImageFilter, ImageOps, PngImagePlugin, UnidentifiedImageError

from shared.errors import InvalidArgument

MAX_INIT_IMAGE_PIXELS = 4096 * 4096

# Linear map from SD 1.x/2.x latents to RGB: a preview without running the VAE.
_LATENT_RGB = torch.tensor(
    [[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]]
)


def decode_image(data: bytes, field: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        if image.format not in ("PNG", "JPEG", "MPO"):  # MPO: multi-picture JPEGs from phone cameras
            raise InvalidArgument(f"{field} must be PNG or JPEG, got {image.format}")
        if image.width * image.height > MAX_INIT_IMAGE_PIXELS:
            raise InvalidArgument(f"{field} is {image.width}x{image.height}; at most 4096x4096 is accepted")
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidArgument(f"{field} could not be decoded; send PNG or JPEG bytes") from exc
    return image


def decode_init_image(data: bytes) -> Image.Image:
    return decode_image(data, "init_image").convert("RGB")


def decode_mask(data: bytes) -> Image.Image:
    """A grayscale mask, white = repaint. OpenAI's images.edit marks the area to edit by transparency instead,
    so a mask with any transparency is read by its alpha (transparent = repaint); any other by its luminance."""
    image = decode_image(data, "mask_image")
    if image.has_transparency_data:
        alpha = image.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 255:
            return ImageOps.invert(alpha)
    return image.convert("L")


def fit_mask(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize, then threshold at half as diffusers does, so the pipeline and the paste-back see one mask."""
    if mask.size != size:
        mask = mask.resize(size)
    return mask.point(lambda v: 255 if v >= 128 else 0)


def paste_mask(mask: Image.Image, blur: int) -> Image.Image:
    """The mask the result is composited with: the thresholded mask, its edge softened over `blur` pixels
    (A1111's mask blur); where it is 0, the init image's pixels are kept exactly."""
    return mask.filter(ImageFilter.GaussianBlur(blur)) if blur else mask


def keep_unmasked(generated: Image.Image, init_image: Image.Image, mask: Image.Image, blur: int = 0) -> Image.Image:
    """The init image's own pixels where the mask keeps: the VAE round trip would otherwise alter them too
    (diffusers' inpainting guide recommends the same overlay)."""
    return Image.composite(generated, init_image, paste_mask(mask, blur))


def a1111_parameters(p: dict) -> str:
    """The "parameters" text AUTOMATIC1111 writes, which its PNG Info tab and many tools read back."""
    lines = [p["prompt"]]
    if p.get("negative_prompt"):
        lines.append(f"Negative prompt: {p['negative_prompt']}")
    fields = [
        f"Steps: {p['steps']}",
        f"Sampler: {p['scheduler']}",
        f"CFG scale: {p['guidance_scale']:g}",
        f"Seed: {p['seed']}",
        f"Size: {p['width']}x{p['height']}",
        f"Model: {p['model']}",
    ]
    if p.get("adapter"):
        fields.append(f"Lora: {p['adapter']}:{p['adapter_scale']:g}")
    if p.get("strength") is not None:
        fields.append(f"Denoising strength: {p['strength']:g}")
    for i, control in enumerate(p.get("control") or []):  # as A1111's ControlNet extension writes them
        fields.append(
            f'ControlNet {i}: "Model: {control["model"]}, Weight: {control["scale"]:g}, '
            f'Guidance Start: {control["start"]:g}, Guidance End: {control["end"]:g}"'
        )
    if p.get("mask"):
        fields.append(f"Mask blur: {p.get('mask_blur', 0)}")  # A1111's field; its presence says it was inpainted
    lines.append(", ".join(fields))
    return "\n".join(lines)


def encode_png(image: Image.Image, parameters: dict) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", a1111_parameters(parameters))
    info.add_text("modelworks", json.dumps(parameters, sort_keys=True))
    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def latent_preview_png(latents: torch.Tensor) -> bytes:
    """A small RGB preview of one image's latents (C, h, w) — no VAE decode, so it costs almost nothing."""
    latents = latents.detach().float().cpu()
    if latents.shape[0] == _LATENT_RGB.shape[0]:
        rgb = torch.einsum("chw,cr->hwr", latents, _LATENT_RGB)
    else:
        rgb = latents.mean(0)[..., None].expand(-1, -1, 3)
    pixels = ((rgb + 1) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, format="PNG")
    return out.getvalue()
