"""Image records as training batches: decoded from the dataset zip, resized to cover their aspect bucket,
cropped and flipped, in the DataLoader's worker processes (see `training.data`).

Aspect buckets (as Kohya's and SDXL's trainers do): sizes of about `resolution`² pixels, sides a multiple
of the model's size step, aspect ratios from 1:2 to 2:1. Each image goes to the bucket nearest its aspect
ratio, so a portrait photo trains as a portrait instead of losing its top and bottom to a square crop;
`StepBatches` groups records of one bucket into each micro-batch. Without buckets every image gets the
square `resolution` crop. Each image keeps what SDXL conditions on: its original size and where the crop
began.
"""

from __future__ import annotations

import io
import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

MAX_ASPECT = 2.0


def bucket_sizes(resolution: int, step: int) -> list[tuple[int, int]]:
    """(width, height) buckets of about resolution² pixels, sides multiples of `step`, aspect within 1:2..2:1."""
    area = resolution * resolution
    buckets = set()
    for width in range(step, 2 * resolution + 1, step):
        height = max(step, round(area / width / step) * step)
        if 1 / MAX_ASPECT <= width / height <= MAX_ASPECT and width * height <= area * 1.1:
            buckets.add((width, height))
    buckets.add((resolution, resolution))
    return sorted(buckets)


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> int:
    """The index of the bucket whose aspect ratio is nearest the image's (in log ratio)."""
    ratio = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: (abs(math.log(buckets[i][0] / buckets[i][1]) - ratio), i))


class ImageArchive:
    """The dataset zip, opened once per process that reads it (a zip handle must not cross a fork)."""

    def __init__(self, path: Path, image_root: str):
        self.path, self.image_root = path, image_root
        self._zip: zipfile.ZipFile | None = None
        self._pid = 0

    def __getstate__(self) -> dict:
        return {"path": self.path, "image_root": self.image_root, "_zip": None, "_pid": 0}

    def read(self, file_name: str) -> bytes:
        if self._zip is None or self._pid != os.getpid():
            self._zip, self._pid = zipfile.ZipFile(self.path), os.getpid()
        return self._zip.read(self.image_root + file_name)

    def size_of(self, file_name: str) -> tuple[int, int]:
        """(width, height) from the image's header, without decoding it."""
        from PIL import Image

        with Image.open(io.BytesIO(self.read(file_name))) as image:
            return image.size

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None


@dataclass(frozen=True)
class ImageBatches:
    """`prepare` and `collate` for image records (picklable: they run in worker processes).

    A record is {"file_name", "text", "bucket": (width, height)} (and "class_file" with prior
    preservation); `prepare` gives the crop as uint8 and `collate` a batch: pixels in [-1, 1]
    (B, 3, H, W), captions, SDXL's time ids (B, 6), and the class images and prompts if any."""

    archive: ImageArchive
    random_crop: bool
    random_flip: bool
    class_images: ClassImages | None = None  # DreamBooth prior preservation

    def prepare(self, record: dict, seed: int) -> dict:
        generator = torch.Generator().manual_seed(seed)
        pixels, original, corner = self._fit(self.archive.read(record["file_name"]), record["bucket"], generator)
        item = {"pixels": pixels, "text": record["text"], "original": original, "corner": corner}
        if self.class_images is not None and "class_file" in record:  # training records only
            class_image = self.class_images.read(record["class_file"])
            item["class_pixels"], item["class_original"], item["class_corner"] = self._fit(
                class_image, record["bucket"]
            )
            item["class_text"] = self.class_images.prompt
        return item

    def _fit(self, data: bytes, bucket: tuple[int, int], generator: torch.Generator | None = None):
        """The image resized to cover the bucket and cropped to it (randomly, with a generator and random_crop),
        maybe flipped; with its original (width, height) and the crop's (top, left)."""
        from PIL import Image

        width, height = bucket
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
            original = image.size
            scale = max(width / image.width, height / image.height)
            size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.BICUBIC)
            pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
            pixels = pixels.view(image.height, image.width, 3).permute(2, 0, 1)
        top, left = self._corner(pixels.shape[1] - height, pixels.shape[2] - width, generator)
        pixels = pixels[:, top : top + height, left : left + width]
        if generator is not None and self.random_flip and float(torch.rand((), generator=generator)) < 0.5:
            pixels = pixels.flip(-1)
        return pixels, original, (top, left)

    def _corner(self, spare_height: int, spare_width: int, generator: torch.Generator | None) -> tuple[int, int]:
        if generator is None or not self.random_crop:
            return spare_height // 2, spare_width // 2
        top = int(torch.randint(0, spare_height + 1, (1,), generator=generator))
        left = int(torch.randint(0, spare_width + 1, (1,), generator=generator))
        return top, left

    def collate(self, items: list[dict]) -> dict:
        height = min(item["pixels"].shape[1] for item in items)  # one bucket, except a step's leftovers
        width = min(item["pixels"].shape[2] for item in items)
        pixels, time_ids = _common_crop(items, "", height, width)
        batch = {"pixels": pixels, "texts": [item["text"] for item in items], "time_ids": time_ids}
        if all("class_pixels" in item for item in items):
            batch["class_pixels"], batch["class_time_ids"] = _common_crop(items, "class_", height, width)
            batch["class_texts"] = [item["class_text"] for item in items]
        return batch


def _common_crop(items: list[dict], prefix: str, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The items' images (`prefix`: "" or "class_") center-cropped to one size, in [-1, 1], and each one's SDXL
    time ids: original size, where the crop began (in the resized image), target size."""
    crops, time_ids = [], []
    for item in items:
        pixels = item[prefix + "pixels"]
        top, left = (pixels.shape[1] - height) // 2, (pixels.shape[2] - width) // 2
        crops.append(pixels[:, top : top + height, left : left + width])
        (original_width, original_height), (crop_top, crop_left) = item[prefix + "original"], item[prefix + "corner"]
        time_ids.append([original_height, original_width, crop_top + top, crop_left + left, height, width])
    return _to_unit_range(crops), torch.tensor(time_ids, dtype=torch.float32)


def _to_unit_range(images: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(images).float() / 127.5 - 1.0


class ClassImages:
    """DreamBooth's class images: drawn once by the base model into the job's folder, read back per batch."""

    def __init__(self, folder: Path, count: int, prompt: str):
        self.folder, self.prompt = folder, prompt
        self.names = [f"{k:04d}.png" for k in range(count)]

    def complete(self) -> bool:
        return all((self.folder / name).is_file() for name in self.names)

    def read(self, name: str) -> bytes:
        return (self.folder / name).read_bytes()

    @torch.no_grad()
    def generate(self, pipe, resolution: int, family, seed: int, stop=None) -> None:
        """Draw the missing images (each from its own seed, so a resumed job draws the same ones); `stop()`
        is asked between images and may raise."""
        self.folder.mkdir(parents=True, exist_ok=True)
        kwargs = {"num_inference_steps": family.default_steps, "guidance_scale": family.default_guidance}
        for k, name in enumerate(self.names):
            if (self.folder / name).is_file():
                continue
            if stop is not None:
                stop()
            generator = torch.Generator().manual_seed(seed + k)
            image = pipe(self.prompt, height=resolution, width=resolution, generator=generator, **kwargs).images[0]
            partial = self.folder / f".{name}.partial"
            image.save(partial, format="PNG")
            partial.replace(self.folder / name)
