"""Validation images: grids, PNG files and tracker logging."""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image


def make_grid(images: list[Image.Image], columns: int | None = None, pad: int = 2, background=(255, 255, 255)) -> Image.Image:
    """Tile PIL images (all the same size) into one image, `columns` wide (default: near-square)."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * (width + pad) + pad, rows * (height + pad) + pad), background)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        grid.paste(image.convert("RGB"), (pad + column * (width + pad), pad + row * (height + pad)))
    return grid


def save_and_log_images(accelerator, images: list[Image.Image], output_dir: str, tag: str, step: int,
                        captions: list[str] | None = None, columns: int | None = None) -> str:
    """Save `images` as one PNG grid under `output_dir/samples/` and send them to the trackers."""
    samples_dir = os.path.join(output_dir, "samples")
    os.makedirs(samples_dir, exist_ok=True)
    path = os.path.join(samples_dir, f"{tag}_step_{step:07d}.png")
    make_grid(images, columns).save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            stacked = np.stack([np.asarray(image.convert("RGB")) for image in images])
            tracker.writer.add_images(tag, stacked, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(image, caption=(captions or [None] * len(images))[i])
                               for i, image in enumerate(images)]}, step=step)
    return path
