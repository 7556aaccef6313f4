"""The diffusion engine driven directly, on tiny-sd: batching, its image budget, cancellation, failures, inpainting.

A job whose first progress event blocks (`Gate`) holds the engine thread mid-batch; whatever the test
submits meanwhile waits in the queue, so which jobs meet in the next batch is fixed by construction.
"""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pytest
from prometheus_client import REGISTRY

from services.diffusion.adapters import DiffusionAdapterCache
from services.diffusion.engine import DiffusionEngine, ImageJob
from services.diffusion.params import ImageRequest
from services.diffusion.pipelines import FamilyPipelines
from shared.adapters import AdapterStore
from shared.diffusion_families import FAMILIES
from shared.errors import FailedPrecondition, InvalidArgument, Unavailable
from shared.loaders import load_diffusion_pipeline
from tests.harness import wait_for


@pytest.fixture
def pipeline(settings):
    entry = next(m for m in settings.models if m.kind == "diffusion")
    return load_diffusion_pipeline(entry, settings).pipeline


def make_engine(pipeline, settings, **overrides) -> DiffusionEngine:
    adapters = DiffusionAdapterCache(pipeline, AdapterStore(settings.adapters_dir), 2, "tiny-sd", "builtin:tiny-sd")
    options = dict(max_batch_images=8, max_waiting=64, batch_window_s=0.005) | overrides
    pipelines = FamilyPipelines(pipeline, FAMILIES["sd"])
    return DiffusionEngine(pipelines, model_name="tiny-sd", adapters=adapters, **options)


def image_request(prompt: str, seed: int, steps: int = 4, images: int = 1) -> ImageRequest:
    return ImageRequest(
        prompt=prompt,
        negative_prompt="",
        width=64,
        height=64,
        steps=steps,
        guidance_scale=7.5,
        seeds=tuple(seed + i for i in range(images)),
        scheduler=None,
        scheduler_label="DDIM",
        adapter=None,
        adapter_scale=1.0,
        init_image=None,
        mask=None,
        strength=None,
        preview=False,
    )


class Events:
    """A job's events; with `log`, also (tag, step) into a log shared by several jobs, in engine order."""

    def __init__(self, tag: str = "", log: list | None = None):
        self.tag, self.log = tag, log
        self.events = []
        self.done = threading.Event()

    def __call__(self, event):
        self.events.append(event)
        if self.log is not None and not event.final:
            self.log.append((self.tag, event.step))
        if event.final:
            self.done.set()

    def result(self, timeout=120):
        assert self.done.wait(timeout), "the job did not finish"
        return self.events[-1]


class Gate(Events):
    """Holds the engine thread at this job's first progress event until `release()`."""

    def __init__(self):
        super().__init__()
        self.holding, self._open = threading.Event(), threading.Event()

    def __call__(self, event):
        super().__call__(event)
        if len(self.events) == 1 and not event.final:
            self.holding.set()
            assert self._open.wait(120), "the test never released the engine"

    def release(self):
        self._open.set()


def hold(engine: DiffusionEngine, steps: int = 3) -> tuple[ImageJob, Gate]:
    """Start a job that keeps the engine busy (its batch key differs from the tests' jobs by its steps)."""
    gate = Gate()
    job = ImageJob(image_request("a held job", 0, steps=steps), gate)
    engine.submit(job)
    assert gate.holding.wait(120)
    return job, gate


def sample(name: str) -> float:
    return REGISTRY.get_sample_value(name, {"model": "tiny-sd"}) or 0.0


def test_queued_compatible_requests_run_as_one_batch_and_keep_their_seeds(pipeline, settings):
    engine = make_engine(pipeline, settings)
    engine.start()
    try:
        prompts = ["a cat", "a dog", "a boat", "a tree"]
        solo = []
        for i, prompt in enumerate(prompts):
            events = Events()
            engine.submit(ImageJob(image_request(prompt, seed=i), events))
            solo.append(events.result().images[0])
        _, gate = hold(engine)
        log: list = []
        together = [Events(prompt, log) for prompt in prompts]
        for i, (prompt, events) in enumerate(zip(prompts, together, strict=True)):
            engine.submit(ImageJob(image_request(prompt, seed=i), events))
        gate.release()
        results = [events.result().images[0] for events in together]
        first_steps = log[: len(prompts)]
        assert sorted(first_steps) == sorted((p, 1) for p in prompts), "all four denoise step 1 in one call"
        for alone, batched in zip(solo, results, strict=True):
            assert batched.seed == alone.seed
            assert _max_pixel_difference(alone.png, batched.png) <= 2  # batch size only changes rounding
    finally:
        engine.shutdown()


