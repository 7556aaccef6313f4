"""The diffusion models one server hosts, each a started `ServedPipeline`."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from services.diffusion.adapters import DiffusionAdapterCache
from services.diffusion.engine import DiffusionEngine
from services.diffusion.params import ImageRequest, ImageSpec, ModelDefaults, resolve_request
from services.diffusion.pipelines import FamilyPipelines
from services.diffusion.schedulers import check_scheduler, name_of
from shared.adapters import AdapterStore
from shared.devices import dtype_name
from shared.hosting import ModelHost
from shared.loaders import LoadedDiffusionPipeline, load_controlnet, load_diffusion_pipeline
from shared.settings import DiffusionSettings, ModelEntry, Settings

log = logging.getLogger(__name__)


@dataclass
class ServedPipeline:
    entry: ModelEntry
    defaults: ModelDefaults
    limits: DiffusionSettings
    engine: DiffusionEngine
    adapters: DiffusionAdapterCache
    device: str
    dtype: str
    dtype_reason: str

    def resolve(self, spec: ImageSpec) -> ImageRequest:
        """Validate a request against this model: defaults, limits, and the adapter's existence."""
        request = resolve_request(spec, self.defaults, self.limits)
        if request.adapter:
            self.adapters.resolve(request.adapter)
        return request

    def start(self, on_death=None) -> None:
        self.engine.start(on_death)

    def shutdown(self) -> None:
        self.engine.shutdown()


def model_defaults(
    loaded: LoadedDiffusionPipeline,
    pipelines: FamilyPipelines,
    controlnets: dict[str, str] | None = None,
    usable_controlnets: tuple[str, ...] = (),
) -> ModelDefaults:
    pipe, configured, family = loaded.pipeline, loaded.entry.diffusion, loaded.family
    denoiser = denoiser_of(pipe)
    override = check_scheduler(configured.scheduler, family) if configured.scheduler else None
    native = _native_size(pipe, denoiser)
    return ModelDefaults(
        width=configured.width or native,
        height=configured.height or native,
        steps=configured.steps or family.default_steps,
        guidance_scale=family.default_guidance if configured.guidance_scale is None else configured.guidance_scale,
        scheduler=override or name_of(pipe.scheduler),
        scheduler_override=override,
        train_timesteps=pipe.scheduler.config.get("num_train_timesteps", 1000),
        # an SD or SDXL inpainting UNet also takes the mask and the masked image
        inpainting_only=family.name in ("sd", "sdxl") and denoiser.config.in_channels == 9,
        family=family,
        size_multiple=max(8, pipe.vae_scale_factor * _patch_size(family, denoiser)),
        modes=pipelines.modes,
        controlnets=controlnets or {},
        usable_controlnets=usable_controlnets,
    )


def denoiser_of(pipe):
    """The UNet or transformer that predicts noise (or flow) in a pipeline."""
    return getattr(pipe, "unet", None) or pipe.transformer


def _patch_size(family, denoiser) -> int:
    if family.name == "flux":  # Flux packs 2x2 latents into one token
        return 2
    return getattr(denoiser.config, "patch_size", None) or 1


def _native_size(pipe, denoiser) -> int:
    """The size the checkpoint was trained at: its denoiser's sample size in pixels (Flux's pipeline default)."""
    sample_size = getattr(denoiser.config, "sample_size", None) or getattr(pipe, "default_sample_size", 128)
    return sample_size * pipe.vae_scale_factor


def apply_gpu_options(pipe, settings: Settings) -> None:
    """Memory and speed options from the config; they matter on GPUs and are harmless on the CPU."""
    options = settings.diffusion
    if options.attention_slicing:
        pipe.enable_attention_slicing()
    if options.vae_tiling:
        pipe.vae.enable_tiling()
    if options.compile:
        import torch

        if getattr(pipe, "unet", None) is not None:
            pipe.unet = torch.compile(pipe.unet)
        else:
            pipe.transformer = torch.compile(pipe.transformer)


class ControlNets:
    """The configured ControlNet models, loaded when the first model of their family loads, one copy per device
    and dtype of the models they serve (a ControlNet runs in its model's)."""

    def __init__(self, settings: Settings):
        self._settings = settings
        self._entries = {e.name: e for e in settings.models if e.kind == "controlnet"}
        self._loaded: dict[tuple[str, str, str], object] = {}

    @property
    def families(self) -> dict[str, str]:
        return {name: entry.controlnet.base_family for name, entry in self._entries.items()}

    def fitting(self, family: str, denoiser, device, dtype) -> dict[str, object]:
        """The ControlNets of `family` whose encoder matches `denoiser` (a SD 1.5 ControlNet does not fit SD 2.x:
        another cross-attention width), each on the model's device in its dtype."""
        out = {}
        for name, entry in self._entries.items():
            if entry.controlnet.base_family != family:
                continue
            key = (name, str(device), str(dtype))
            if key not in self._loaded:
                self._loaded[key] = load_controlnet(entry, self._settings).to(device=device, dtype=dtype)
            if _fits(self._loaded[key], denoiser):
                out[name] = self._loaded[key]
            else:
                log.warning("ControlNet does not fit the model's UNet", extra={"controlnet": name, "family": family})
        return out


def _fits(controlnet, denoiser) -> bool:
    if "joint_attention_dim" in denoiser.config:  # Flux: the blocks' width and the text and latent inputs
        keys = ("in_channels", "joint_attention_dim", "pooled_projection_dim", "num_attention_heads")
        keys += ("attention_head_dim",)
    else:
        keys = ("cross_attention_dim", "block_out_channels", "addition_embed_type")
    return all(controlnet.config.get(k) == denoiser.config.get(k) for k in keys)


def diffusion_host(settings: Settings) -> ModelHost[ServedPipeline]:
    store = AdapterStore(settings.adapters_dir)
    options = settings.diffusion
    controlnets = ControlNets(settings)

    def load(entry: ModelEntry) -> ServedPipeline:
        loaded = load_diffusion_pipeline(entry, settings)
        apply_gpu_options(loaded.pipeline, settings)
        adapters = DiffusionAdapterCache(loaded.pipeline, store, options.adapter_cache_size, entry.name, entry.source)
        fitting = {}
        if loaded.family.controlnet:
            denoiser = denoiser_of(loaded.pipeline)
            fitting = controlnets.fitting(loaded.family.name, denoiser, loaded.device, loaded.dtype)
        pipelines = FamilyPipelines(loaded.pipeline, loaded.family, entry.diffusion.max_sequence_length, fitting)
        engine = DiffusionEngine(
            pipelines,
            model_name=entry.name,
            adapters=adapters,
            max_batch_images=options.max_batch_images,
            max_waiting=options.max_waiting_requests,
            batch_window_s=options.batch_window_ms / 1000,
        )
        defaults = model_defaults(loaded, pipelines, controlnets.families, tuple(fitting))
        placement = (str(loaded.device), dtype_name(loaded.dtype), loaded.dtype_reason)
        return ServedPipeline(entry, defaults, options, engine, adapters, *placement)

    return ModelHost(settings, "diffusion", load)
