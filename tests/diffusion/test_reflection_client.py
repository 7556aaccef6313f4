"""A client that knows only what reflection tells it gets images for every scheduler the server lists."""

from __future__ import annotations

import io

import grpc
from PIL import Image

from tests.llm.test_reflection_client import ReflectedService

SERVICE = "modelworks.diffusion.v1.DiffusionService"


def test_a_reflection_only_client_gets_images_for_every_listed_scheduler(diffusion_server):
    with grpc.insecure_channel(diffusion_server.address) as channel:
        diffusion = ReflectedService(channel, SERVICE)
        names = diffusion.call(
            "ListSchedulers", diffusion.message("modelworks.diffusion.v1.ListSchedulersRequest")
        ).names
        assert len(names) >= 10
        for name in names:
            request = diffusion.message(
                "modelworks.diffusion.v1.GenerateImagesRequest", prompt="a kite", steps=4, seed=7, scheduler=name
            )
            (image,) = diffusion.call("GenerateImages", request).images
            png = Image.open(io.BytesIO(image.png))
            assert png.size == (64, 64) and image.seed == 7
            assert f"Sampler: {name}," in png.text["parameters"]
        events = list(
            diffusion.call(
                "GenerateImagesStream",
                diffusion.message("modelworks.diffusion.v1.GenerateImagesRequest", prompt="a kite", steps=3),
            )
        )
        assert [e.WhichOneof("event") for e in events] == ["progress"] * 3 + ["result"]
