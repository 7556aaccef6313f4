"""The diffusion service through a real gRPC channel to a real server process, on tiny-sd."""

from __future__ import annotations

import io
import json
import re
import threading

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from modelworks.diffusion.v1 import diffusion_pb2 as pb
from tests.harness import wait_for
from tests.scrape import metric_value

SCHEDULERS = ["DDIM", "Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "UniPC", "PNDM", "LMS", "Heun", "LCM"]


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def request(**fields) -> pb.GenerateImagesRequest:
    return pb.GenerateImagesRequest(**({"prompt": "a red fox in the snow", "steps": 4} | fields))


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


RAMP = np.linspace(0, 255, 64, dtype=np.uint8)
# a 64x64 init image with structure in both directions
INIT = np.stack([np.tile(RAMP, (64, 1)), np.tile(RAMP[:, None], (1, 64)), np.full((64, 64), 90, np.uint8)], -1)
KEPT, REPAINTED = np.s_[:, :32], np.s_[:, 32:]
HALF_MASK = np.where(np.arange(64) < 32, 0, 255).astype(np.uint8)[None, :].repeat(64, 0)  # keep left, repaint right


def test_lists_every_scheduler_and_the_model(diffusion_stub):
    assert list(diffusion_stub.ListSchedulers(pb.ListSchedulersRequest()).names) == SCHEDULERS
    (model,) = diffusion_stub.ListModels(pb.ListModelsRequest()).models
    assert (model.name, model.default_width, model.default_height, model.default_steps) == ("tiny-sd", 64, 64, 4)
    assert model.default_scheduler == "DDIM" and model.is_default
    assert (model.dtype, model.dtype_reason) == ("float32", "set in the model entry")


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_scheduler_produces_an_image_of_the_asked_size(diffusion_stub, scheduler):
    (image,) = diffusion_stub.GenerateImages(request(scheduler=scheduler, width=48, height=64, seed=5)).images
    assert Image.open(io.BytesIO(image.png)).size == (48, 64)
    assert (image.width, image.height, image.seed) == (48, 64, 5)
    assert f"Sampler: {scheduler}," in Image.open(io.BytesIO(image.png)).text["parameters"]


def test_same_seed_same_pixels_and_another_seed_differs(diffusion_stub):
    a = diffusion_stub.GenerateImages(request(seed=42, scheduler="Euler a")).images[0]
    b = diffusion_stub.GenerateImages(request(seed=42, scheduler="Euler a")).images[0]
    c = diffusion_stub.GenerateImages(request(seed=43, scheduler="Euler a")).images[0]
    assert np.array_equal(pixels(a.png), pixels(b.png))
    assert not np.array_equal(pixels(a.png), pixels(c.png))


def test_unseeded_images_get_distinct_reported_seeds_that_reproduce_them_alone(diffusion_stub):
    images = diffusion_stub.GenerateImages(request(num_images=3)).images
    seeds = [i.seed for i in images]
    assert len(set(seeds)) == 3
    for image in images:
        (alone,) = diffusion_stub.GenerateImages(request(seed=image.seed)).images
        # a batch of 3 and a batch of 1 differ only in float rounding
        assert np.abs(pixels(alone.png) - pixels(image.png)).max() <= 2


def test_png_carries_the_generation_parameters(diffusion_stub, diffusion_adapters):
    req = request(
        negative_prompt="blurry",
        seed=9,
        guidance_scale=5.0,
        scheduler="DPM++ 2M Karras",
        adapter=diffusion_adapters[0],
        adapter_scale=0.5,
    )
    png = Image.open(io.BytesIO(diffusion_stub.GenerateImages(req).images[0].png))
    text = png.text["parameters"]
    assert text.startswith("a red fox in the snow\nNegative prompt: blurry\n")
    for part in (
        "Steps: 4",
        "Sampler: DPM++ 2M Karras",
        "CFG scale: 5",
        "Seed: 9",
        "Size: 64x64",
        "Model: tiny-sd",
        f"Lora: {diffusion_adapters[0]}:0.5",
    ):
        assert part in text
    assert json.loads(png.text["modelworks"])["seed"] == 9


def test_stream_sends_one_progress_event_per_step_then_the_result(diffusion_stub):
    events = list(diffusion_stub.GenerateImagesStream(request(steps=6, preview=True, seed=1)))
    progress = [e.progress for e in events[:-1]]
    assert [e.WhichOneof("event") for e in events] == ["progress"] * 6 + ["result"]
    assert [p.step for p in progress] == [1, 2, 3, 4, 5, 6] and {p.total_steps for p in progress} == {6}
    assert Image.open(io.BytesIO(progress[0].preview_png)).size == (32, 32)  # latent resolution
    streamed = events[-1].result.images[0]
    unary = diffusion_stub.GenerateImages(request(steps=6, seed=1)).images[0]
    assert np.array_equal(pixels(streamed.png), pixels(unary.png))


def test_image_to_image(diffusion_stub):
    # tiny-sd's VAE is random, so outputs do not resemble their init image; what must hold is that the
    # init image and the strength both shape the result, reproducibly, at the init image's size.
    init = diffusion_stub.GenerateImages(request(seed=3, width=64, height=48)).images[0].png
    other_init = diffusion_stub.GenerateImages(request(seed=8, width=64, height=48)).images[0].png

    def img2img(image, strength):
        return diffusion_stub.GenerateImages(request(init_image=image, strength=strength, seed=4, steps=10)).images[0]

    light = img2img(init, 0.3)
    assert (light.width, light.height) == (64, 48), "the size follows the init image"
    assert np.array_equal(pixels(img2img(init, 0.3).png), pixels(light.png))
    assert not np.array_equal(pixels(img2img(other_init, 0.3).png), pixels(light.png))
    assert not np.array_equal(pixels(img2img(init, 0.9).png), pixels(light.png))
    text2img = diffusion_stub.GenerateImages(request(seed=4, steps=10, width=64, height=48)).images[0]
    assert not np.array_equal(pixels(text2img.png), pixels(light.png))


def inpaint(stub, mask: bytes, **fields) -> pb.Image:
    return stub.GenerateImages(request(init_image=png(INIT), mask_image=mask, seed=4, steps=10, **fields)).images[0]


def test_inpainting_keeps_the_black_half_and_repaints_the_white_half(diffusion_stub):
    image = inpaint(diffusion_stub, png(HALF_MASK))
    difference = np.abs(pixels(image.png) - INIT.astype(np.int16))
    # the kept half is the init image's own pixels (pasted back after decoding); the repainted half is new
    assert difference[KEPT].mean() < 1, difference[KEPT].mean()
    assert difference[REPAINTED].mean() > 10 * max(difference[KEPT].mean(), 1), difference[REPAINTED].mean()
    assert np.array_equal(pixels(inpaint(diffusion_stub, png(HALF_MASK)).png), pixels(image.png)), "reproducible"
    metadata = Image.open(io.BytesIO(image.png)).text
    for part in ("Steps: 10", "Seed: 4", "Size: 64x64", "Denoising strength: 1,", "Mask blur: 0"):  # 1.0: the default
        assert part in metadata["parameters"], metadata["parameters"]
    assert json.loads(metadata["modelworks"])["mask"] is True
    plain = Image.open(io.BytesIO(diffusion_stub.GenerateImages(request(seed=4)).images[0].png)).text
    assert "Mask" not in plain["parameters"] and json.loads(plain["modelworks"])["mask"] is False


def test_inpainting_blends_the_kept_region_into_the_latents_at_every_step(diffusion_stub):
    """tiny-sd's UNet has 4 input channels: diffusers replaces the kept region's latents with the (noised)
    init image's after every step, so they do not depend on the prompt, while the repainted region does."""

    def previews(prompt: str) -> list[np.ndarray]:
        req = request(prompt=prompt, init_image=png(INIT), mask_image=png(HALF_MASK), seed=4, steps=6, preview=True)
        events = list(diffusion_stub.GenerateImagesStream(req))
        return [pixels(e.progress.preview_png) for e in events[:-1]]

    cat, boat = previews("a cat"), previews("a boat on a lake")
    assert len(cat) == len(boat) == 6, "strength 1.0 runs every step"
    for step, (a, b) in enumerate(zip(cat, boat, strict=True)):
        assert np.array_equal(a[:, :16], b[:, :16]), f"kept latents differ at step {step + 1}"  # latents: 32x32
    assert not np.array_equal(cat[-1][:, 16:], boat[-1][:, 16:])


def test_an_alpha_mask_repaints_where_transparent_like_the_same_luminance_mask(diffusion_stub):
    luminance = pixels(inpaint(diffusion_stub, png(HALF_MASK)).png)
    colour = np.full((64, 64, 3), 255, np.uint8)  # white everywhere: only the alpha can say what to keep
    alpha = np.dstack([colour, 255 - HALF_MASK])  # OpenAI's convention: opaque keeps, transparent repaints
    assert np.array_equal(pixels(inpaint(diffusion_stub, png(alpha)).png), luminance)
    opaque = np.dstack([HALF_MASK[..., None].repeat(3, -1), np.full((64, 64), 255, np.uint8)])
    assert np.array_equal(pixels(inpaint(diffusion_stub, png(opaque)).png), luminance), "no transparency: luminance"
    other_size = np.asarray(Image.fromarray(HALF_MASK).resize((128, 96), Image.NEAREST))
    with pytest.raises(grpc.RpcError) as caught:
        inpaint(diffusion_stub, png(other_size))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "mask_image is 128x96 but init_image is 64x64" in caught.value.details()


def test_adapter_scale_zero_equals_the_base_model(diffusion_stub, diffusion_adapters):
    base = pixels(diffusion_stub.GenerateImages(request(seed=11)).images[0].png)
    off = diffusion_stub.GenerateImages(request(seed=11, adapter=diffusion_adapters[0], adapter_scale=0.0))
    on = diffusion_stub.GenerateImages(request(seed=11, adapter=diffusion_adapters[0]))
    other = diffusion_stub.GenerateImages(request(seed=11, adapter=diffusion_adapters[1]))
    assert np.array_equal(pixels(off.images[0].png), base)
    assert not np.array_equal(pixels(on.images[0].png), base), "the adapter must be active"
    assert not np.array_equal(pixels(other.images[0].png), pixels(on.images[0].png))
    assert np.array_equal(pixels(diffusion_stub.GenerateImages(request(seed=11)).images[0].png), base)


def test_concurrent_requests_each_keep_their_seed(diffusion_stub):
    """Whether they meet in one batch depends on timing (the engine test pins batching down); either way each
    image is its own seed's."""
    prompts = ["a cat", "a dog", "a boat", "a tree"]
    solo = [
        pixels(diffusion_stub.GenerateImages(request(prompt=p, seed=i)).images[0].png) for i, p in enumerate(prompts)
    ]
    results = [None] * 4

    def call(i):
        results[i] = diffusion_stub.GenerateImages(request(prompt=prompts[i], seed=i)).images[0]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, image in enumerate(results):
        assert image.seed == i
        assert np.abs(pixels(image.png) - solo[i]).max() <= 2


def test_a_cancelled_stream_stops_denoising(diffusion_stub, diffusion_server):
    steps_before = metric_value(diffusion_server, "modelworks_diffusion_denoising_steps_total", model="tiny-sd")
    stream = diffusion_stub.GenerateImagesStream(request(steps=999, seed=1))  # a long job
    next(stream)
    stream.cancel()
    diffusion_stub.GenerateImages(request(steps=1, seed=2))  # queued behind: runs once the cancelled one stopped
    ran = metric_value(diffusion_server, "modelworks_diffusion_denoising_steps_total", model="tiny-sd") - steps_before
    assert ran < 999


def test_a_replaced_adapter_is_served_fresh_and_a_deleted_one_is_not_served(diffusion_stub, settings):
    from shared.adapters import AdapterStore
    from tests.conftest import make_diffusion_adapter

    def generate(adapter):
        return pixels(diffusion_stub.GenerateImages(request(seed=3, adapter=adapter)).images[0].png)

    make_diffusion_adapter(settings, "style.swap", seed=401)  # a '.' in the name, as names allow
    make_diffusion_adapter(settings, "style.reference", seed=402)
    first = generate("style.swap")
    store = AdapterStore(settings.adapters_dir)
    store.delete("style.swap")
    make_diffusion_adapter(settings, "style.swap", seed=402)
    replaced, reference = generate("style.swap"), generate("style.reference")
    assert np.array_equal(replaced, reference) and not np.array_equal(replaced, first)
    store.delete("style.swap")
    with pytest.raises(grpc.RpcError) as caught:
        generate("style.swap")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_error_messages_never_show_paths_or_library_internals(diffusion_stub, settings):
    from tests.llm.test_service import assert_no_internals, write_broken_adapter

    write_broken_adapter(settings, "style-broken-files", "diffusion")
    write_broken_adapter(settings, "style-broken-metadata", "diffusion", broken_metadata=True)
    for adapter in ("style-broken-files", "style-broken-metadata"):
        with pytest.raises(grpc.RpcError) as caught:
            diffusion_stub.GenerateImages(request(adapter=adapter))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION, caught.value.details()
        assert adapter in caught.value.details()
        assert_no_internals(caught.value.details(), settings)
    assert diffusion_stub.GenerateImages(request(steps=1)).images


def _gif(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="GIF")
    return out.getvalue()


BAD = {
    "width not a multiple of 8": (request(width=50), grpc.StatusCode.INVALID_ARGUMENT, "multiple of 8"),
    "mask blur without a mask": (request(mask_blur=4), grpc.StatusCode.INVALID_ARGUMENT, "mask_blur applies to"),
    "mask blur over the limit": (
        request(init_image=png(INIT), mask_image=png(HALF_MASK), mask_blur=65),
        grpc.StatusCode.INVALID_ARGUMENT,
        r"mask_blur must be in \[0, 64\]",
    ),
    "a flow-matching scheduler on SD": (
        request(scheduler="Euler Karras"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "does not fit this sd model; available: DDIM",
    ),
    "height over the maximum": (request(height=4096), grpc.StatusCode.INVALID_ARGUMENT, "maximum is 1024"),
    "too many steps": (request(steps=1001), grpc.StatusCode.INVALID_ARGUMENT, "maximum is 1000"),
    "more steps than the schedule": (request(steps=1000), grpc.StatusCode.INVALID_ARGUMENT, "at most 999 steps"),
    "prompt over the character limit": (
        request(prompt="x" * 20_001),
        grpc.StatusCode.INVALID_ARGUMENT,
        r"the limit is 20000 \(diffusion.max_prompt_chars\)",
    ),
    "too many images": (request(num_images=9), grpc.StatusCode.INVALID_ARGUMENT, "num_images"),
    "negative guidance": (request(guidance_scale=-1), grpc.StatusCode.INVALID_ARGUMENT, "guidance_scale must be >= 0"),
    "strength above one": (request(init_image=b"\x89PNG", strength=1.5), grpc.StatusCode.INVALID_ARGUMENT, "strength"),
    "strength without init image": (request(strength=0.5), grpc.StatusCode.INVALID_ARGUMENT, "init_image"),
    "unknown scheduler": (request(scheduler="Euler b"), grpc.StatusCode.INVALID_ARGUMENT, "available: DDIM"),
    "too few steps for PNDM": (
        request(scheduler="PNDM", steps=2),
        grpc.StatusCode.INVALID_ARGUMENT,
        "at least 4 steps",
    ),
    "too many steps for LCM": (request(scheduler="LCM", steps=60), grpc.StatusCode.INVALID_ARGUMENT, "at most 50"),
    "undecodable init image": (request(init_image=b"not an image"), grpc.StatusCode.INVALID_ARGUMENT, "PNG or JPEG"),
    "mask without init image": (
        request(mask_image=png(HALF_MASK)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "mask_image needs init_image",
    ),
    "undecodable mask": (
        request(init_image=png(INIT), mask_image=b"not an image"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "mask_image could not be decoded; send PNG or JPEG",
    ),
    "mask in another format": (
        request(init_image=png(INIT), mask_image=_gif(HALF_MASK)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "mask_image must be PNG or JPEG, got GIF",
    ),
    "unknown model": (request(model="sdxl"), grpc.StatusCode.NOT_FOUND, "served diffusion models: tiny-sd"),
    "unknown adapter": (request(adapter="no-such-style"), grpc.StatusCode.NOT_FOUND, "not found"),
    "malformed adapter name": (request(adapter="../x"), grpc.StatusCode.INVALID_ARGUMENT, "adapter name"),
    "an LLM adapter": (request(adapter="llm-lora"), grpc.StatusCode.FAILED_PRECONDITION, "not diffusion models"),
}


@pytest.fixture(scope="module")
def llm_adapter_in_store(settings):
    from tests.conftest import make_lora_adapter

    make_lora_adapter(settings, "llm-lora", seed=1)


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_a_clear_status_and_the_server_stays_healthy(
    diffusion_stub, diffusion_server, llm_adapter_in_store, case
):
    bad, code, message = BAD[case]
    for call in (diffusion_stub.GenerateImages, lambda r: list(diffusion_stub.GenerateImagesStream(r))):
        with pytest.raises(grpc.RpcError) as caught:
            call(bad)
        assert caught.value.code() == code
        assert re.search(message, caught.value.details()), caught.value.details()
    with grpc.insecure_channel(diffusion_server.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_metrics_are_exported(diffusion_stub, diffusion_server):
    diffusion_stub.GenerateImages(request(steps=1))
    assert metric_value(diffusion_server, "modelworks_diffusion_images_total", model="tiny-sd") >= 1
    assert metric_value(diffusion_server, "modelworks_diffusion_request_latency_seconds_count", model="tiny-sd") >= 1
    assert metric_value(diffusion_server, "modelworks_grpc_requests_total", method="GenerateImages", code="OK") >= 1
    wait_for(
        lambda: metric_value(diffusion_server, "modelworks_diffusion_num_requests_waiting", model="tiny-sd") == 0,
        10,
        "an empty queue",
    )
