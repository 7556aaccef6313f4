"""What a LoRA job trains per diffusion family: the denoiser, its text conditioning, and its objective.

- `sd`: the UNet predicts the noise (or velocity) the DDPM schedule added (diffusers' text-to-image LoRA).
- `sdxl`: the same, with both CLIP encoders' hidden states, the pooled text embedding and the size and
  crop conditioning ("time ids": original size, crop corner, target size) taken from each image.
- `sd3`: the transformer learns the flow-matching velocity (noise - latents) at sigmas drawn from a
  logit-normal density (diffusers' DreamBooth SD3 script).
- `flux`: the same on 2×2-packed latents with position ids, uniform sigmas, and for guidance-distilled
  bases (FLUX.1-dev) the guidance embedding fed the job's `guidance_scale`.

Text encoders stay frozen: each distinct caption is encoded once, before training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class TextConditioning:
    """One caption, encoded: the sequence the denoiser attends to and (except `sd`) the pooled vector."""

    hidden: torch.Tensor  # (L, D)
    pooled: torch.Tensor | None = None  # (P,)


@torch.no_grad()
def encode_captions(
    pipe, family: str, captions: list[str], device: torch.device, max_sequence_length: int
) -> dict[str, TextConditioning]:
    """Every caption's conditioning, through the pipeline's own `encode_prompt` (frozen encoders)."""
    encoded = {}
    for caption in captions:
        if family == "sd":
            hidden, _ = pipe.encode_prompt(caption, device, 1, False)
            encoded[caption] = TextConditioning(hidden[0])
        elif family == "sdxl":
            hidden, _, pooled, _ = pipe.encode_prompt(caption, device=device, do_classifier_free_guidance=False)
            encoded[caption] = TextConditioning(hidden[0], pooled[0])
        elif family == "sd3":
            hidden, _, pooled, _ = pipe.encode_prompt(
                caption,
                None,
                None,
                device=device,
                do_classifier_free_guidance=False,
                max_sequence_length=max_sequence_length,
            )
            encoded[caption] = TextConditioning(hidden[0], pooled[0])
        else:
            hidden, pooled, _ = pipe.encode_prompt(
                caption, None, device=device, max_sequence_length=max_sequence_length
            )
            encoded[caption] = TextConditioning(hidden[0], pooled[0])
    return encoded


def _stack(conditioning: list[TextConditioning]) -> tuple[torch.Tensor, torch.Tensor | None]:
    hidden = torch.stack([c.hidden for c in conditioning])
    pooled = None if conditioning[0].pooled is None else torch.stack([c.pooled for c in conditioning])
    return hidden, pooled


class NoisePrediction:
    """SD and SDXL: the UNet predicts the DDPM target (epsilon or v) at a uniformly drawn timestep."""

    def __init__(self, pipe, family: str):
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.prediction_type = self.scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"the scheduler's prediction_type {self.prediction_type!r} is not supported")
        self.family = family
        self.scaling, self.shift = pipe.vae.config.scaling_factor, 0.0

    def per_image_loss(self, denoiser, latents, conditioning, time_ids, generator) -> torch.Tensor:
        device = latents.device
        noise = torch.randn(latents.shape, generator=generator).to(device)
        steps = self.scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator).to(device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        velocity = self.prediction_type == "v_prediction"
        target = self.scheduler.get_velocity(latents, noise, timesteps) if velocity else noise
        hidden, pooled = _stack(conditioning)
        extra = {}
        if self.family == "sdxl":
            extra["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids.to(device, hidden.dtype)}
        prediction = denoiser(noisy, timesteps, encoder_hidden_states=hidden, return_dict=False, **extra)[0]
        return F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))


class FlowMatching:
    """SD3 and Flux: the transformer predicts noise - latents at x_σ = (1 - σ)·latents + σ·noise."""

    def __init__(self, pipe, family: str, guidance_scale: float):
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        self.timesteps, self.sigmas = scheduler.timesteps.clone(), scheduler.sigmas.clone()
        self.family = family
        self.sampling = "logit_normal" if family == "sd3" else "uniform"  # as diffusers' DreamBooth scripts
        self.scaling = pipe.vae.config.scaling_factor
        self.shift = pipe.vae.config.shift_factor or 0.0
        self.guidance_scale = guidance_scale
        self.vae_scale_factor = pipe.vae_scale_factor
        self.pipe_class = type(pipe)

    def per_image_loss(self, denoiser, latents, conditioning, time_ids, generator) -> torch.Tensor:
        device, batch = latents.device, latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator).to(device)
        if self.sampling == "logit_normal":
            u = torch.sigmoid(torch.randn((batch,), generator=generator))
        else:
            u = torch.rand((batch,), generator=generator)
        indices = (u * len(self.timesteps)).long().clamp(max=len(self.timesteps) - 1)
        timesteps = self.timesteps[indices].to(device)
        sigmas = self.sigmas[indices].to(device).view(-1, 1, 1, 1)
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        target = noise - latents
        hidden, pooled = _stack(conditioning)
        if self.family == "sd3":
            prediction = denoiser(
                hidden_states=noisy.to(hidden.dtype),
                timestep=timesteps,
                encoder_hidden_states=hidden,
                pooled_projections=pooled,
                return_dict=False,
            )[0]
        else:
            prediction = self._flux(denoiser, noisy.to(hidden.dtype), timesteps, hidden, pooled)
        return F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))

    def _flux(self, denoiser, noisy, timesteps, hidden, pooled) -> torch.Tensor:
        """Flux's transformer sees 2×2 patches of the latents as tokens, with (t, y, x) position ids."""
        batch, channels, height, width = noisy.shape
        packed = self.pipe_class._pack_latents(noisy, batch, channels, height, width)
        image_ids = self.pipe_class._prepare_latent_image_ids(batch, height // 2, width // 2, noisy.device, noisy.dtype)
        text_ids = torch.zeros(hidden.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        guidance = None
        if denoiser_config(denoiser).get("guidance_embeds"):
            guidance = torch.full((batch,), self.guidance_scale, device=noisy.device, dtype=torch.float32)
        prediction = denoiser(
            hidden_states=packed,
            timestep=timesteps / 1000,
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=hidden,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        pixels = (height * self.vae_scale_factor, width * self.vae_scale_factor)
        return self.pipe_class._unpack_latents(prediction, *pixels, self.vae_scale_factor)


def denoiser_config(denoiser) -> dict:
    """The diffusers config of a denoiser, also when DDP wraps it."""
    return dict(getattr(denoiser, "module", denoiser).config)
