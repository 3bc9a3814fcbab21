"""--masked_loss (kohya-ss/sd-scripts' name): a per-image mask weights the denoising loss, so only the subject
trains. The mask of `photos/dog1.png` is `photos/mask/dog1.<any image extension>` (white = train, black = ignore,
grey in between), else the image's own alpha channel. It goes through the image's resize, crop and flip, then is
averaged down to the latent grid ("area" interpolation) and multiplies the per-element loss before its mean, as
kohya's `apply_masked_loss` does (the loss is not renormalised by the mask's area)."""

from __future__ import annotations

import io
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from utils.data import BadSampleError
from utils.errors import UserError
from utils.images import IMAGE_EXTENSIONS, crop_and_flip

MASK_FOLDER = "mask"
MAX_LISTED = 10


def add_mask_args(parser) -> None:
    parser.add_argument("--masked_loss", action="store_true",
                        help="Weight the loss by a per-image mask: <image folder>/mask/<same name>.<png|jpg|...> "
                             "(white = train, black = ignore), else the image's alpha channel (kohya's "
                             "--masked_loss / --alpha_mask).")


def _path_of(source) -> str | None:
    if isinstance(source, dict):
        return source.get("path")
    return source if isinstance(source, str) else None


def mask_file(image_source) -> str | None:
    """The mask file of an image: `<folder>/mask/<stem>.<extension>`, or None."""
    path = _path_of(image_source)
    if path is None:
        return None
    folder, stem = os.path.join(os.path.dirname(path), MASK_FOLDER), os.path.splitext(os.path.basename(path))[0]
    for extension in IMAGE_EXTENSIONS:
        for candidate in (stem + extension, stem + extension.upper()):
            if os.path.isfile(os.path.join(folder, candidate)):
                return os.path.join(folder, candidate)
    return None


def _open(image_source) -> Image.Image:
    if isinstance(image_source, dict) and image_source.get("bytes"):
        return Image.open(io.BytesIO(image_source["bytes"]))
    return Image.open(_path_of(image_source))


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


def load_mask(image_source, name: str) -> Image.Image:
    """The image's mask as an 8-bit greyscale image of the image's size (EXIF orientation applied, as the image)."""
    path = mask_file(image_source)
    try:
        if path is not None:
            with Image.open(path) as mask:
                return ImageOps.exif_transpose(mask).convert("L")
        with _open(image_source) as image:
            if has_alpha(image):
                return ImageOps.exif_transpose(image).convert("RGBA").getchannel("A")
    except (OSError, SyntaxError, ValueError) as error:
        raise BadSampleError(f"{path or name}: cannot read the mask ({type(error).__name__}: {error})") from error
    raise BadSampleError(f"{name}: no mask (--masked_loss): no {MASK_FOLDER}/ file and no alpha channel")


def has_mask(image_source) -> bool:
    """A mask file, or an alpha channel."""
    if mask_file(image_source) is not None:
        return True
    try:
        with _open(image_source) as image:
            return has_alpha(image)
    except (OSError, SyntaxError, ValueError):
        return False


def check_masks(rows, image_column: str, where: str, optional: list[bool] | None = None) -> None:
    """--masked_loss: every image has a mask of its own size (header reads only); else one error listing them.
    `optional[i]`: row i may go without one (prior preservation's class images)."""
    missing, wrong = [], []
    for index, source in enumerate(rows[image_column]):
        name = _path_of(source) or "<in-memory image>"
        if optional is not None and optional[index] and not has_mask(source):
            continue
        path = mask_file(source)
        try:
            with _open(source) as image:
                size, alpha = image.size, has_alpha(image)
            if path is None:
                if not alpha:
                    missing.append(name)
                continue
            with Image.open(path) as mask:
                if mask.size != size:
                    wrong.append(f"{path} is {mask.size[0]}x{mask.size[1]}, its image {size[0]}x{size[1]}")
        except (OSError, SyntaxError, ValueError):
            continue  # an unreadable image is the pre-flight's to report
    problems = []
    if missing:
        problems.append(f"{len(missing)} image(s) without a mask (no {MASK_FOLDER}/<same name> file, no alpha "
                        "channel): " + ", ".join(missing[:MAX_LISTED]) + (" ..." if len(missing) > MAX_LISTED else ""))
    if wrong:
        problems.append(f"{len(wrong)} mask(s) of the wrong size: " + "; ".join(wrong[:MAX_LISTED])
                        + (" ..." if len(wrong) > MAX_LISTED else ""))
    if problems:
        raise UserError(f"--masked_loss ({where}): " + ". ".join(problems) + ". Give every image a mask of its own "
                        f"size in a {MASK_FOLDER}/ folder beside it (or an alpha channel), or drop --masked_loss.")


def transform_mask(mask: Image.Image, resized_size: tuple[int, int], crop: tuple[int, int], flip: bool,
                   target: tuple[int, int]) -> torch.Tensor:
    """The mask through the image's resize (to `resized_size`), crop ((top, left), `target` = (width, height))
    and flip: [1, H, W] in [0, 1]."""
    if mask.size != resized_size:
        mask = mask.resize(resized_size, Image.Resampling.BILINEAR)
    mask = crop_and_flip(mask, crop, flip, target)
    return torch.from_numpy(np.asarray(mask, dtype=np.uint8).copy()).float().div(255.0)[None]


def latent_mask(mask: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, W] pixel masks averaged onto the latents' [h, w] grid: [B, 1, h, w]."""
    return F.interpolate(mask.to(latents.device, torch.float32), size=latents.shape[-2:], mode="area")
