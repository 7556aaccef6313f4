"""Datasets bounded in memory and work: zips refused by their directory before it is parsed, JSONL checked
as a stream (nesting, messages), image sides and the training budget, deletion, and the training data a
worker builds (per-batch image decoding with unchanged losses, linear chat masks equal to the exact ones)."""

from __future__ import annotations

import io
import json
import struct
import zipfile

import pytest
import torch

from services.finetune.datasets import (
    DatasetStore,
    check_zip_directory,
    json_depth_exceeds,
    scan_jsonl,
)
from services.finetune.samples import ensure_samples
from shared.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from shared.settings import FinetuneSettings

LIMITS = FinetuneSettings(max_zip_members=50, max_json_depth=8, max_messages_per_record=4, max_record_chars=1000)


def png(width: int = 16, height: int = 16) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def image_zip(sizes: dict[str, tuple[int, int]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, size in sizes.items():
            archive.writestr(name, png(*size))
        archive.writestr("metadata.jsonl", "".join(json.dumps({"file_name": n, "text": n}) + "\n" for n in sizes))
    return buffer.getvalue()


def store_bytes(store: DatasetStore, fmt: str, data: bytes, owner: str = ""):
    upload = store.begin("test", fmt)
    upload.write(data)
    return store.accept(upload, owner=owner)


@pytest.fixture
def store(tmp_path) -> DatasetStore:
    return DatasetStore(tmp_path / "datasets", LIMITS)


# -- zips ---------------------------------------------------------------------------------------------


def end_record(entries: int, directory_size: int, directory_offset: int) -> bytes:
    return struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, min(entries, 0xFFFF), min(entries, 0xFFFF),
                       directory_size, directory_offset, 0)  # fmt: skip


def test_a_zip_claiming_too_many_entries_is_refused_from_its_end_record(tmp_path):
    path = tmp_path / "claims.zip"
    path.write_bytes(end_record(60_000, 0, 0))
    with pytest.raises(InvalidArgument, match=r"has 60000 entries; the limit is 50 \(finetune.max_zip_members\)"):
        check_zip_directory(path, LIMITS)


def test_a_zip64_end_record_claiming_ten_million_entries_is_refused(tmp_path):
    zip64 = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, 10_000_000, 10_000_000, 0, 0)
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, 0, 1)
    path = tmp_path / "zip64.zip"
    path.write_bytes(zip64 + locator + end_record(10_000_000, 0xFFFFFFFF, 0xFFFFFFFF))
    with pytest.raises(InvalidArgument, match="has 10000000 entries; the limit is 50"):
        check_zip_directory(path, LIMITS)


