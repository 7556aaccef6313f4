"""The diffusion engine: one thread per model that batches compatible requests into pipeline calls.

Requests with the same size, steps, guidance, scheduler, adapter and mode (text-to-image, image-to-image or
inpainting) run as one batch through diffusers' pipeline — prompts, negative prompts, seeds, init images and
masks stay each request's own (one `torch.Generator` per image). Each batch gets a fresh scheduler. A progress
event goes to every request at every denoising step; if every request of a batch is cancelled, the pipeline is
interrupted at the next step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from services.diffusion import metrics
from services.diffusion.adapters import DiffusionAdapterCache
from services.diffusion.images import encode_png, keep_unmasked
from services.diffusion.params import ImageRequest
from services.diffusion.pipelines import FamilyPipelines
from services.diffusion.schedulers import build_scheduler
from shared.devices import is_fatal_device_error
from shared.engine_thread import EngineThread
from shared.errors import InvalidArgument, ResourceExhausted, ServiceError
from shared.waiting import WaitingQueue

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GeneratedImage:
    png: bytes
    seed: int
    width: int
    height: int


@dataclass(frozen=True)
class ImageEvent:
    """A progress step, the final images, or an error."""

    step: int = 0
    total_steps: int = 0
    preview_png: bytes = b""
    images: tuple[GeneratedImage, ...] | None = None
    error: ServiceError | None = None

    @property
    def final(self) -> bool:
        return self.images is not None or self.error is not None


@dataclass(eq=False)
class ImageJob:
    request: ImageRequest
    on_event: Callable[[ImageEvent], None]
    progress: bool = True  # False: only the final event (a unary call reads nothing else)
    cancelled: bool = False
    arrival: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        self.cancelled = True


class DiffusionEngine:
    def __init__(
        self,
        pipelines: FamilyPipelines,
        *,
        model_name: str,
        adapters: DiffusionAdapterCache,
        max_batch_images: int,
        max_waiting: int,
        batch_window_s: float,
    ):
        # inpainting works with a regular denoiser (diffusers blends the kept region back into the latents at
        # every step) and with an inpainting one (SD's 9-channel UNet)
        self.pipelines = pipelines
        pipeline = pipelines.text2img
        self._scheduler_config = dict(pipeline.scheduler.config)
        self._own_scheduler = type(pipeline.scheduler)
        self.model_name = model_name
        self.adapters = adapters
        self._max_batch_images = max_batch_images
        self._window = batch_window_s
        self._waiting: WaitingQueue[ImageJob] = WaitingQueue(
            model_name, max_waiting, metrics.REQUESTS_WAITING.labels(model_name).set
        )
        self._current: list[ImageJob] = []  # the batch in the pipeline now
        self._thread = EngineThread(f"diffusion-{model_name}", self._waiting, self._loop, self._fail_all)

    # -- other threads ------------------------------------------------------------------------------

    def start(self, on_death: Callable[[BaseException], None] | None = None) -> None:
        self._thread.start(on_death)

    def submit(self, job: ImageJob) -> None:
        if len(job.request.seeds) > self._max_batch_images:  # every batch fits the budget, the first job too
            raise InvalidArgument(
                f"{len(job.request.seeds)} images were asked for; this server runs at most "
                f"{self._max_batch_images} per batch"
            )
        self._waiting.put(job)

    def shutdown(self, timeout: float = 30.0) -> None:
        self._thread.stop(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.alive

    # -- the engine thread --------------------------------------------------------------------------

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._current = batch
            try:
                self._run(batch)
            except torch.OutOfMemoryError:
                log.warning("out of device memory", extra={"model": self.model_name, "jobs": len(batch)})
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                self._fail(
                    batch,
                    ResourceExhausted("the server ran out of accelerator memory; ask for fewer or smaller images"),
                )
            except ServiceError as exc:
                self._fail(batch, exc)
            except Exception as exc:
                if is_fatal_device_error(exc):
                    raise
                log.exception("pipeline call failed")
                self._fail(batch, ServiceError("image generation hit an internal error; the server logged it"))
            self._current = []

    def _next_batch(self) -> list[ImageJob] | None:
        """The oldest live job and every waiting job compatible with it, up to `max_batch_images` images."""
        waiting = self._waiting
        while True:
            with waiting.cond:
                while not waiting.closed and not waiting.items:
                    waiting.cond.wait()
                if waiting.closed:
                    return None
                if self._window:  # concurrent requests arrive a few ms apart: let them meet in one batch
                    deadline = time.monotonic() + self._window
                    while (left := deadline - time.monotonic()) > 0 and not waiting.closed:
                        waiting.cond.wait(left)
                first = waiting.items.popleft()
                batch, images = [first], len(first.request.seeds)
                key = first.request.batch_key()
                for job in list(waiting.items):
                    size = len(job.request.seeds)
                    if job.request.batch_key() == key and images + size <= self._max_batch_images:
                        waiting.items.remove(job)
                        batch.append(job)
                        images += size
                waiting.publish()
            live = [job for job in batch if not job.cancelled]
            if live:
                return live

    def _run(self, jobs: list[ImageJob]) -> None:
        started = time.perf_counter()
        for job in jobs:
            metrics.QUEUE_WAIT.labels(self.model_name).observe(started - job.arrival)
        spec = jobs[0].request
        self.adapters.activate(spec.adapter, spec.adapter_scale)
        mode, pipe = self.pipelines.for_request(spec)
        pipe.scheduler = (
            build_scheduler(spec.scheduler, self.pipelines.family, self._scheduler_config)
            if spec.scheduler
            else self._own_scheduler.from_config(self._scheduler_config)
        )
        prompts, negatives, generators, init_images, masks, controls = [], [], [], [], [], []
        for job in jobs:
            for seed in job.request.seeds:
                prompts.append(job.request.prompt)
                negatives.append(job.request.negative_prompt)
                generators.append(torch.Generator("cpu").manual_seed(seed))
                init_images.append(job.request.init_image)
                masks.append(job.request.mask)
                controls.append(job.request.control)
        metrics.BATCH_IMAGES.labels(self.model_name).observe(len(prompts))
        kwargs = self.pipelines.call_kwargs(mode, spec, prompts, negatives, init_images, masks, controls)
        kwargs |= dict(
            generator=generators,
            callback_on_step_end=self._progress(jobs),
            callback_on_step_end_tensor_inputs=["latents"],
        )
        with torch.inference_mode():
            images = pipe(**kwargs).images
        self._deliver(jobs, images)

    def _progress(self, jobs: list[ImageJob]) -> Callable:
        """The pipeline's step callback: a progress event (and preview) per live job, and the batch interrupted
        once every job is cancelled."""
        spec = jobs[0].request

        def on_step(pipeline, index: int, timestep, tensors: dict) -> dict:
            latents, row = tensors["latents"], 0
            for job in jobs:
                if job.progress and not job.cancelled:
                    preview = b""
                    if job.request.preview:
                        preview = self.pipelines.preview_png(latents[row], spec.width, spec.height)
                    job.on_event(ImageEvent(step=index + 1, total_steps=pipeline.num_timesteps, preview_png=preview))
                row += len(job.request.seeds)
            metrics.DENOISING_STEPS.labels(self.model_name).inc()
            if all(job.cancelled for job in jobs):
                pipeline._interrupt = True  # diffusers' documented way to stop the loop from a callback
            return {}

        return on_step

    def _deliver(self, jobs: list[ImageJob], images: list) -> None:
        row = 0
        for job in jobs:
            spec = job.request
            results = []
            for seed in spec.seeds:
                image = images[row]
                if spec.mask is not None:
                    image = keep_unmasked(image, spec.init_image, spec.mask, spec.mask_blur)
                png = encode_png(image, self._parameters(spec, seed))
                results.append(GeneratedImage(png, seed, spec.width, spec.height))
                row += 1
            if not job.cancelled:
                metrics.IMAGES.labels(self.model_name).inc(len(results))
                metrics.REQUEST_LATENCY.labels(self.model_name).observe(time.perf_counter() - job.arrival)
                job.on_event(ImageEvent(images=tuple(results)))

    def _parameters(self, spec: ImageRequest, seed: int) -> dict:
        """What the PNG records: enough to make this image again."""
        return {
            "prompt": spec.prompt,
            "negative_prompt": spec.negative_prompt,
            "steps": spec.steps,
            "scheduler": spec.scheduler_label,
            "guidance_scale": spec.guidance_scale,
            "seed": seed,
            "width": spec.width,
            "height": spec.height,
            "model": self.model_name,
            "adapter": spec.adapter or "",
            "adapter_scale": spec.adapter_scale,
            "strength": spec.strength,
            "mask": spec.mask is not None,
            "mask_blur": spec.mask_blur,
            "family": self.pipelines.family.name,
            "control": [{"model": c.model, "scale": c.scale, "start": c.start, "end": c.end} for c in spec.control],
        }

    def _fail(self, jobs: list[ImageJob], error: ServiceError) -> None:
        for job in jobs:
            job.on_event(ImageEvent(error=error))

    def _fail_all(self, error: ServiceError) -> None:
        """Whatever the loop leaves: the batch it was running and every job still waiting."""
        jobs, self._current = [*self._current, *self._waiting.drain()], []
        self._fail(jobs, error)
