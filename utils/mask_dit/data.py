"""Paired image / mask / caption data for mask-conditioned generation, and a synthetic fundus set.

Folder layout (`--train_data_dir`)::

    root/images/0001.png     root/masks/0001.png     (same stem; any PIL image format)
    root/metadata.jsonl      optional: {"file_name": "0001.png", "text": "..."} per line
    root/images/0001.txt     or optional per-image caption files

Mask files: an index map where 0 is background and k (1..mask_channels) turns on channel k-1
(multi-class one-hot), or, for a single channel, any 0/255 image (thresholded at 128).
Image and mask get the identical resize, crop and flip; masks are resized with nearest.

A Hub / `save_to_disk` dataset works too (`image`, `mask`, optional `text` columns).

Run `python -m utils.mask_dit.data --output_dir data/fundus --num_images 256` to write the synthetic
fundus set (circular field, vessel trees, optic disc, lesion spots; masks: 1 = vessel, 2 = lesion).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from utils.data import BadSampleError, EpochDataset, SkipsBadSamples, read_caption_file, read_json_lines, sample_rng
from utils.errors import UserError, UserFileNotFoundError
from utils.images import cover_size, crop_origin, decode_image_file

logger = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


@dataclass
class PairRecord:
    """Where one pair comes from: file paths, or PIL images already in memory (Hub datasets)."""

    name: str
    image: str | Image.Image
    mask: str | Image.Image
    caption: str = ""


def _stems(folder: str) -> dict[str, str]:
    return {
        os.path.splitext(name)[0]: os.path.join(folder, name)
        for name in sorted(os.listdir(folder))
        if name.lower().endswith(IMAGE_EXTENSIONS)
    }


def scan_paired_folder(root: str, caption_column: str = "text") -> list[PairRecord]:
    """Pairs in `root/images` and `root/masks` by file stem, with captions if present."""
    image_dir, mask_dir = os.path.join(root, "images"), os.path.join(root, "masks")
    for folder in (image_dir, mask_dir):
        if not os.path.isdir(folder):
            raise UserFileNotFoundError(f"--train_data_dir {root}: missing folder {folder} (expected images/ and masks/)")
    images, masks = _stems(image_dir), _stems(mask_dir)
    no_mask = sorted(set(images) - set(masks))
    no_image = sorted(set(masks) - set(images))
    if no_mask or no_image:
        raise UserError(
            f"--train_data_dir {root}: unmatched pairs. Images without a mask: "
            f"{[os.path.basename(images[s]) for s in no_mask[:10]]}; masks without an image: "
            f"{[os.path.basename(masks[s]) for s in no_image[:10]]}. Give each image a mask with the same stem."
        )
    if not images:
        raise UserError(f"--train_data_dir {root}: no images in {image_dir}")
    captions = _read_captions(root, image_dir, caption_column)
    return [PairRecord(stem, images[stem], masks[stem], captions.get(stem, "")) for stem in images]


def _read_captions(root: str, image_dir: str, caption_column: str) -> dict[str, str]:
    captions = {}
    metadata = os.path.join(root, "metadata.jsonl")
    if os.path.isfile(metadata):
        for line_number, row in read_json_lines(metadata):
            if "file_name" not in row or caption_column not in row:
                raise UserError(
                    f"{metadata}:{line_number}: needs 'file_name' and '{caption_column}' (--caption_column), "
                    f"got keys {sorted(row)}"
                )
            captions[os.path.splitext(os.path.basename(row["file_name"]))[0]] = str(row[caption_column])
    for name in sorted(os.listdir(image_dir)):
        if name.endswith(".txt"):
            captions.setdefault(os.path.splitext(name)[0], read_caption_file(os.path.join(image_dir, name)))
    return captions


def hub_records(dataset, image_column: str = "image", mask_column: str = "mask", caption_column: str | None = "text"):
    """Records from a `datasets.Dataset` with image / mask (/ caption) columns (loaded lazily, row by row)."""
    columns = dataset.column_names
    for flag, column in (("--image_column", image_column), ("--mask_column", mask_column)):
        if column not in columns:
            raise UserError(f"{flag} '{column}' not in dataset columns {columns}")
    if caption_column is not None and caption_column not in columns:
        caption_column = None
    return _HubRecords(dataset, image_column, mask_column, caption_column)


class _HubRecords:
    def __init__(self, dataset, image_column, mask_column, caption_column):
        self.dataset, self.image_column, self.mask_column, self.caption_column = (
            dataset, image_column, mask_column, caption_column
        )

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        row = self.dataset[int(index)]
        caption = str(row[self.caption_column]) if self.caption_column else ""
        return PairRecord(f"row {index}", row[self.image_column], row[self.mask_column], caption)


def select_fraction(num_items: int, ratio: float, seed: int | None) -> list[int]:
    """A seeded random subset of round(ratio * num_items) indices (at least 1), sorted."""
    if not 0.0 < ratio <= 1.0:
        raise UserError(f"--sample_ratio must be in (0, 1], got {ratio}")
    if ratio == 1.0:
        return list(range(num_items))
    count = max(1, round(ratio * num_items))
    generator = np.random.default_rng(seed if seed is not None else 0)
    return sorted(generator.permutation(num_items)[:count].tolist())


_WARNED_MASKS: set = set()


def mask_to_channels(mask: np.ndarray, mask_channels: int, name: str, flag: str = "--mask_channels") -> np.ndarray:
    """uint8 mask [H, W] -> float32 [mask_channels, H, W] in {0, 1} (see module docstring); `flag`: the option that
    set `mask_channels` (train_controlnet.py's --conditioning_num_classes reads masks this way too)."""
    if mask_channels == 1 and mask.max() > 1:
        grey = int(((mask > 1) & (mask < 255)).sum())
        if grey and "grey" not in _WARNED_MASKS:
            _WARNED_MASKS.add("grey")
            logger.warning(f"mask {name}: {grey} of {mask.size} pixels are grey (neither 0 nor 255); a single-channel "
                           "mask is thresholded at >= 128, so they become background or target by that rule. Save "
                           "binary 0/255 masks to decide it yourself (further grey masks are not reported).")
        return (mask >= 128).astype(np.float32)[None]
    if mask.max() > mask_channels:
        raise UserError(
            f"mask {name}: value {int(mask.max())} but {flag} is {mask_channels}. Masks are index maps "
            f"(0 = background, k = class k <= {flag[2:]}), or 0/255 images for a single channel."
        )
    return np.stack([(mask == k + 1) for k in range(mask_channels)]).astype(np.float32)




def usable_records(args, records: list[PairRecord], what: str) -> list[PairRecord]:
    """The pre-flight scan of the pairs (utils.preflight): image and mask headers decode, sizes match, captions
    are text. With --skip_bad_samples the bad pairs are left out, otherwise the run stops listing them."""
    from utils.preflight import caption_problem, image_header, preflight

    def check(index):
        record = records[index]
        sizes = []
        for kind, source in (("image", record.image), ("mask", record.mask)):
            size, problem = image_header(source, record.name)
            where = source if isinstance(source, str) else f"pair '{record.name}' {kind}"
            if problem:
                yield where, problem
            sizes.append(size)
        if None not in sizes and sizes[0] != sizes[1]:
            yield (record.mask if isinstance(record.mask, str) else f"pair '{record.name}'",
                   f"mask is {sizes[1][0]}x{sizes[1][1]} but its image is {sizes[0][0]}x{sizes[0][1]}")
        problem = caption_problem(record.caption) if record.caption is not None else None
        if problem:
            yield f"pair '{record.name}'", problem

    bad = preflight(args, len(records), check, what)
    return [record for index, record in enumerate(records) if index not in bad]


class PairedImageMaskDataset(SkipsBadSamples, EpochDataset):
    """Image [3, R, R] in [-1, 1], mask [C, R, R] in {0, 1} and caption, with identical crop / flip.

    The shorter side is resized to `resolution` (image: bicubic, mask: nearest), then both are
    cropped at the same place (random or centre) and flipped together. The random choices are a
    pure function of (seed, epoch, index) (`utils.data.sample_rng`), so a resumed run, or one with
    more dataloader workers, sees the same augmentations; call `set_epoch` every epoch.
    """

    def __init__(self, records, resolution: int, mask_channels: int, random_crop: bool = False,
                 random_flip: bool = False, indices: list[int] | None = None, seed: int | None = None,
                 skip_bad_samples: bool = False):
        self.records, self.skip_bad_samples = records, skip_bad_samples
        self.indices = list(range(len(records))) if indices is None else list(indices)
        self.resolution = resolution
        self.mask_channels = mask_channels
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.seed = seed
        self.epoch = 0
        self.buckets = None  # --enable_bucket: each item's (width, height) bucket (utils.buckets)

    def __len__(self) -> int:
        return len(self.indices)

    def target(self, index: int) -> tuple[int, int]:
        """(width, height) of item `index`'s crop: its bucket, or the --resolution square."""
        return tuple(self.buckets[index]) if self.buckets is not None else (self.resolution, self.resolution)

    def interchangeable(self, index: int, other: int) -> bool:  # a skipped item's stand-in: the same bucket
        return self.buckets is None or tuple(self.buckets[index]) == tuple(self.buckets[other])

    def load_pair(self, index: int) -> tuple[Image.Image, Image.Image, PairRecord]:
        record = self.records[self.indices[index]]
        image, mask = (source if isinstance(source, Image.Image) else decode_image_file(source)
                       for source in (record.image, record.mask))
        if image.size != mask.size:
            image_name = record.image if isinstance(record.image, str) else f"{record.name} image"
            mask_name = record.mask if isinstance(record.mask, str) else f"{record.name} mask"
            raise BadSampleError(
                f"{image_name} is {image.size[0]}x{image.size[1]} but {mask_name} is {mask.size[0]}x{mask.size[1]}; "
                "an image and its mask must have the same size."
            )
        return image.convert("RGB"), mask.convert("L"), record

    def resized_size(self, image_size: tuple[int, int], target: tuple[int, int] | None = None) -> tuple[int, int]:
        """The (width, height) an image of `image_size` is resized to: short side `resolution`, or (a bucket)
        the smallest size covering the target at the image's aspect ratio."""
        return cover_size(image_size, target or (self.resolution, self.resolution))

    def plan(self, index: int, epoch: int, resized_size: tuple[int, int]) -> tuple[tuple[int, int], bool]:
        """Item `index`'s random choices in `epoch`, made here only: the crop's (top, left), then the flip.
        `__getitem__` and the latent cache (`utils.mask_dit.cache`) both call this."""
        rng = sample_rng(self.seed, epoch, index)
        crop = crop_origin(resized_size, self.target(index), not self.random_crop, rng)
        return crop, bool(self.random_flip and rng.random() < 0.5)

    def __getitem__(self, index: int) -> dict:
        return self.first_good(index, self.load_item)

    def load_item(self, index: int) -> dict:
        image, mask, record = self.load_pair(index)
        target = self.target(index)
        size = self.resized_size(image.size, target)
        if size != image.size:
            image = image.resize(size, Image.BICUBIC)
            mask = mask.resize(size, Image.NEAREST)
        (top, left), flip = self.plan(index, self.epoch, size)
        box = (left, top, left + target[0], top + target[1])  # image and mask cropped together
        image_array = np.asarray(image.crop(box), dtype=np.float32) / 127.5 - 1.0
        mask_array = mask_to_channels(np.asarray(mask.crop(box)), self.mask_channels, record.name)
        image_tensor = torch.from_numpy(image_array).permute(2, 0, 1).contiguous()
        mask_tensor = torch.from_numpy(mask_array)
        if flip:
            image_tensor, mask_tensor = image_tensor.flip(-1), mask_tensor.flip(-1)
        return {"pixel_values": image_tensor, "mask": mask_tensor, "caption": record.caption}


def collate_pairs(examples: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "mask": torch.stack([e["mask"] for e in examples]),
        "captions": [e["caption"] for e in examples],
    }


# ----------------------------------------------------------------------------------------------
# Synthetic fundus photographs (tests and the CPU demo).
# ----------------------------------------------------------------------------------------------


def _stamp_segment(canvas: np.ndarray, start, end, radius: float, value) -> None:
    """Draw a thick line segment on canvas [H, W] or [H, W, 3] (distance-to-segment test in its box)."""
    height, width = canvas.shape[:2]
    x0, y0 = start
    x1, y1 = end
    pad = radius + 1
    left, right = int(max(0, min(x0, x1) - pad)), int(min(width, max(x0, x1) + pad + 1))
    top, bottom = int(max(0, min(y0, y1) - pad)), int(min(height, max(y0, y1) + pad + 1))
    if left >= right or top >= bottom:
        return
    ys, xs = np.mgrid[top:bottom, left:right].astype(np.float32) + 0.5
    dx, dy = x1 - x0, y1 - y0
    length_sq = dx * dx + dy * dy + 1e-9
    along = np.clip(((xs - x0) * dx + (ys - y0) * dy) / length_sq, 0.0, 1.0)
    distance = np.hypot(xs - (x0 + along * dx), ys - (y0 + along * dy))
    canvas[top:bottom, left:right][distance <= radius] = value


def _grow_vessel(rng, segments, start, angle, width, length, depth):
    """Append a wandering, branching vessel as (start, end, radius) segments."""
    x, y = start
    steps = max(2, int(length / 4))
    for step in range(steps):
        angle += rng.normal(0.0, 0.25)
        nx, ny = x + 4 * np.cos(angle), y + 4 * np.sin(angle)
        segments.append(((x, y), (nx, ny), width))
        x, y = nx, ny
        if depth < 3 and step > 2 and rng.random() < 0.12:
            branch = angle + rng.choice([-1, 1]) * rng.uniform(0.5, 1.0)
            _grow_vessel(rng, segments, (x, y), branch, max(0.6, width * 0.7), length * 0.6, depth + 1)
    return segments


def make_synthetic_fundus(seed: int, size: int = 128) -> tuple[Image.Image, Image.Image, str]:
    """One fundus-like RGB image, its index mask (0 bg, 1 vessel, 2 lesion) and a caption; deterministic by seed.

    Drawn at 128 px and resized, so the same seed gives the same picture at every size.
    """
    base = 128
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:base, 0:base].astype(np.float32) + 0.5
    centre = base / 2
    radius = base * 0.46
    distance = np.hypot(xs - centre, ys - centre) / radius
    field = distance <= 1.0
    tint = rng.uniform(0.85, 1.1)
    image = np.zeros((base, base, 3), np.float32)
    shade = np.clip(1.0 - 0.35 * distance**2, 0, 1)
    image[..., 0] = (0.78 * tint) * shade
    image[..., 1] = 0.36 * shade
    image[..., 2] = 0.16 * shade
    side = rng.choice([-1, 1])
    disc = (centre + side * base * 0.22 + rng.normal(0, 2), centre + rng.normal(0, 3))
    disc_distance = np.hypot(xs - disc[0], ys - disc[1])
    glow = np.exp(-(disc_distance / (base * 0.07)) ** 2)
    image += glow[..., None] * np.array([0.2, 0.45, 0.3], np.float32)

    mask = np.zeros((base, base), np.uint8)
    segments = []
    for arcade in range(rng.integers(4, 6)):
        angle = (-side * np.pi / 2 if side > 0 else 0) + rng.uniform(0, 2 * np.pi)
        _grow_vessel(rng, segments, disc, angle, rng.uniform(1.2, 1.8), rng.uniform(40, 70), 0)
    vessel_color = np.array([0.48, 0.1, 0.07], np.float32)
    for start, end, width in segments:
        _stamp_segment(image, start, end, width, vessel_color)
        _stamp_segment(mask, start, end, width, 1)

    lesions = []
    for _ in range(rng.integers(0, 6)):
        kind = "exudate" if rng.random() < 0.5 else "haemorrhage"
        r = rng.uniform(1.5, 3.5)
        angle, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0.1, 0.8) * radius
        point = (centre + dist * np.cos(angle), centre + dist * np.sin(angle))
        color = np.array([0.95, 0.85, 0.35] if kind == "exudate" else [0.35, 0.03, 0.03], np.float32)
        _stamp_segment(image, point, point, r, color)
        _stamp_segment(mask, point, point, r, 2)
        lesions.append(kind)
    image[~field] = 0.0
    mask[~field] = 0
    image = np.clip(image + rng.normal(0, 0.01, image.shape), 0, 1)

    counts = {kind: lesions.count(kind) for kind in ("exudate", "haemorrhage") if kind in lesions}
    lesion_text = ", ".join(f"{n} {kind}{'s' if n > 1 else ''}" for kind, n in counts.items()) or "no lesions"
    caption = f"a fundus photograph, optic disc on the {'right' if side > 0 else 'left'}, {lesion_text}"
    image_pil = Image.fromarray((image * 255).round().astype(np.uint8))
    mask_pil = Image.fromarray(mask)
    if size != base:
        image_pil = image_pil.resize((size, size), Image.BICUBIC)
        mask_pil = mask_pil.resize((size, size), Image.NEAREST)
    return image_pil, mask_pil, caption


