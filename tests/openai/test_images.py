"""Images through the official SDK: generations as base64 PNGs or as URLs this server serves, and edits
(img2img, and inpainting with a mask), each PNG with its parameters chunk."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from services.openai.image_store import ImageStore


def decoded(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_generations_come_back_as_pngs_with_their_parameters(client):
    request = dict(
        model="tiny-sd", prompt="a red lighthouse", n=2, size="64x64", response_format="b64_json",
        extra_body={"seed": 5, "steps": 2, "negative_prompt": "fog"},
    )  # fmt: skip
    reply = client.images.generate(**request)
    assert len(reply.data) == 2 and [d.seed for d in reply.data] == [5, 6]
    first, second = (decoded(d.b64_json) for d in reply.data)
    assert first.size == second.size == (64, 64)
    assert "Seed: 5" in first.text["parameters"] and "Seed: 6" in second.text["parameters"]
    assert "a red lighthouse" in first.text["parameters"] and "fog" in first.text["parameters"]
    again = client.images.generate(**request)  # the same request (and batch): the same pixels
    assert np.array_equal(np.asarray(decoded(again.data[1].b64_json)), np.asarray(second))


def test_a_url_serves_the_same_png_without_a_key(client):
    reply = client.images.generate(
        prompt="a blue square", size="64x64", response_format="url", extra_body={"seed": 9, "steps": 2}
    )
    fetched = httpx.get(reply.data[0].url)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    assert "Seed: 9" in Image.open(io.BytesIO(fetched.content)).text["parameters"]
    gone = httpx.get(reply.data[0].url.rsplit("/", 1)[0] + "/not-a-token.png")
    assert gone.status_code == 404 and "expired" in gone.json()["error"]["message"]


def test_url_images_expire_and_the_oldest_go_past_the_size_bound():
    now = [0.0]
    store = ImageStore(ttl_s=10, max_bytes=10, clock=lambda: now[0])
    first, second = store.put(b"12345"), store.put(b"67890")
    assert store.get(first) == b"12345"
    third = store.put(b"abc")  # 13 bytes held: the oldest goes
    assert store.get(first) is None and store.get(second) == b"67890" and store.get(third) == b"abc"
    now[0] = 10.0
    assert store.get(second) is None and store.get(third) is None


def test_an_edit_with_a_mask_repaints_only_the_masked_half(client):
    start = Image.new("RGB", (64, 64), (30, 120, 200))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 0, 64, 64))  # white: repaint the right half
    reply = client.images.edit(
        model="tiny-sd",
        image=("start.png", png_bytes(start)),
        mask=("mask.png", png_bytes(mask)),
        prompt="a yellow sun",
        response_format="b64_json",
        extra_body={"seed": 3, "steps": 2},
    )
    edited = decoded(reply.data[0].b64_json)
    assert "Mask blur: 0" in edited.text["parameters"]
    pixels, original = np.asarray(edited.convert("RGB"), np.int16), np.asarray(start, np.int16)
    kept, repainted = np.abs(pixels - original)[:, :32].mean(), np.abs(pixels - original)[:, 32:].mean()
    assert kept < 1.0 < 10.0 < repainted, (kept, repainted)
    img2img = client.images.edit(
        image=("start.png", png_bytes(start)),
        prompt="a yellow sun",
        response_format="b64_json",
        extra_body={"seed": 3, "steps": 2, "strength": 0.5},
    )
    assert decoded(img2img.data[0].b64_json).size == (64, 64)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [({"size": "huge"}, "WIDTHxHEIGHT"), ({"size": "4096x4096"}, "4096"), ({"n": 100}, "num_images")],
)
def test_bad_image_requests_are_400s_naming_the_field(client, overrides, expected):
    with pytest.raises(openai.BadRequestError, match=expected):
        client.images.generate(**({"prompt": "x", "extra_body": {"steps": 2}} | overrides))