def test_a_zip_whose_end_record_understates_its_directory_is_refused_by_walking_it(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in range(60):
            archive.writestr(f"{i}.png", b"")
    data = bytearray(buffer.getvalue())
    struct.pack_into("<2H", data, len(data) - 22 + 8, 1, 1)  # the end record now claims one entry
    path = tmp_path / "lies.zip"
    path.write_bytes(bytes(data))
    assert len(zipfile.ZipFile(path).infolist()) == 60, "zipfile reads the directory by size, not by count"
    with pytest.raises(InvalidArgument, match=r"holds more than 50 entries, the limit \(finetune.max_zip_members\)"):
        check_zip_directory(path, LIMITS)


def test_a_zip_within_the_limit_is_counted_and_accepted(store, tmp_path):
    path = tmp_path / "ok.zip"
    path.write_bytes(image_zip({f"{i}.png": (16, 16) for i in range(49)}))
    assert check_zip_directory(path, LIMITS) == 50
    assert store_bytes(store, "imagefolder_zip", path.read_bytes()).num_records == 49


def test_images_with_a_side_under_the_minimum_are_refused(store):
    with pytest.raises(InvalidArgument, match=r"'a.png' is 12x12; .* 16 pixels \(finetune.min_image_side\)"):
        store_bytes(store, "imagefolder_zip", image_zip({"a.png": (12, 12)}))


def test_the_mean_aspect_is_stored_and_bounds_the_training_budget(tmp_path):
    store = DatasetStore(tmp_path, LIMITS.model_copy(update={"max_train_pixels": 10_000}))
    record = store_bytes(store, "imagefolder_zip", image_zip({"wide.png": (32, 16), "square.png": (16, 16)}))
    assert record.mean_aspect == pytest.approx(1.5) and store.get(record.id).mean_aspect == pytest.approx(1.5)
    store.check_training_budget(record, 57)  # 2 × 57² × 1.5 = 9,747 pixels
    with pytest.raises(
        ResourceExhausted, match=r"is 10,092 pixels .*; the limit is 10,000 \(finetune.max_train_pixels\)"
    ):
        store.check_training_budget(record, 58)
    text = store_bytes(store, "jsonl", b'{"text": "a"}\n')
    store.check_training_budget(text, 4096)  # LLM data has no pixels


# -- JSONL --------------------------------------------------------------------------------------------


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def python_depth(value) -> int:
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
    return 0 if children is None else 1 + max((python_depth(c) for c in children), default=0)


@pytest.mark.parametrize(
    "text",
    [
        nested(8),
        nested(9),
        '{"a": [1, {"b": [[]]}], "c": "[[[[[[[[[[[[["}',
        '["\\"[[[[[[[[[[[["]',
        "[[],[],[],[],[],[],[],[],[]]",
    ],
)
def test_the_depth_scan_agrees_with_the_parsed_depth(text):
    assert json_depth_exceeds(text, 8) == (python_depth(json.loads(text)) > 8)


def test_jsonl_nested_past_the_limit_is_refused_with_its_line_not_a_crash(store, tmp_path):
    with pytest.raises(InvalidArgument, match=r"line 2: nested deeper than the limit of 8 \(finetune.max_json_depth\)"):
        store_bytes(store, "jsonl", b'{"text": "a"}\n{"text": "a", "x": ' + nested(400).encode() + b"}\n")
    deep = '{"text": "a", "x": ' + nested(5000) + "}"
    path = tmp_path / "deep.jsonl"
    path.write_text(deep + "\n")
    with pytest.raises(InvalidArgument, match="line 1: nested too deeply to read"):
        scan_jsonl(path)  # the worker's read, without limits, still says what is wrong


def test_chat_records_are_bounded_in_messages(store):
    turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert store_bytes(store, "jsonl", json.dumps({"messages": turn * 2}).encode()).num_records == 1
    with pytest.raises(
        InvalidArgument, match=r"line 1: 6 messages; the limit is 4 \(finetune.max_messages_per_record\)"
    ):
        store_bytes(store, "jsonl", json.dumps({"messages": turn * 3}).encode())


def test_a_line_past_the_limit_is_refused_without_reading_it_whole(store):
    with pytest.raises(InvalidArgument, match="line 1: longer than the limit of 1000 characters"):
        store_bytes(store, "jsonl", b'{"text": "' + b"x" * 100_000)  # no newline: read only up to the limit


def test_jsonl_is_counted_and_typed_as_a_stream(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": "a"}) + "\n\n" for i in range(7)))
    assert scan_jsonl(path, LIMITS) == (7, "prompt_completion")


# -- ownership and deletion ---------------------------------------------------------------------------


def test_a_dataset_keeps_its_owner_and_deletes_out_of_the_listing(store):
    record = store_bytes(store, "jsonl", b'{"text": "a"}\n', owner="team-a")
    assert store.get(record.id).owner == "team-a"
    assert store.delete(record.id) == record
    assert record.id not in {r.id for r in store.list()} and not list(store.root.iterdir())
    with pytest.raises(NotFound):
        store.get(record.id)
    with pytest.raises(NotFound):
        store.delete(record.id)


def test_bundled_samples_cannot_be_deleted(store):
    sample = ensure_samples(store)[0]
    with pytest.raises(FailedPrecondition, match="bundled sample"):
        store.delete(sample.id)
    assert store.get(sample.id) == sample


# -- training data on the worker ----------------------------------------------------------------------


def mixed_size_zip() -> bytes:
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    buffer = io.BytesIO()
    sizes = [(80, 48), (48, 80), (64, 64), (70, 50), (40, 60), (64, 96), (33, 47), (50, 50)]
    with zipfile.ZipFile(buffer, "w") as archive:
        metadata = []
        for i, (width, height) in enumerate(sizes):
            pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8).numpy()
            image = io.BytesIO()
            Image.fromarray(pixels).save(image, format="PNG")
            archive.writestr(f"img{i}.png", image.getvalue())
            metadata.append(json.dumps({"file_name": f"img{i}.png", "text": f"caption {i % 3}"}))
        archive.writestr("metadata.jsonl", "\n".join(metadata) + "\n")
    return buffer.getvalue()


def all_in_memory_recipe():
    """The recipe as it was: every resized image kept as float32 in [-1, 1], cropped from memory (the oracle)."""
    from services.finetune.recipes.diffusion import DiffusionRecipe

    class AllInMemory(DiffusionRecipe):
        def _pixels(self, records, generator):
            if not hasattr(self, "images"):
                names = [r["file_name"] for r in self.train_records + self.val_records]
                self.images = {name: self._load_image(name).float() / 127.5 - 1.0 for name in names}
            return torch.stack([self._crop(self.images[r["file_name"]], generator) for r in records])

    return AllInMemory


def test_diffusion_training_decodes_per_batch_with_the_losses_of_keeping_all_images(settings, tmp_path):
    from services.finetune.hyperparams import Hyperparameters, TrainingData, resolve
    from services.finetune.training.recipe import RecipeContext, load_recipe

    path = tmp_path / "data.zip"
    path.write_bytes(mixed_size_zip())
    data = TrainingData(kind="diffusion", num_records=8, architecture="unet", native_resolution=32)
    requested = Hyperparameters(method="lora", max_steps=3, batch_size=2, resolution=32, validation_fraction=0.25,
                                random_crop=True, random_flip=True, mixed_precision="no")  # fmt: skip
    hp, total = resolve(requested, data)
    model = next(m for m in settings.models if m.name == "tiny-sd")
    results = {}
    for name, recipe_class in {"per batch": load_recipe("diffusion"), "all kept": all_in_memory_recipe()}.items():
        context = RecipeContext("job", model, path, hp, total, settings, torch.device("cpu"), tmp_path / name, None)
        recipe = recipe_class(context)
        recipe.setup()
        assert not hasattr(recipe, "images"), "no image is held between batches"
        results[name] = recipe.train()
        recipe.cleanup()
    per_batch, all_kept = results["per batch"], results["all kept"]
    assert len(per_batch.losses) == 3 and per_batch.losses == all_kept.losses
    assert per_batch.val_loss == all_kept.val_loss


CONVERSATIONS = {
    "multi-turn": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "how are you?"},
        {"role": "assistant", "content": "fine, thanks  "},
    ],
    "assistant twice in a row": [
        {"role": "user", "content": "Welcome me."},
        {"role": "assistant", "content": "Welcome."},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "and now?"},
        {"role": "assistant", "content": "Now this."},
    ],
    "one turn": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
}