def write_synthetic_fundus_dataset(output_dir: str, num_images: int, size: int = 128, seed: int = 0) -> str:
    """Write `num_images` synthetic pairs as images/, masks/ and metadata.jsonl; returns output_dir."""
    os.makedirs(os.path.join(output_dir, "images"), exist_ok=True)
    os.makedirs(os.path.join(output_dir, "masks"), exist_ok=True)
    with open(os.path.join(output_dir, "metadata.jsonl"), "w", encoding="utf-8") as metadata:
        for index in range(num_images):
            image, mask, caption = make_synthetic_fundus(seed * 1_000_003 + index, size)
            name = f"{index:05d}.png"
            image.save(os.path.join(output_dir, "images", name))
            mask.save(os.path.join(output_dir, "masks", name))
            metadata.write(json.dumps({"file_name": name, "text": caption}) + "\n")
    return output_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write a synthetic fundus image/mask/caption dataset.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--num_images", type=int, default=256)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_synthetic_fundus_dataset(args.output_dir, args.num_images, args.resolution, args.seed)
    print(f"wrote {args.num_images} pairs to {args.output_dir}")


if __name__ == "__main__":
    main()


def assign_pair_buckets(args, dataset: PairedImageMaskDataset) -> dict | None:
    """--enable_bucket: each pair's bucket from its image header (no decode), the mask cropped with it; returns the
    summary (pairs per bucket, the ones far outside) for the log and run_info.json."""
    if not getattr(args, "enable_bucket", False):
        return None
    from utils.buckets import assign_buckets, bucket_summary, log_bucket_summary
    from utils.preflight import image_header

    records = [dataset.records[i] for i in dataset.indices]
    sizes = [image_header(record.image, record.name)[0] or (args.resolution, args.resolution) for record in records]
    dataset.buckets = assign_buckets(sizes, args)
    summary = bucket_summary(sizes, dataset.buckets, [record.name for record in records])
    log_bucket_summary(summary)
    return summary
