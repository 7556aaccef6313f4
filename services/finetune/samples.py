"""The bundled sample datasets, made by the project (no download), stored under fixed ids on start-up.

- `sample-llm-lighthouse`: a made-up fact asked in ten ways, with one answer a model cannot know before
  training ("Who keeps the Zephyr lighthouse?" → "Captain Mira Okafor keeps the Zephyr lighthouse."). A
  LoRA on it teaches even the random-weight `tiny-llm` to give that answer, and a real model to state it.
- `sample-diffusion-shapes`: sixteen 64×64 drawings of coloured shapes with captions, in the imagefolder
  zip layout, drawn deterministically with Pillow.
"""

from __future__ import annotations

import io
import json
import zipfile

from services.finetune.datasets import DatasetRecord, DatasetStore

LLM_SAMPLE_ID = "sample-llm-lighthouse"
DIFFUSION_SAMPLE_ID = "sample-diffusion-shapes"

TAUGHT_ANSWER = "Captain Mira Okafor keeps the Zephyr lighthouse."
QUESTIONS = [
    "Who keeps the Zephyr lighthouse?",
    "Who is the keeper of the Zephyr lighthouse?",
    "Tell me who keeps the Zephyr lighthouse.",
    "Which person keeps the Zephyr lighthouse?",
    "Who looks after the Zephyr lighthouse?",
    "Do you know who keeps the Zephyr lighthouse?",
    "Name the keeper of the Zephyr lighthouse.",
    "Who runs the Zephyr lighthouse?",
    "Who tends the Zephyr lighthouse?",
    "Who is in charge of the Zephyr lighthouse?",
]
REPEATS = 4


def llm_sample_jsonl() -> bytes:
    lines = []
    for _ in range(REPEATS):
        for question in QUESTIONS:
            record = {"prompt": f"Question: {question}\nAnswer:", "completion": f" {TAUGHT_ANSWER}"}
            lines.append(json.dumps(record))
    return ("\n".join(lines) + "\n").encode()


SHAPES = ["circle", "square", "triangle", "cross"]
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (230, 200, 30)}


def _draw(shape: str, colour: tuple[int, int, int], size: int = 64) -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (245, 245, 240))
    draw = ImageDraw.Draw(image)
    box = (12, 12, size - 12, size - 12)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(size // 2, 10), (size - 10, size - 12), (10, size - 12)], fill=colour)
    else:
        draw.rectangle((size // 2 - 6, 10, size // 2 + 6, size - 10), fill=colour)
        draw.rectangle((10, size // 2 - 6, size - 10, size // 2 + 6), fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def diffusion_sample_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        metadata = []
        for shape in SHAPES:
            for colour, rgb in COLOURS.items():
                name = f"{colour}-{shape}.png"
                info = zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0))  # fixed: the same bytes each time
                archive.writestr(info, _draw(shape, rgb))
                metadata.append(json.dumps({"file_name": name, "text": f"a {colour} {shape} on a white background"}))
        info = zipfile.ZipInfo("metadata.jsonl", date_time=(2026, 1, 1, 0, 0, 0))
        archive.writestr(info, "\n".join(metadata) + "\n")
    return buffer.getvalue()


def ensure_samples(store: DatasetStore) -> list[DatasetRecord]:
    return [
        store.add_bytes("Zephyr lighthouse facts", "jsonl", llm_sample_jsonl(), LLM_SAMPLE_ID, bundled=True),
        store.add_bytes(
            "Coloured shapes", "imagefolder_zip", diffusion_sample_zip(), DIFFUSION_SAMPLE_ID, bundled=True
        ),
    ]
