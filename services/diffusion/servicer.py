"""gRPC servicer: translates `modelworks.diffusion.v1` messages to engine jobs and back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from modelworks.diffusion.v1 import diffusion_pb2, diffusion_pb2_grpc
from services.diffusion.control import ControlSpec
from services.diffusion.engine import ImageEvent, ImageJob
from services.diffusion.host import ServedPipeline
from services.diffusion.params import ImageSpec, ModelDefaults
from services.diffusion.pipelines import MODES
from services.diffusion.schedulers import scheduler_names
from shared.aiobridge import EventRelay
from shared.hosting import ModelHost

SERVICE_NAME = diffusion_pb2.DESCRIPTOR.services_by_name["DiffusionService"].full_name


def _optional(message, name: str):
    return getattr(message, name) if message.HasField(name) else None


def spec_from_proto(request: diffusion_pb2.GenerateImagesRequest) -> ImageSpec:
    return ImageSpec(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        width=request.width,
        height=request.height,
        steps=request.steps,
        guidance_scale=_optional(request, "guidance_scale"),
        seed=_optional(request, "seed"),
        num_images=request.num_images,
        scheduler=request.scheduler,
        adapter=request.adapter,
        adapter_scale=_optional(request, "adapter_scale"),
        init_image=request.init_image,
        strength=_optional(request, "strength"),
        preview=request.preview,
        mask_image=request.mask_image,
        mask_blur=request.mask_blur,
        control=tuple(
            ControlSpec(
                model=c.model, image=c.image, scale=_optional(c, "scale"), start=_optional(c, "start"),
                end=_optional(c, "end"), preprocess=c.preprocess,
            )
            for c in request.control
        ),
    )  # fmt: skip


def _result(event: ImageEvent) -> diffusion_pb2.GenerateImagesResponse:
    return diffusion_pb2.GenerateImagesResponse(
        images=[diffusion_pb2.Image(png=i.png, seed=i.seed, width=i.width, height=i.height) for i in event.images]
    )


def _describe_family(info: diffusion_pb2.ModelInfo, defaults: ModelDefaults) -> None:
    family = defaults.family
    info.family, info.negative_prompt, info.size_multiple = family.name, family.negative_prompt, defaults.size_multiple
    info.schedulers.extend(scheduler_names(family))
    info.modes.extend(mode for mode in MODES if mode in defaults.modes)
    info.guidance = "distilled" if family.distilled_guidance else "classifier-free"
    info.controlnets.extend(defaults.usable_controlnets)


class DiffusionServicer(diffusion_pb2_grpc.DiffusionServiceServicer):
    def __init__(self, host: ModelHost[ServedPipeline]):
        self.host = host
        self._events = EventRelay()

    async def _generate(self, request, context, progress: bool = True) -> AsyncIterator[ImageEvent]:
        # decoding and resizing an init image and mask must not stall the event loop
        served = self.host.get(request.model)
        image_request = await asyncio.to_thread(served.resolve, spec_from_proto(request))
        events, sink = self._events.sink()
        job = ImageJob(image_request, sink, progress)
        served.engine.submit(job)
        async for event in self._events.follow(events, job.cancel):
            yield event

    async def GenerateImages(self, request, context):
        async for event in self._generate(request, context, progress=False):
            if event.final:
                return _result(event)

    async def GenerateImagesStream(self, request, context):
        async for event in self._generate(request, context):
            if event.final:
                yield diffusion_pb2.GenerateImagesEvent(result=_result(event))
            else:
                progress = diffusion_pb2.Progress(
                    step=event.step, total_steps=event.total_steps, preview_png=event.preview_png
                )
                yield diffusion_pb2.GenerateImagesEvent(progress=progress)

    async def ListModels(self, request, context):
        default = self.host.registry.default_name
        models = []
        for entry, served in self.host.entries():
            info = diffusion_pb2.ModelInfo(
                name=entry.name, kind=entry.kind, source=entry.source, is_default=entry.name == default
            )
            if served is not None:
                d = served.defaults
                info.default_width, info.default_height, info.default_steps = d.width, d.height, d.steps
                info.default_guidance_scale, info.default_scheduler = d.guidance_scale, d.scheduler
                info.device, info.dtype, info.dtype_reason = served.device, served.dtype, served.dtype_reason
                _describe_family(info, d)
            models.append(info)
        return diffusion_pb2.ListModelsResponse(models=models)

    async def ListSchedulers(self, request, context):
        served = self.host.get(request.model)
        return diffusion_pb2.ListSchedulersResponse(names=scheduler_names(served.defaults.family))
