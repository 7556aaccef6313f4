"""Diffusion adapters: a LoRA (or DoRA, rsLoRA) on the denoiser of an SD, SDXL, SD3 or Flux base, from an
imagefolder zip.

The frozen VAE encodes each image to latents; the denoiser (through its adapter) learns its family's
objective (`denoisers`): DDPM noise or velocity prediction for SD and SDXL, flow matching for SD3 and
Flux. Images are decoded, resized to their aspect bucket, cropped and flipped in the DataLoader's
workers (`images`). With a `class_prompt`, DreamBooth prior preservation: the base model first draws
`num_class_images` images of the class, and each step also trains on them (weighted by
`prior_loss_weight`), so the adapter learns the subject without forgetting the class. Validation and
test use fixed noise and timesteps, so their losses are comparable from one evaluation to the next.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch
import torch.distributed as dist

from services.finetune.datasets import metadata_member, read_imagefolder_zip
from services.finetune.recipes.denoisers import FlowMatching, NoisePrediction, encode_captions
from services.finetune.recipes.images import ClassImages, ImageArchive, ImageBatches, bucket_sizes, nearest_bucket
from services.finetune.training.checkpoint import CLASS_IMAGES
from services.finetune.training.data import DataPipeline
from services.finetune.training.loop import TrainingResult, TrainingStopped
from services.finetune.training.recipe import RecipeContext, split_records
from shared.diffusion_families import FAMILIES
from shared.loaders import declared_family
from shared.locations import pretrained_location

VALIDATION_SEED = 1234
CLASS_IMAGE_SEED = 4321


class DiffusionRecipe:
    def __init__(self, context: RecipeContext):
        self.context = context
        self.hp = context.hyperparameters
        self.archive: ImageArchive | None = None

    def setup(self) -> None:
        ctx, hp = self.context, self.hp
        pipe = self._pipeline()
        self.pipe_class = type(pipe)
        if self.family.samplers == "noise":
            self.objective = NoisePrediction(pipe, self.family.name)
        else:
            self.objective = FlowMatching(pipe, self.family.name, hp.guidance_scale)
        self.vae = pipe.vae
        if self.vae.config.get("force_upcast"):  # SDXL's VAE overflows in float16: it encodes in float32
            self.vae.to(torch.float32)
        self.denoiser = pipe.unet if self.family.name in ("sd", "sdxl") else pipe.transformer
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False)
                module.to(ctx.device)
        self.class_images = self._class_images(pipe) if hp.class_prompt else None  # before the adapter exists
        self._add_adapter()
        records = read_imagefolder_zip(ctx.dataset_path, ctx.settings.finetune).records
        with zipfile.ZipFile(ctx.dataset_path) as archive:
            _, image_root = metadata_member(archive.namelist())
        self.archive = ImageArchive(ctx.dataset_path, image_root)
        buckets = self._buckets(pipe)
        for record in records:
            size = self.archive.size_of(record["file_name"])
            record["bucket"] = buckets[nearest_bucket(*size, buckets)] if len(buckets) > 1 else buckets[0]
        captions = sorted({r["text"] for r in records} | ({hp.class_prompt} if hp.class_prompt else set()))
        self.captions = encode_captions(pipe, self.family.name, captions, ctx.device, self._sequence_length())
        self.split = split_records(records, hp.validation_fraction, hp.seed, hp.test_fraction)
        if self.class_images is not None:
            for k, record in enumerate(self.split.train):
                record["class_file"] = self.class_images.names[k % len(self.class_images.names)]
        del pipe

    def _pipeline(self):
        import diffusers

        ctx = self.context
        location, kwargs = pretrained_location(ctx.base_model, ctx.settings)
        self.family = declared_family(ctx.base_model, location) or FAMILIES["sd"]
        if self.family.name == "sd":
            kwargs = {**kwargs, "safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
        pipe = getattr(diffusers, self.family.text2img).from_pretrained(
            location, dtype=ctx.base_dtype(), use_safetensors=True, **kwargs
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _add_adapter(self) -> None:
        from peft import LoraConfig

        hp = self.hp
        torch.manual_seed(hp.seed)  # the adapter's initial weights
        self.denoiser.add_adapter(
            LoraConfig(
                r=hp.lora_r,
                lora_alpha=hp.lora_alpha,
                lora_dropout=hp.lora_dropout,
                init_lora_weights="gaussian",
                target_modules=list(hp.target_modules),
                use_dora=hp.method == "dora",
                use_rslora=hp.method == "rslora",
            )
        )
        for parameter in self.denoiser.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()  # trainable weights stay float32 under autocast

    def _buckets(self, pipe) -> list[tuple[int, int]]:
        resolution = self.hp.resolution
        if not self.hp.aspect_buckets:
            return [(resolution, resolution)]
        patch = 2 if self.family.name == "flux" else int(getattr(self.denoiser.config, "patch_size", None) or 1)
        multiple = max(8, pipe.vae_scale_factor * patch)
        return bucket_sizes(resolution, max(multiple, 64 if resolution >= 512 else multiple))

    def _sequence_length(self) -> int:
        """T5 tokens per caption (SD3, Flux): what serving encodes prompts to, so training matches it."""
        configured = self.context.base_model.diffusion.max_sequence_length
        return configured or self.family.max_sequence_length or 77

    def _class_images(self, pipe) -> ClassImages:
        hp, hooks = self.hp, self.context.hooks
        images = ClassImages(self.context.job_dir / CLASS_IMAGES, hp.num_class_images, hp.class_prompt)

        def stop() -> None:  # a cancel or a shutdown is heard between images
            reason = hooks.stop_requested() if hooks is not None else None
            if reason is not None:
                raise TrainingStopped(reason, 0)

        distributed = dist.is_available() and dist.is_initialized()
        if (not distributed or dist.get_rank() == 0) and not images.complete():  # rank 0 draws, for every rank
            images.generate(pipe, hp.resolution, self.family, CLASS_IMAGE_SEED + hp.seed, stop)
        if distributed:
            dist.barrier()
        return images

    def pipeline(self) -> DataPipeline:
        images = ImageBatches(self.archive, self.hp.random_crop, self.hp.random_flip, self.class_images)
        return DataPipeline(images.prepare, images.collate)

    @staticmethod
    def count_items(batch: dict) -> int:
        return len(batch["texts"])

    def loss_sum(self, denoiser, batch: dict) -> tuple[torch.Tensor, int]:
        """Summed per-image loss of the family's objective (plus the weighted prior loss, with class images)."""
        generator = None if denoiser.training else torch.Generator().manual_seed(VALIDATION_SEED)
        losses = self._losses(denoiser, batch["pixels"], batch["texts"], batch["time_ids"], generator)
        total = losses.sum()
        if "class_pixels" in batch and denoiser.training:
            class_inputs = batch["class_pixels"], batch["class_texts"], batch["class_time_ids"]
            prior = self._losses(denoiser, *class_inputs, generator)
            total = total + self.hp.prior_loss_weight * prior.sum()
        return total, len(batch["texts"])

    def _losses(self, denoiser, pixels, texts, time_ids, generator) -> torch.Tensor:
        with torch.no_grad():
            latents = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.sample(generator=generator)
            latents = (latents.float() - self.objective.shift) * self.objective.scaling
        conditioning = [self.captions[text] for text in texts]
        return self.objective.per_image_loss(denoiser, latents, conditioning, time_ids, generator)

    def train(self) -> TrainingResult:
        buckets = sorted({record["bucket"] for record in self.split.train})
        groups = [buckets.index(record["bucket"]) for record in self.split.train]
        self.trainer = self.context.trainer(
            self.denoiser, self.pipeline(), self.split, self.loss_sum, self.count_items, groups=groups
        )
        return self.trainer.run()

    def save(self, out_dir: Path) -> None:
        from peft.utils import get_peft_model_state_dict

        # peft's own key format, as diffusers' DreamBooth scripts save it: the old format's conversion covers
        # only the attention projections, and diffusers reads a file's format from its first key
        layers = get_peft_model_state_dict(self.denoiser)
        metadata = self.denoiser.peft_config["default"].to_dict()  # alpha, DoRA, rsLoRA
        if self.family.name in ("sd", "sdxl"):
            self.pipe_class.save_lora_weights(
                out_dir, unet_lora_layers=layers, unet_lora_adapter_metadata=metadata, safe_serialization=True
            )
        else:
            self.pipe_class.save_lora_weights(
                out_dir,
                transformer_lora_layers=layers,
                transformer_lora_adapter_metadata=metadata,
                safe_serialization=True,
            )

    def cleanup(self) -> None:
        if self.archive is not None:
            self.archive.close()
        self.denoiser = self.vae = self.trainer = self.captions = None
        if self.context.device.type == "cuda":
            torch.cuda.empty_cache()
