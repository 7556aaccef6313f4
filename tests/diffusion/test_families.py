"""SDXL, SD3 and Flux through a real gRPC channel to a real server process, on the built-in tiny models.

Each family runs text-to-image, image-to-image and inpainting through its own diffusers pipelines; what must
hold for every family is what holds for SD: seeds reproduce, a batch equals its images alone, progress and
cancellation, PNG parameters, the kept pixels of an inpainting, adapters, and clear refusals.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from PIL import Image, ImageFilter

from modelworks.diffusion.v1 import diffusion_pb2 as pb
from tests.diffusion.test_service import HALF_MASK, INIT, KEPT, REPAINTED, pixels, png
from tests.scrape import metric_value

pytestmark = pytest.mark.timeout(900)

FAMILY_MODELS = {"sdxl": "tiny-sdxl", "sd3": "tiny-sd3", "flux": "tiny-flux"}
ENTRIES = [
    {"name": name, "kind": "diffusion", "source": f"builtin:{name}", "dtype": "float32", "diffusion": {"steps": 4}}
    for name in FAMILY_MODELS.values()
]
ENTRIES[2]["diffusion"] |= {"width": 64, "height": 64}  # Flux's own default is 128 latents a side (1024 pixels)
ENTRIES += [
    {"name": "tiny-controlnet-sdxl", "kind": "controlnet", "source": "builtin:tiny-controlnet-sdxl",
     "dtype": "float32", "controlnet": {"base_family": "sdxl"}},
    *({"name": name, "kind": "controlnet", "source": "builtin:tiny-controlnet-flux", "dtype": "float32",
       "controlnet": {"base_family": "flux"}} for name in ("tiny-controlnet-flux", "tiny-controlnet-flux-b")),
]  # fmt: skip
FLOW = ["Euler", "Euler a", "Euler Karras", "Euler Exponential", "Euler Beta"]
SCHEDULERS = {
    "sdxl": ["DDIM", "Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "UniPC", "PNDM", "LMS", "Heun", "LCM"],
    "sd3": [*FLOW, "Heun"],
    "flux": FLOW,  # Flux plans its own sigmas, which Heun cannot take
}
FAMILIES = list(FAMILY_MODELS)


def make_family_adapter(data_dir, model: str, name: str, seed: int) -> None:
    """A LoRA with random non-zero weights on the model's UNet or transformer, saved by its pipeline class's
    `save_lora_weights` (diffusers' format for that family) into the adapter store."""
    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from shared.adapters import AdapterInfo, AdapterStore
    from shared.loaders import load_diffusion_pipeline
    from shared.settings import Settings

    settings = Settings.model_validate({"data_dir": str(data_dir), "models": ENTRIES})
    entry = next(m for m in settings.models if m.name == model)
    pipe = load_diffusion_pipeline(entry, settings).pipeline
    component = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    denoiser = getattr(pipe, component)
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    denoiser.add_adapter(config)

    def write(folder):
        type(pipe).save_lora_weights(
            folder,
            **{
                f"{component}_lora_layers": get_peft_model_state_dict(denoiser),
                f"{component}_lora_adapter_metadata": denoiser.peft_config["default"].to_dict(),
            },
            safe_serialization=True,
        )

    AdapterStore(settings.adapters_dir).save(AdapterInfo(name=name, kind="diffusion", base_model=model), write)


@pytest.fixture(scope="module")
def family_server(data_dir, tmp_path_factory):
    from shared.builtin import ensure_builtin
    from tests.conftest import TEST_SERVER_CONFIG
    from tests.harness import spawn_service

    for model in FAMILY_MODELS.values():
        ensure_builtin(model, data_dir / "models")
        make_family_adapter(data_dir, model, f"{model}-style", seed=7)
    ensure_builtin("tiny-controlnet-sdxl", data_dir / "models")
    ensure_builtin("tiny-controlnet-flux", data_dir / "models")
    config = {**TEST_SERVER_CONFIG, "data_dir": str(data_dir), "models": ENTRIES}
    server = spawn_service("diffusion", tmp_path_factory.mktemp("family-server"), config, timeout=300)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stub(family_server) -> Iterator:
    from modelworks.diffusion.v1 import diffusion_pb2_grpc

    with grpc.insecure_channel(family_server.address) as channel:
        yield diffusion_pb2_grpc.DiffusionServiceStub(channel)


def request(family: str, **fields) -> pb.GenerateImagesRequest:
    return pb.GenerateImagesRequest(**({"model": FAMILY_MODELS[family], "prompt": "a red fox", "steps": 4} | fields))


def generate(stub, family: str, **fields) -> pb.Image:
    return stub.GenerateImages(request(family, **fields)).images[0]


def refusal(stub, family: str, **fields) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        stub.GenerateImages(request(family, **fields))
    return caught.value


def test_each_model_says_its_family_and_what_it_takes(stub):
    models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
    for family, name in FAMILY_MODELS.items():
        info = models[name]
        assert info.family == family
        assert list(info.schedulers) == SCHEDULERS[family]
        assert list(stub.ListSchedulers(pb.ListSchedulersRequest(model=name)).names) == SCHEDULERS[family]
        assert list(info.modes) == ["text2img", "img2img", "inpaint"]
        assert (info.default_width, info.default_height, info.size_multiple) == (64, 64, 8)
        assert info.guidance == ("distilled" if family == "flux" else "classifier-free")
        assert info.negative_prompt is (family != "flux")
    assert models["tiny-flux"].default_guidance_scale == pytest.approx(3.5)
    assert models["tiny-flux"].default_steps == 4
    assert models["tiny-sd3"].default_scheduler == "Euler" and models["tiny-sdxl"].default_scheduler == "Euler"


@pytest.mark.parametrize("family", FAMILIES)
def test_seeds_reproduce_and_a_batch_equals_its_images_alone(stub, family):
    batch = stub.GenerateImages(request(family, seed=5, num_images=2)).images
    assert [i.seed for i in batch] == [5, 6]
    for image in batch:
        alone = generate(stub, family, seed=image.seed)
        assert np.abs(pixels(alone.png) - pixels(image.png)).max() <= 2
        assert (alone.width, alone.height) == (64, 64)
    assert not np.array_equal(pixels(batch[0].png), pixels(batch[1].png))
    assert np.array_equal(pixels(generate(stub, family, seed=5).png), pixels(generate(stub, family, seed=5).png))


@pytest.mark.parametrize("family", FAMILIES)
def test_png_parameters_name_the_family(stub, family):
    image = generate(stub, family, seed=9, width=48, height=32)
    text = Image.open(io.BytesIO(image.png)).text
    recorded = json.loads(text["modelworks"])
    assert (recorded["family"], recorded["seed"], recorded["model"]) == (family, 9, FAMILY_MODELS[family])
    assert "Size: 48x32" in text["parameters"] and (image.width, image.height) == (48, 32)
    assert Image.open(io.BytesIO(image.png)).size == (48, 32)


@pytest.mark.parametrize("family", FAMILIES)
def test_stream_progress_with_previews_then_the_result(stub, family):
    events = list(stub.GenerateImagesStream(request(family, steps=5, preview=True, seed=1)))
    assert [e.WhichOneof("event") for e in events] == ["progress"] * 5 + ["result"]
    assert [e.progress.step for e in events[:-1]] == [1, 2, 3, 4, 5]
    # a preview at latent resolution (Flux's packed 2x2 patches unpacked first)
    assert Image.open(io.BytesIO(events[0].progress.preview_png)).size == (32, 32)
    unary = generate(stub, family, steps=5, seed=1)
    assert np.array_equal(pixels(events[-1].result.images[0].png), pixels(unary.png))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_cancelled_stream_stops_denoising(stub, family_server, family):
    model = FAMILY_MODELS[family]
    before = metric_value(family_server, "modelworks_diffusion_denoising_steps_total", model=model)
    stream = stub.GenerateImagesStream(request(family, steps=999, seed=1))
    next(stream)
    stream.cancel()
    generate(stub, family, steps=1, seed=2)  # queued behind: runs once the cancelled one stopped
    ran = metric_value(family_server, "modelworks_diffusion_denoising_steps_total", model=model) - before
    assert ran < 999


@pytest.mark.parametrize("family", FAMILIES)
def test_image_to_image_follows_its_init_image_and_strength(stub, family):
    init = generate(stub, family, seed=3).png
    other = generate(stub, family, seed=8).png

    def img2img(image, strength):
        return generate(stub, family, init_image=image, strength=strength, seed=4, steps=10)

    light = img2img(init, 0.3)
    assert (light.width, light.height) == (64, 64)
    assert np.array_equal(pixels(img2img(init, 0.3).png), pixels(light.png))
    assert not np.array_equal(pixels(img2img(other, 0.3).png), pixels(light.png))
    assert not np.array_equal(pixels(img2img(init, 0.9).png), pixels(light.png))


@pytest.mark.parametrize("family", FAMILIES)
def test_inpainting_keeps_every_pixel_outside_the_mask(stub, family):
    image = generate(stub, family, init_image=png(INIT), mask_image=png(HALF_MASK), seed=4, steps=6)
    result = pixels(image.png)
    assert np.array_equal(result[KEPT], INIT[KEPT].astype(np.int16)), "byte for byte outside the mask"
    assert np.abs(result[REPAINTED] - INIT[REPAINTED].astype(np.int16)).mean() > 10
    text = Image.open(io.BytesIO(image.png)).text["parameters"]
    assert "Mask blur: 0" in text and "Denoising strength: 1," in text


@pytest.mark.parametrize("family", FAMILIES)
def test_mask_blur_softens_the_edge_and_keeps_what_it_does_not_reach(stub, family):
    fields = dict(init_image=png(INIT), mask_image=png(HALF_MASK), seed=4, steps=6)
    sharp = pixels(generate(stub, family, **fields).png)
    soft = pixels(generate(stub, family, mask_blur=4, **fields).png)
    reach = np.asarray(Image.fromarray(HALF_MASK).filter(ImageFilter.GaussianBlur(4)))
    untouched = reach == 0
    assert untouched[:, :16].all() and not untouched[:, 28:32].all(), "the blur reaches a few pixels past the edge"
    assert np.array_equal(soft[untouched], INIT[untouched].astype(np.int16))
    assert not np.array_equal(soft[:, 28:36], sharp[:, 28:36]), "the edge is blended"


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("scheduler", ["Euler a", "Euler Karras", "Euler Exponential", "Euler Beta", "Heun"])
def test_flow_matching_schedulers_run(stub, family, scheduler):
    if scheduler not in SCHEDULERS[family]:
        error = refusal(stub, family, scheduler=scheduler)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"available: {', '.join(FLOW)}" in error.details()
        return
    image = generate(stub, family, scheduler=scheduler, seed=2)
    assert Image.open(io.BytesIO(image.png)).text["parameters"].count(f"Sampler: {scheduler},") == 1
    assert not np.array_equal(pixels(image.png), pixels(generate(stub, family, seed=2).png))


@pytest.mark.parametrize("family", FAMILIES)
def test_an_adapter_changes_the_images_and_scale_zero_is_the_base(stub, family):
    adapter = f"{FAMILY_MODELS[family]}-style"
    base = pixels(generate(stub, family, seed=11).png)
    assert not np.array_equal(pixels(generate(stub, family, seed=11, adapter=adapter).png), base)
    assert np.array_equal(pixels(generate(stub, family, seed=11, adapter=adapter, adapter_scale=0.0).png), base)
    assert np.array_equal(pixels(generate(stub, family, seed=11).png), base), "off again after the adapter"


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_a_kohya_lora_file_changes_the_images_as_its_peft_twin_does(stub, data_dir, family):
    from shared.loaders import load_diffusion_pipeline
    from shared.settings import Settings
    from tests.diffusion import lora_files as lf

    model = FAMILY_MODELS[family]
    settings = Settings.model_validate({"data_dir": str(data_dir), "models": ENTRIES})
    pipe = load_diffusion_pipeline(next(m for m in settings.models if m.name == model), settings).pipeline
    if family == "flux":
        state = lf.random_lora(pipe.transformer, seed=31, target_modules=lf.FLUX_DOUBLE_ATTENTION)
        kohya = lf.kohya_flux(state, alpha=8, rank=4)
    else:
        state = lf.random_lora(pipe.unet, seed=31, target_modules=lf.ATTENTION)
        kohya = lf.kohya_unet(state, alpha=8)
    lf.save_peft_adapter(settings.adapters_dir, pipe, state, f"{model}-peft", model)
    lf.save_file_adapter(settings.adapters_dir, kohya, f"{model}-kohya", model, "kohya")
    base = pixels(generate(stub, family, seed=12).png)
    peft_made = pixels(generate(stub, family, seed=12, adapter=f"{model}-peft").png)
    kohya_made = pixels(generate(stub, family, seed=12, adapter=f"{model}-kohya", adapter_scale=1.0).png)
    assert not np.array_equal(peft_made, base)
    assert np.abs(kohya_made - peft_made).max() <= 1, "the Kohya keys convert to the same LoRA"


def test_a_controlnet_steers_sdxl_and_is_offered_to_sdxl_only(stub):
    from tests.diffusion.test_controlnet import control_map

    models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
    assert list(models["tiny-sdxl"].controlnets) == ["tiny-controlnet-sdxl"]
    assert list(models["tiny-flux"].controlnets) == ["tiny-controlnet-flux", "tiny-controlnet-flux-b"]
    assert not models["tiny-sd3"].controlnets, "diffusers' SD3 ControlNet pipeline is not served yet"
    plain = pixels(generate(stub, "sdxl", seed=6).png)
    control = pb.ControlInput(model="tiny-controlnet-sdxl", image=control_map())
    steered = pixels(generate(stub, "sdxl", seed=6, control=[control]).png)
    assert not np.array_equal(plain, steered)
    error = refusal(stub, "flux", control=[control])
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "a ControlNet for sdxl models, not flux" in error.details()


def test_flux_controlnets_steer_compose_and_batch_like_single_images(stub):
    from tests.diffusion.test_controlnet import control_map

    square = pb.ControlInput(model="tiny-controlnet-flux", image=control_map())
    stripes = pb.ControlInput(model="tiny-controlnet-flux-b", image=control_map("stripes"))
    plain = pixels(generate(stub, "flux", seed=6).png)
    steered = pixels(generate(stub, "flux", seed=6, control=[square]).png)
    assert not np.array_equal(plain, steered)
    assert np.array_equal(pixels(generate(stub, "flux", seed=6, control=[square]).png), steered), "reproduces"
    both = pixels(generate(stub, "flux", seed=6, control=[square, stripes]).png)
    assert not np.array_equal(both, steered) and not np.array_equal(both, plain)
    batch = stub.GenerateImages(request("flux", seed=6, num_images=2, control=[square, stripes])).images
    for image in batch:
        alone = generate(stub, "flux", seed=image.seed, control=[square, stripes])
        assert np.abs(pixels(alone.png) - pixels(image.png)).max() <= 2


def test_an_adapter_of_another_family_is_refused(stub):
    error = refusal(stub, "flux", adapter="tiny-sdxl-style")
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "tiny-sdxl" in error.details()


def test_the_negative_prompt_shapes_sdxl_and_sd3_images(stub):
    for family in ("sdxl", "sd3"):
        plain = pixels(generate(stub, family, seed=3, guidance_scale=5).png)
        negative = pixels(generate(stub, family, seed=3, guidance_scale=5, negative_prompt="blurry").png)
        assert not np.array_equal(plain, negative), family


def test_flux_guidance_is_an_input_of_the_model(stub):
    low, high = (pixels(generate(stub, "flux", seed=3, guidance_scale=g).png) for g in (1.0, 6.0))
    assert not np.array_equal(low, high), "distilled guidance changes the transformer's input"


BAD = {
    "a noise sampler on flux": (
        "flux",
        dict(scheduler="DDIM"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "scheduler 'DDIM' does not fit this flux model; available: Euler, Euler a",
    ),
    "a flow sampler on sdxl": (
        "sdxl",
        dict(scheduler="Euler Beta"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "does not fit this sdxl model; available: DDIM",
    ),
    "a negative prompt on flux": (
        "flux",
        dict(negative_prompt="blurry"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "flux models take no negative_prompt",
    ),
    "a mask of another size": (
        "sd3",
        dict(init_image=png(INIT), mask_image=png(HALF_MASK[:32])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "mask_image is 64x32 but init_image is 64x64",
    ),
    "a size off the latent grid": (
        "flux",
        dict(width=60),
        grpc.StatusCode.INVALID_ARGUMENT,
        "multiple of 8 for this model",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_a_clear_status(stub, case):
    family, fields, code, message = BAD[case]
    error = refusal(stub, family, **fields)
    assert error.code() == code and message in error.details(), error.details()


def test_a_flow_scheduler_sets_its_own_sigma_schedule_whatever_the_checkpoint_set():
    from services.diffusion.schedulers import build_scheduler
    from shared.diffusion_families import FAMILIES

    config = {"num_train_timesteps": 1000, "shift": 3.0, "use_beta_sigmas": True}  # a checkpoint's own choice
    plain = build_scheduler("Euler", FAMILIES["sd3"], config)
    assert not plain.config.use_beta_sigmas and not plain.config.stochastic_sampling
    karras = build_scheduler("Euler Karras", FAMILIES["sd3"], config)  # two schedules at once would be refused
    assert karras.config.use_karras_sigmas and not karras.config.use_beta_sigmas


def test_requests_with_and_without_a_negative_prompt_never_share_a_batch():
    from dataclasses import replace

    from tests.diffusion.test_engine import image_request

    plain = image_request("a fox", 1)
    assert plain.batch_key() != replace(plain, negative_prompt="blurry").batch_key()
    assert replace(plain, negative_prompt="a").batch_key() == replace(plain, negative_prompt="b").batch_key()


def test_a_controlnet_of_another_architecture_is_not_offered(data_dir):
    import torch

    from services.diffusion.host import ControlNets
    from shared.builtin import ensure_builtin
    from shared.loaders import load_diffusion_pipeline
    from shared.settings import Settings

    ensure_builtin("tiny-controlnet-sdxl", data_dir / "models")
    wrong = {"name": "mislabelled", "kind": "controlnet", "source": "builtin:tiny-controlnet-sdxl", "dtype": "float32"}
    right = {"name": "right", "kind": "controlnet", "source": "builtin:tiny-controlnet-sd", "dtype": "float32"}
    sd = {"name": "tiny-sd", "kind": "diffusion", "source": "builtin:tiny-sd", "dtype": "float32"}
    settings = Settings.model_validate({"data_dir": str(data_dir), "models": [sd, wrong, right]})
    unet = load_diffusion_pipeline(settings.models[0], settings).pipeline.unet
    fitting = ControlNets(settings).fitting("sd", unet, torch.device("cpu"), torch.float64)
    assert list(fitting) == ["right"], "an SDXL ControlNet labelled sd does not fit SD's UNet"
    assert fitting["right"].dtype == torch.float64, "it runs in the dtype of the model it serves"
