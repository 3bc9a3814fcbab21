"""Images: decoding with clear errors, RGB conversion, resize/crop, PIL <-> tensor, grids, and
saving/logging sample images (validation grids in output_dir/samples and the trackers).
"""

from __future__ import annotations

import io
import math
import os
import random

import numpy as np
import torch
from PIL import Image, ImageOps

from utils.data import BadSampleError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


INTERPOLATION_MODES = {
    "lanczos": Image.Resampling.LANCZOS,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    # torchvision's name (diffusers' choices come from it); PIL's nearest is the "exact" variant.
    "nearest_exact": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


MAX_IMAGE_PIXELS = 16384 * 16384


def decode_image_file(path: str, mode: str | None = None) -> Image.Image:
    """Decode an image file fully (converted to `mode` if given), or raise a BadSampleError naming it
    (a truncated file whose header is intact fails here, not at the header check)."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert(mode) if mode else image.copy()
    except (OSError, SyntaxError, ValueError) as error:
        raise BadSampleError(f"{path}: cannot read image ({type(error).__name__}: {error})") from error


def load_image(source, name: str | None = None) -> Image.Image:
    """Decode any image source to an RGB PIL image, upright (EXIF orientation applied).

    source: a path, a `datasets` Image dict ({"path", "bytes"}), raw bytes or a PIL image.
    16-bit and float images are scaled to 8 bits; transparency is composited onto white
    (glyphs and product shots on transparent backgrounds would otherwise turn black).
    """
    if isinstance(source, dict):
        name = name or source.get("path")
        source = source.get("bytes") or source.get("path")
    if isinstance(source, str):
        name = name or source
    name = name or "<in-memory image>"
    try:
        if isinstance(source, Image.Image):
            image = source
        elif isinstance(source, (bytes, bytearray)):
            image = Image.open(io.BytesIO(source))
        elif isinstance(source, str):
            if not os.path.exists(source):
                raise BadSampleError(f"{source}: image file not found")
            if os.path.getsize(source) == 0:
                raise BadSampleError(f"{source}: image file is empty (0 bytes)")
            image = Image.open(source)
        else:
            raise BadSampleError(f"{name}: unsupported image value of type {type(source).__name__}")
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise BadSampleError(f"{name}: image is {image.width}x{image.height}, larger than the {MAX_IMAGE_PIXELS}-pixel limit")
        image.load()
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except BadSampleError:
        raise
    except Exception as error:  # PIL raises many types for corrupt data
        raise BadSampleError(f"{name}: cannot read image ({type(error).__name__}: {error})") from error


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def cover_size(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """The (width, height) an image of `size` is resized to so that it covers `target` (width, height) at its own
    aspect ratio: a square target is the short side to that size; an aspect-ratio bucket the smallest cover."""
    (width, height), (target_width, target_height) = size, target
    scale = max(target_width / width, target_height / height)
    return max(target_width, round(width * scale)), max(target_height, round(height * scale))


def resize_short_side(image: Image.Image, size: int, interpolation: str = "lanczos") -> Image.Image:
    new_size = cover_size(image.size, (size, size))
    if new_size == image.size:
        return image
    return image.resize(new_size, INTERPOLATION_MODES[interpolation])


def crop_origin(size: tuple[int, int], crop, center: bool, rng: random.Random) -> tuple[int, int]:
    """(top, left) of a `crop` (a side, or (width, height)) in an image of `size` (width, height): centred, or
    drawn from `rng` (top, then left)."""
    (width, height), (crop_width, crop_height) = size, (crop, crop) if isinstance(crop, int) else crop
    if center:
        return (height - crop_height) // 2, (width - crop_width) // 2
    return rng.randint(0, height - crop_height), rng.randint(0, width - crop_width)


def crop_and_flip(image: Image.Image, crop: tuple[int, int], flip: bool, size: tuple[int, int]) -> Image.Image:
    """The `size` (width, height) crop at `crop` (top, left), mirrored left-right when `flip`: the one geometry an
    image, its --masked_loss mask and its ControlNet conditioning image all go through."""
    (top, left), (width, height) = crop, size
    image = image.crop((left, top, left + width, top + height))
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor [3, H, W] in [-1, 1]."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Tensor [B, 3, H, W] in [-1, 1] -> list of RGB PIL images."""
    array = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]


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
