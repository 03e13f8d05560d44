"""Is the toy base model a real generator? Generate from vocabulary prompts and let the judge read the images.

API:
    evaluate_base(pipe, judge, num=64, seed=0, steps=20, guidance=5.0) -> (metrics, images, specs)
        metrics: fraction of images with the asked shape / colour / background, and all three at once
    image_grid(images, columns=8) -> PIL.Image
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from spectral_diffusion.toyworld import render
from spectral_diffusion.toyworld.judge import Judge


@torch.no_grad()
def evaluate_base(pipe: StableDiffusionPipeline, judge: Judge, num: int = 64, seed: int = 0, steps: int = 20,
                  guidance: float = 5.0, batch: int = 16,
                  ) -> tuple[dict[str, float], list[Image.Image], list[render.SceneSpec]]:
    """Sample `num` random scenes' captions ("a red star on a gray background"), generate one image each (seeded)
    and score them with the judge."""
    rng = random.Random(seed)
    specs = [render.sample_spec(rng) for _ in range(num)]
    images: list[Image.Image] = []
    for start in range(0, num, batch):
        chunk = specs[start:start + batch]
        generator = torch.Generator().manual_seed(seed + start)
        images += pipe([render.caption(s) for s in chunk], num_inference_steps=steps, guidance_scale=guidance,
                       height=render.RESOLUTION, width=render.RESOLUTION, generator=generator).images
    return judge.shape_colour_background_accuracy(images, specs), images, specs


def image_grid(images: Sequence[Image.Image], columns: int = 8) -> Image.Image:
    """Tile equally sized images row by row."""
    w, h = images[0].size
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (w * columns, h * rows))
    for k, image in enumerate(images):
        grid.paste(image, ((k % columns) * w, (k // columns) * h))
    return grid