@pytest.fixture(scope="module")
def chat_tokenizer(settings):
    from transformers import AutoTokenizer

    from shared.locations import pretrained_location

    location, kwargs = pretrained_location(next(m for m in settings.models if m.name == "tiny-llm"), settings)
    return AutoTokenizer.from_pretrained(location, **kwargs)


@pytest.mark.parametrize("case", list(CONVERSATIONS))
@pytest.mark.parametrize("template", ["builtin", "trims contents"])
def test_chat_masks_equal_the_exact_prefix_by_prefix_masks(chat_tokenizer, case, template, monkeypatch):
    from services.finetune.recipes import llm

    tokenizer = chat_tokenizer
    if template == "trims contents":  # the marked render cannot be put back: every prefix is rendered
        tokenizer = type(chat_tokenizer).from_pretrained(chat_tokenizer.name_or_path)
        tokenizer.chat_template = chat_tokenizer.chat_template.replace(
            "message['content'] +", "message['content'] | trim +"
        )
        assert tokenizer.chat_template != chat_tokenizer.chat_template
    messages = CONVERSATIONS[case]
    exact = llm._chat_example_by_prefixes(tokenizer, messages)
    prefix_renders = []
    monkeypatch.setattr(
        llm,
        "_exact_span",
        lambda *args, exact_span=llm._exact_span: prefix_renders.append(args[2]) or exact_span(*args),
    )
    example = llm._chat_example(tokenizer, messages)
    assert example == exact and example.label_tokens > 0
    turns = sum(m["role"] == "assistant" for m in messages)
    trimmed = template == "trims contents" and any(m["content"] != m["content"].strip() for m in messages)
    assert len(prefix_renders) == (2 + turns if trimmed else 2), "prefixes rendered only where contents change"