def batches_in(log: list[tuple[str, int]]) -> list[list[str]]:
    """The jobs of each pipeline call, from the shared event log: a call starts with its jobs' step 1."""
    batches: list[list[str]] = []
    previous_step = None
    for tag, step in log:
        if step == 1:
            if previous_step != 1:
                batches.append([])
            batches[-1].append(tag)
        previous_step = step
    return batches


def test_a_batch_never_exceeds_max_batch_images(pipeline, settings):
    engine = make_engine(pipeline, settings, max_batch_images=3)
    engine.start()
    try:
        with pytest.raises(InvalidArgument, match="at most 3 per batch"):
            engine.submit(ImageJob(image_request("too many", 0, images=4), Events()))
        _, gate = hold(engine)
        log: list = []
        sizes = {f"job{i}": 1 + i % 2 for i in range(4)}  # 6 images in all
        jobs = {tag: Events(tag, log) for tag in sizes}
        for i, (tag, events) in enumerate(jobs.items()):
            engine.submit(ImageJob(image_request("a fox", seed=10 * i, images=sizes[tag]), events))
        gate.release()
        assert all(len(events.result().images) == sizes[tag] for tag, events in jobs.items())
        batches = batches_in(log)
        assert sorted(tag for batch in batches for tag in batch) == sorted(sizes)
        assert [sum(sizes[tag] for tag in batch) for batch in batches] == [3, 3]
    finally:
        engine.shutdown()


def test_cancelling_every_job_of_a_batch_stops_its_denoising(pipeline, settings):
    engine = make_engine(pipeline, settings)
    engine.start()
    try:
        steps_before = sample("modelworks_diffusion_denoising_steps_total")
        job, gate = hold(engine, steps=50)
        job.cancel()
        gate.release()
        after = Events()
        engine.submit(ImageJob(image_request("next", 1, steps=2), after))
        assert after.result().images
        assert sample("modelworks_diffusion_denoising_steps_total") - steps_before <= 2 + 2
        assert not any(e.final for e in gate.events), "a cancelled job gets no result"
    finally:
        engine.shutdown()


def test_a_failing_batch_fails_alone_and_the_engine_goes_on(monkeypatch, pipeline, settings):
    engine = make_engine(pipeline, settings)
    engine.start()
    try:
        _, gate = hold(engine)
        broken = Events()
        engine.submit(ImageJob(image_request("broken", 1), broken))
        forward = pipeline.unet.forward
        monkeypatch.setattr(pipeline.unet, "forward", _raising(RuntimeError("shape mismatch deep inside")))
        gate.release()
        assert gate.result().error.code == "INTERNAL"
        error = broken.result().error
        assert error.code == "INTERNAL" and "shape mismatch" not in error.message
        monkeypatch.setattr(pipeline.unet, "forward", forward)
        fine = Events()
        engine.submit(ImageJob(image_request("fine", 2), fine))
        assert fine.result().images and engine.alive
    finally:
        engine.shutdown()


def test_a_fatal_device_error_ends_the_loop_and_fails_the_queue_with_unavailable(monkeypatch, pipeline, settings):
    engine = make_engine(pipeline, settings)
    deaths: list = []
    engine.start(on_death=deaths.append)
    try:
        _, gate = hold(engine)
        queued = Events()
        engine.submit(ImageJob(image_request("queued", 1), queued))
        monkeypatch.setattr(
            pipeline.unet, "forward", _raising(RuntimeError("CUDA error: device-side assert triggered"))
        )
        gate.release()
        for events in (gate, queued):
            error = events.result().error
            assert isinstance(error, Unavailable) and "restarting" in error.message
        assert len(deaths) == 1
        wait_for(lambda: not engine.alive, 60, "the engine thread to end")  # it fails the requests first
        with pytest.raises(Unavailable):
            engine.submit(ImageJob(image_request("late", 2), Events()))
    finally:
        engine.shutdown()


def _raising(error: BaseException):
    def forward(*args, **kwargs):
        raise error

    return forward


