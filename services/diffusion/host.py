"""The diffusion models one server hosts: loaded at start-up, looked up by name per request."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from services.diffusion.adapters import DiffusionAdapterCache
from services.diffusion.engine import DiffusionEngine
from services.diffusion.params import ImageRequest, ImageSpec, ModelDefaults, resolve_request
from services.diffusion.schedulers import check_scheduler, name_of
from shared.adapters import AdapterStore
from shared.devices import dtype_name
from shared.errors import Unavailable
from shared.loaders import LoadedDiffusionPipeline, load_diffusion_pipeline
from shared.registry import ModelRegistry
from shared.settings import ModelEntry, Settings

log = logging.getLogger(__name__)


@dataclass
class ServedPipeline:
    entry: ModelEntry
    defaults: ModelDefaults
    engine: DiffusionEngine
    adapters: DiffusionAdapterCache
    device: str
    dtype: str


def model_defaults(loaded: LoadedDiffusionPipeline) -> ModelDefaults:
    pipe, configured = loaded.pipeline, loaded.entry.diffusion
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    override = check_scheduler(configured.scheduler) if configured.scheduler else None
    return ModelDefaults(
        width=configured.width or native,
        height=configured.height or native,
        steps=configured.steps,
        guidance_scale=configured.guidance_scale,
        scheduler=override or name_of(pipe.scheduler),
        scheduler_override=override,
    )


def apply_gpu_options(pipe, settings: Settings) -> None:
    """Memory and speed options from the config; they matter on GPUs and are harmless on the CPU."""
    options = settings.diffusion
    if options.attention_slicing:
        pipe.enable_attention_slicing()
    if options.vae_tiling:
        pipe.vae.enable_tiling()
    if options.compile:
        import torch

        pipe.unet = torch.compile(pipe.unet)


class DiffusionHost:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.registry = ModelRegistry(settings.models, "diffusion")
        self.store = AdapterStore(settings.adapters_dir)
        self._served: dict[str, ServedPipeline] = {}

    def load_all(self) -> None:
        options = self.settings.diffusion
        for entry in self.registry.entries():
            loaded = load_diffusion_pipeline(entry, self.settings)
            apply_gpu_options(loaded.pipeline, self.settings)
            adapters = DiffusionAdapterCache(
                loaded.pipeline, self.store, options.adapter_cache_size, entry.name, entry.source
            )
            engine = DiffusionEngine(
                loaded.pipeline,
                model_name=entry.name,
                adapters=adapters,
                max_batch_images=options.max_batch_images,
                max_waiting=options.max_waiting_requests,
                batch_window_s=options.batch_window_ms / 1000,
            )
            engine.start()
            self._served[entry.name] = ServedPipeline(
                entry, model_defaults(loaded), engine, adapters, str(loaded.device), dtype_name(loaded.dtype)
            )
            log.info("model ready", extra={"model": entry.name})

    def get(self, name: str) -> ServedPipeline:
        entry = self.registry.get(name)
        served = self._served.get(entry.name)
        if served is None:
            raise Unavailable(f"model {entry.name!r} is still loading; retry shortly")
        return served

    def resolve(self, name: str, spec: ImageSpec) -> tuple[ServedPipeline, ImageRequest]:
        """Validate a request against its model: defaults, limits, and the adapter's existence."""
        served = self.get(name)
        request = resolve_request(spec, served.defaults, self.settings.diffusion)
        if request.adapter:
            served.adapters.resolve(request.adapter)
        return served, request

    def entries(self) -> list[tuple[ModelEntry, ServedPipeline | None]]:
        return [(e, self._served.get(e.name)) for e in self.registry.entries()]

    def shutdown(self) -> None:
        for served in self._served.values():
            served.engine.shutdown()
