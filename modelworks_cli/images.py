"""`modelworks image`: images from the diffusion service, written as PNGs, with a bar over the denoising steps."""

from __future__ import annotations

import sys
from pathlib import Path

from tqdm import tqdm

from modelworks.diffusion.v1 import diffusion_pb2
from modelworks_cli.connection import CliError
from modelworks_cli.options import command_options, count, seed_number
from modelworks_cli.output import print_json


def register(commands) -> None:
    image = commands.add_parser("image", parents=[command_options()], help="generate images into PNG files")
    image.add_argument("prompt", help="what to draw")
    image.add_argument("--out", type=Path, default=Path("."), help="folder for the PNGs (default: here)")
    image.add_argument("--model", default="", help="a model from `models list --kind diffusion`")
    image.add_argument("--negative-prompt", default="", help="what to steer away from")
    image.add_argument("-n", "--num-images", type=count, default=1, help="how many (default 1)")
    image.add_argument("--steps", type=count, default=0, help="denoising steps (default: the model's)")
    image.add_argument("--width", type=count, default=0, help="a multiple of 8 (default: the model's)")
    image.add_argument("--height", type=count, default=0, help="a multiple of 8 (default: the model's)")
    image.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance (<= 1: off)")
    image.add_argument("--scheduler", default="", help="a scheduler name (default: the model's)")
    image.add_argument("--seed", type=seed_number, default=None, help="image i gets seed + i (default: drawn)")
    image.add_argument("--adapter", default="", help="a diffusion LoRA adapter from `adapters list`")
    image.add_argument("--adapter-scale", type=float, default=None, help="the adapter's weight (default 1)")
    image.set_defaults(run=image_command)


def image_request(args) -> diffusion_pb2.GenerateImagesRequest:
    req = diffusion_pb2.GenerateImagesRequest(
        model=args.model,
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        num_images=args.num_images,
        steps=args.steps,
        width=args.width,
        height=args.height,
        scheduler=args.scheduler,
        adapter=args.adapter,
    )
    for name in ("guidance_scale", "seed", "adapter_scale"):
        if getattr(args, name) is not None:
            setattr(req, name, getattr(args, name))
    return req


def generate(clients, req, show_progress: bool) -> diffusion_pb2.GenerateImagesResponse:
    """Follow the stream: one bar tick per denoising step, then the images."""
    bar = None
    try:
        for event in clients.diffusion.GenerateImagesStream(req):
            if event.HasField("result"):
                return event.result
            progress = event.progress
            if bar is None:
                bar = tqdm(total=progress.total_steps, unit="step", file=sys.stderr, disable=not show_progress)
            bar.update(progress.step - bar.n)
    finally:
        if bar is not None:
            bar.close()
    raise CliError("the diffusion service ended the stream without a result")


def free_path(folder: Path, seed: int) -> Path:
    """`image-<seed>.png`, numbered when that name is taken: an earlier image is never overwritten."""
    path, n = folder / f"image-{seed}.png", 1
    while path.exists():
        path, n = folder / f"image-{seed}-{n}.png", n + 1
    return path


def image_command(args, clients) -> int:
    result = generate(clients, image_request(args), show_progress=not args.json)
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    for image in result.images:
        path = free_path(args.out, image.seed)
        path.write_bytes(image.png)
        written.append({"path": str(path), "seed": image.seed, "width": image.width, "height": image.height})
    if args.json:
        print_json(written)
    else:
        for item in written:
            print(f"{item['path']}  ({item['width']}x{item['height']}, seed {item['seed']})")
    return 0