def _max_pixel_difference(a: bytes, b: bytes) -> int:
    import io

    import numpy as np
    from PIL import Image

    pa, pb = (np.asarray(Image.open(io.BytesIO(x)).convert("RGB"), dtype=np.int16) for x in (a, b))
    return int(np.abs(pa - pb).max())


def gradient(flip: bool = False):
    """A 64x64 RGB init image with structure in both directions."""
    from PIL import Image

    ramp = np.linspace(0, 255, 64, dtype=np.uint8)
    rgb = np.stack([np.tile(ramp, (64, 1)), np.tile(ramp[:, None], (1, 64)), np.full((64, 64), 90, np.uint8)], -1)
    return Image.fromarray(np.ascontiguousarray(rgb[:, ::-1]) if flip else rgb)


KEEP = {"left": np.s_[:, :32], "right": np.s_[:, 32:]}


def half_mask(keep: str):
    """Black (keep) on one half, white (repaint) on the other: the 0/255 form `resolve_request` makes."""
    from PIL import Image

    mask = np.full((64, 64), 255, np.uint8)
    mask[KEEP[keep]] = 0
    return Image.fromarray(mask)


def inpaint_request(prompt: str, seed: int, init, keep: str) -> ImageRequest:
    return replace(image_request(prompt, seed), init_image=init, mask=half_mask(keep), strength=1.0)


def _pixels(png: bytes) -> np.ndarray:
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def test_inpainting_batches_only_with_inpainting_and_each_job_keeps_its_own_mask(pipeline, settings):
    engine = make_engine(pipeline, settings)
    engine.start()
    try:
        _, gate = hold(engine)
        log: list = []
        jobs = {tag: Events(tag, log) for tag in ("inpaint-a", "img2img", "inpaint-b")}
        a, b = inpaint_request("a cat", 1, gradient(), "left"), inpaint_request("a dog", 2, gradient(True), "right")
        img2img = replace(a, mask=None)  # the same request but for its mask
        for tag, request in zip(jobs, (a, img2img, b), strict=True):
            engine.submit(ImageJob(request, jobs[tag]))
        gate.release()
        results = {tag: events.result().images[0] for tag, events in jobs.items()}
        assert batches_in(log) == [["inpaint-a", "inpaint-b"], ["img2img"]]
        for tag, request, keep in (("inpaint-a", a, "left"), ("inpaint-b", b, "right")):
            kept = _pixels(results[tag].png)[KEEP[keep]]
            assert np.array_equal(kept, np.asarray(request.init_image, np.int16)[KEEP[keep]]), tag
    finally:
        engine.shutdown()


def test_a_9_channel_inpainting_unet_inpaints_and_refuses_requests_without_a_mask(pipeline, settings):
    import io

    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from services.diffusion.host import model_defaults
    from services.diffusion.params import ImageSpec, resolve_request
    from shared.loaders import LoadedDiffusionPipeline

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({**pipeline.unet.config, "in_channels": 9})  # latents + mask + image
    components = {**pipeline.components, "unet": unet, "requires_safety_checker": False}
    inpainting = StableDiffusionPipeline(**components)
    entry = next(m for m in settings.models if m.kind == "diffusion")
    loaded = LoadedDiffusionPipeline(entry, inpainting, torch.device("cpu"), torch.float32)
    defaults = model_defaults(loaded, FamilyPipelines(inpainting, FAMILIES["sd"]))
    assert defaults.inpainting_only
    with pytest.raises(FailedPrecondition, match="inpainting model"):
        resolve_request(ImageSpec(prompt="a fox"), defaults, settings.diffusion)

    def png(image) -> bytes:
        out = io.BytesIO()
        image.save(out, format="PNG")
        return out.getvalue()

    spec = ImageSpec(prompt="a fox", init_image=png(gradient()), mask_image=png(half_mask("left")), seed=3)
    request = resolve_request(spec, defaults, settings.diffusion)
    engine = make_engine(inpainting, settings)
    engine.start()
    try:
        events = Events()
        engine.submit(ImageJob(request, events))
        result = _pixels(events.result().images[0].png)
    finally:
        engine.shutdown()
    assert np.array_equal(result[KEEP["left"]], np.asarray(gradient(), np.int16)[KEEP["left"]])
    assert np.abs(result[KEEP["right"]] - np.asarray(gradient(), np.int16)[KEEP["right"]]).mean() > 10
