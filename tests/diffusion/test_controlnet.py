"""ControlNet through a real gRPC channel to a real server process, on tiny-sd with the built-in tiny ControlNet
(configured under two names, to compose two)."""

from __future__ import annotations

import io
import re

import grpc
import numpy as np
import pytest
from PIL import Image

from modelworks.diffusion.v1 import diffusion_pb2 as pb
from tests.diffusion.test_service import INIT, pixels, png, request


def control_map(kind: str = "square") -> bytes:
    """A white-on-black edge map: a square's outline, or vertical stripes."""
    image = np.zeros((64, 64, 3), np.uint8)
    if kind == "square":
        image[16, 16:48] = image[47, 16:48] = image[16:48, 16] = image[16:48, 47] = 255
    else:
        image[:, ::8] = 255
    return png(image)


def control(model: str = "tiny-controlnet-sd", image: bytes | None = None, **fields) -> pb.ControlInput:
    return pb.ControlInput(model=model, image=control_map() if image is None else image, **fields)


def generate(stub, **fields) -> np.ndarray:
    return pixels(stub.GenerateImages(request(seed=6, **fields)).images[0].png)


def test_the_model_lists_its_controlnets(diffusion_stub):
    models = {m.name: m for m in diffusion_stub.ListModels(pb.ListModelsRequest()).models}
    assert list(models["tiny-sd"].controlnets) == ["tiny-controlnet-sd", "tiny-controlnet-sd-b"]


def test_a_control_image_steers_the_same_seed_and_reproduces(diffusion_stub):
    plain = generate(diffusion_stub)
    steered = generate(diffusion_stub, control=[control()])
    assert not np.array_equal(plain, steered)
    assert np.array_equal(generate(diffusion_stub, control=[control()]), steered)
    assert not np.array_equal(generate(diffusion_stub, control=[control(image=control_map("stripes"))]), steered)
    assert np.abs(generate(diffusion_stub, control=[control(scale=0.0)]) - plain).max() <= 1, "weight 0: no control"


def test_two_controlnets_compose(diffusion_stub):
    square = control()
    stripes = control("tiny-controlnet-sd-b", image=control_map("stripes"))
    both = generate(diffusion_stub, control=[square, stripes])
    assert not np.array_equal(both, generate(diffusion_stub, control=[square]))
    assert not np.array_equal(both, generate(diffusion_stub, control=[stripes]))


def test_start_and_end_bound_the_steps_it_applies_to(diffusion_stub):
    whole = generate(diffusion_stub, control=[control()], steps=8)
    late = generate(diffusion_stub, control=[control(start=0.5)], steps=8)
    assert not np.array_equal(whole, late)


def test_a_batch_with_control_equals_its_images_alone(diffusion_stub):
    batch = diffusion_stub.GenerateImages(request(seed=6, num_images=2, control=[control()])).images
    for image in batch:
        alone = diffusion_stub.GenerateImages(request(seed=image.seed, control=[control()])).images[0]
        assert np.abs(pixels(alone.png) - pixels(image.png)).max() <= 2


def test_canny_turns_a_photo_into_the_edge_map_it_sends(diffusion_stub):
    from services.diffusion.canny import canny

    photo = INIT.copy()
    photo[20:44, 20:44] = (20, 10, 30)  # a dark square on the gradient
    edges = canny(Image.fromarray(photo))
    assert np.asarray(edges)[32, 18:23].max() == 255 and np.asarray(edges)[5, 5].max() == 0
    from_photo = generate(diffusion_stub, control=[control(image=png(photo), preprocess="canny")])
    from_map = generate(diffusion_stub, control=[control(image=png(np.asarray(edges)))])
    assert np.array_equal(from_photo, from_map)


def test_png_parameters_record_each_controlnet(diffusion_stub):
    made = diffusion_stub.GenerateImages(request(seed=6, control=[control(scale=0.8, end=0.9)])).images[0]
    text = Image.open(io.BytesIO(made.png)).text["parameters"]
    assert 'ControlNet 0: "Model: tiny-controlnet-sd, Weight: 0.8, Guidance Start: 0, Guidance End: 0.9"' in text


BAD = {
    "an unknown controlnet": (
        [control("no-such-controlnet")],
        {},
        grpc.StatusCode.NOT_FOUND,
        r"control\[0\].model 'no-such-controlnet' is not a configured ControlNet; this model takes: "
        "tiny-controlnet-sd, ",
    ),
    "five at once": ([control(), control(), control(), control(), control()], {}, grpc.StatusCode.INVALID_ARGUMENT,
                     "at most 4 apply at once"),
    "the same one twice": ([control(), control()], {}, grpc.StatusCode.INVALID_ARGUMENT, "may appear once"),
    "a weight over 2": ([control(scale=3)], {}, grpc.StatusCode.INVALID_ARGUMENT, r"control\[0\].scale must be in"),
    "start after end": ([control(start=0.8, end=0.2)], {}, grpc.StatusCode.INVALID_ARGUMENT, "0 <= start < end <= 1"),
    "a NaN weight": ([control(scale=float("nan"))], {}, grpc.StatusCode.INVALID_ARGUMENT, "finite"),
    "an unknown preprocessor": (
        [control(preprocess="depth")], {}, grpc.StatusCode.INVALID_ARGUMENT, "'depth' is unknown"
    ),
    "no image": ([control(image=b"")], {}, grpc.StatusCode.INVALID_ARGUMENT, r"control\[0\].image is empty"),
    "an undecodable image": ([control(image=b"nope")], {}, grpc.StatusCode.INVALID_ARGUMENT, "could not be decoded"),
    "with an init image": (
        [control()], {"init_image": png(INIT)}, grpc.StatusCode.FAILED_PRECONDITION, "control applies to text-to-image"
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_control_input_gets_a_clear_status(diffusion_stub, case):
    controls, fields, code, message = BAD[case]
    with pytest.raises(grpc.RpcError) as caught:
        diffusion_stub.GenerateImages(request(control=controls, **fields))
    assert caught.value.code() == code and re.search(message, caught.value.details()), caught.value.details()
