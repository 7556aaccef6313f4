"""Diffusion adapters: a LoRA (or DoRA, rsLoRA) on a Stable Diffusion UNet, from an imagefolder zip.

The standard text-to-image LoRA objective (as in diffusers' `train_text_to_image_lora.py`): encode the
image to latents with the frozen VAE, add noise at a random timestep, and train the UNet (through its
adapter) to predict what the scheduler's `prediction_type` asks for — the noise (`epsilon`) or the
velocity (`v_prediction`). Images are decoded per batch from the zip (memory bounded by the batch, not
the dataset), resized so the short side is `resolution`, then center-cropped (or randomly cropped),
optionally flipped. Validation uses fixed noise and timesteps, so its loss is comparable from one
evaluation to the next.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F

from services.finetune.datasets import metadata_member, read_imagefolder_zip
from services.finetune.training.loop import TrainingResult
from services.finetune.training.recipe import RecipeContext, split_records
from shared.locations import pretrained_location

VALIDATION_SEED = 1234


class DiffusionRecipe:
    def __init__(self, context: RecipeContext):
        self.context = context
        self.hp = context.hyperparameters
        self.archive: zipfile.ZipFile | None = None  # the dataset, open while training: images are read per batch

    def setup(self) -> None:
        from diffusers import DDPMScheduler, StableDiffusionPipeline
        from peft import LoraConfig

        ctx, hp = self.context, self.hp
        location, kwargs = pretrained_location(ctx.base_model, ctx.settings)
        pipe = StableDiffusionPipeline.from_pretrained(
            location,
            dtype=ctx.base_dtype(),
            use_safetensors=True,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            **kwargs,
        )
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"the scheduler's prediction_type {self.prediction_type!r} is not supported")
        self.vae, self.text_encoder, self.tokenizer = pipe.vae, pipe.text_encoder, pipe.tokenizer
        self.unet = pipe.unet
        for module in (self.vae, self.text_encoder, self.unet):
            module.requires_grad_(False)
            module.to(ctx.device)
        seed = hp.seed
        torch.manual_seed(seed)  # the adapter's initial weights
        self.unet.add_adapter(
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
        for parameter in self.unet.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()  # trainable weights stay float32 under autocast
        records = read_imagefolder_zip(ctx.dataset_path, ctx.settings.finetune).records
        self.archive = zipfile.ZipFile(ctx.dataset_path)
        _, self.image_root = metadata_member(self.archive.namelist())
        self.captions = self._encode_captions(sorted({r["text"] for r in records}))
        self.train_records, self.val_records = split_records(records, hp.validation_fraction, seed)

    def _load_image(self, file_name: str) -> torch.Tensor:
        """One image, resized so its short side is `resolution`, as a (3, H, W) uint8 tensor."""
        from PIL import Image

        resolution = self.hp.resolution
        with Image.open(io.BytesIO(self.archive.read(self.image_root + file_name))) as image:
            image = image.convert("RGB")
            scale = resolution / min(image.size)
            size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.BICUBIC)
            pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
            return pixels.view(image.height, image.width, 3).permute(2, 0, 1)

    def _pixels(self, records: list[dict], generator: torch.Generator | None) -> torch.Tensor:
        """The batch's crops in [-1, 1], (B, 3, resolution, resolution); decoded now, so only the batch is held."""
        crops = torch.stack([self._crop(self._load_image(r["file_name"]), generator) for r in records])
        return crops.float() / 127.5 - 1.0

    @torch.no_grad()
    def _encode_captions(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """The frozen text encoder's hidden states, once per distinct caption."""
        encoded = {}
        for caption in captions:
            ids = self.tokenizer(
                caption,
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.context.device)
            encoded[caption] = self.text_encoder(ids, return_dict=False)[0][0]
        return encoded

    def _crop(self, image: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        size = self.hp.resolution
        _, height, width = image.shape
        if self.hp.random_crop:
            top = int(torch.randint(0, height - size + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - size + 1, (1,), generator=generator))
        else:
            top, left = (height - size) // 2, (width - size) // 2
        image = image[:, top : top + size, left : left + size]
        if self.hp.random_flip and float(torch.rand((), generator=generator)) < 0.5:
            image = image.flip(-1)
        return image

    def count_items(self, records: list[dict]) -> int:
        return len(records)

    def loss_sum(self, unet, records: list[dict]) -> tuple[torch.Tensor, int]:
        """Summed per-image MSE between the UNet's prediction and the scheduler's target."""
        device = self.context.device
        generator = None if unet.training else torch.Generator().manual_seed(VALIDATION_SEED)
        pixels = self._pixels(records, generator).to(device)
        hidden = torch.stack([self.captions[r["text"]] for r in records])
        with torch.no_grad():
            latents = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.sample(generator=generator)
            latents = latents.float() * self.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator).to(device)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (len(records),), generator=generator).to(device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "epsilon":
            target = noise
        else:
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, encoder_hidden_states=hidden, return_dict=False)[0]
        per_image = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        return per_image.sum(), len(records)

    def train(self) -> TrainingResult:
        self.trainer = self.context.trainer(
            self.unet, self.train_records, self.val_records, self.loss_sum, self.count_items
        )
        return self.trainer.run()

    def save(self, out_dir: Path) -> None:
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet))
        StableDiffusionPipeline.save_lora_weights(
            out_dir,
            unet_lora_layers=layers,
            unet_lora_adapter_metadata=self.unet.peft_config["default"].to_dict(),  # alpha, DoRA, rsLoRA
            safe_serialization=True,
        )

    def cleanup(self) -> None:
        if self.archive is not None:
            self.archive.close()
        self.unet = self.vae = self.text_encoder = self.trainer = None
        if self.context.device.type == "cuda":
            torch.cuda.empty_cache()
