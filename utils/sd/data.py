"""Stable Diffusion training data: (image, caption) rows, the image transform, `TextImageDataset`.

Sources for text-to-image (`load_text_image_dataset`):
  * `--dataset_name`: a Hub dataset (or a local dataset script/folder `datasets` understands);
  * `--train_data_dir` with `metadata.jsonl`/`metadata.csv`: an `imagefolder`;
  * `--train_data_dir` with `name.png` + `name.txt` pairs: a captioned image folder;
  * `--train_data_file` `data.csv` / `data.jsonl`: rows with an image path (relative to the file)
    and a caption.
Images are decoded by us, not by `datasets`, so an unreadable image names its file.

Augmentation randomness is a function of (seed, epoch, index) only, so it is identical with
any number of workers and after a resume (see `sample_rng`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import os
import random
from dataclasses import dataclass, fields

import numpy as np
import torch
from PIL import Image

from utils.buckets import assign_buckets, bucket_summary, log_bucket_summary
from utils.data import (BadSampleError, EpochDataset, SkipsBadSamples, add_data_source_args, add_image_caption_args,
                        first_bad_json_line, sample_rng, split_train_validation)
from utils.errors import UserError, UserFileNotFoundError
from utils.images import (IMAGE_EXTENSIONS, INTERPOLATION_MODES, cover_size, crop_and_flip, crop_origin, load_image,
                          pil_to_tensor)
from utils.preflight import add_preflight_args
from utils.sd.kohya_folders import add_kohya_folder_args, caption_for, is_repeat_layout, repeat_folder_rows
from utils.sd.masks import MASK_FOLDER, add_mask_args, check_masks, has_mask, load_mask, transform_mask

logger = logging.getLogger(__name__)


PRIOR_COLUMN = "prior_preservation"  # DreamBooth rows (utils/sd/dreambooth.py): True for a class image
# diffusers' examples know these Hub datasets' column names.
DATASET_NAME_MAPPING = {"lambdalabs/naruto-blip-captions": ("image", "text"), "reach-vb/pokemon-blip-captions": ("image", "text")}


def check_data_source_args(args) -> None:
    if args.dataset_name is None and args.train_data_dir is None and args.train_data_file is None \
            and args.instance_data_dir is None:
        raise UserError("Need either a dataset name or a training folder (--dataset_name, --train_data_dir, "
                        "--train_data_file, or DreamBooth's --instance_data_dir).")


def data_source(args) -> str:
    """The training data's name in messages: the dataset, folder or file the flags give."""
    return args.dataset_name or args.train_data_dir or args.train_data_file or args.instance_data_dir


def add_image_data_args(parser) -> None:
    """Dataset and transform flags of diffusers' train_text_to_image.py, same names and defaults."""
    add_data_source_args(parser, dataset_name_help="The name of the Dataset (from the HuggingFace hub) to train on, "
                                                   "or a local path.",
                         train_data_dir_help="A folder of training data: an imagefolder with metadata.jsonl, or "
                                             "images with same-named .txt captions.")
    parser.add_argument("--dataset_config_name", type=str, default=None,
                        help="The config of the Dataset, leave as None if there's only one config.")
    parser.add_argument("--train_data_file", type=str, default=None,
                        help="A CSV or JSONL file with an image path column (relative to the file) and a caption column.")
    add_image_caption_args(parser, caption_dropout_prob=0.0)
    parser.add_argument("--max_train_samples", type=int, default=None,
                        help="For debugging purposes or quicker training, truncate the number of training examples to this value if set.")
    parser.add_argument("--cache_dir", type=str, default=None,
                        help="The directory where the downloaded models and datasets will be stored.")
    parser.add_argument("--resolution", type=int, default=None,
                        help="The resolution for input images, all the images in the train/validation dataset will be "
                             "resized to this resolution (default: 512; 1024 for SDXL, as diffusers' SDXL scripts)")
    parser.add_argument("--center_crop", default=False, action="store_true",
                        help="Whether to center crop the input images to the resolution. If not set, the images will be randomly cropped.")
    parser.add_argument("--image_interpolation_mode", type=str, default="lanczos", choices=sorted(INTERPOLATION_MODES),
                        help="The image interpolation method to use for resizing images.")
    add_preflight_args(parser)
    add_caption_tag_args(parser)
    add_kohya_folder_args(parser)
    add_mask_args(parser)


@dataclass
class ImageTransform:
    """Resize the short side to `resolution`, crop a square, maybe flip, scale to [-1, 1].

    Returns a float tensor [3, resolution, resolution] and the crop's (top, left).
    """

    resolution: int
    interpolation: str = "lanczos"
    center_crop: bool = False
    random_flip: bool = False

    def target(self, target: tuple[int, int] | None) -> tuple[int, int]:
        """(width, height) of the crop: an aspect-ratio bucket, or the --resolution square."""
        return target or (self.resolution, self.resolution)

    def resize(self, image: Image.Image, target: tuple[int, int] | None = None) -> Image.Image:
        """The short side to `resolution` (the size the crop is drawn in); for a bucket, the smallest size that
        covers it at the image's aspect ratio."""
        size = cover_size(image.size, self.target(target))
        return image if size == image.size else image.resize(size, INTERPOLATION_MODES[self.interpolation])

    def draw(self, resized_size: tuple[int, int], rng: random.Random,
             target: tuple[int, int] | None = None) -> tuple[tuple[int, int], bool]:
        """The crop's (top, left) in an image of `resized_size`, then whether to flip: two draws from `rng`."""
        crop = crop_origin(resized_size, self.target(target), self.center_crop, rng)
        return crop, bool(self.random_flip and rng.random() < 0.5)

    def apply(self, resized: Image.Image, crop: tuple[int, int], flip: bool,
              target: tuple[int, int] | None = None) -> torch.Tensor:
        return pil_to_tensor(crop_and_flip(resized, crop, flip, self.target(target)))

    def crop_top_left(self, resized_size: tuple[int, int], crop: tuple[int, int], flip: bool,
                      target: tuple[int, int] | None = None) -> tuple[int, int]:
        """The crop's (top, left) in the image as the model sees it (flipped, when flipped): SDXL's crop
        coordinates, as diffusers' SDXL scripts compute them (they flip the resized image, then crop it)."""
        top, left = crop
        return (top, resized_size[0] - left - self.target(target)[0]) if flip else (top, left)

    def __call__(self, image: Image.Image, rng: random.Random) -> tuple[torch.Tensor, tuple[int, int]]:
        resized = self.resize(image)
        crop, flip = self.draw(resized.size, rng)
        return self.apply(resized, crop, flip), crop


def _safe_join(root: str, relative: str, where: str) -> str:
    """Resolve an image path written in a table file.

    The rule: an absolute path is taken as written (whoever wrote the table chose it); a relative one is
    read from the table's folder and may not climb out of it with `..` (that folder is a root nobody gave
    explicitly). Symlinks are followed wherever they point: placing one is a deliberate choice too."""
    if os.path.isabs(relative):
        return os.path.normpath(relative)
    root_abs = os.path.abspath(root)
    path = os.path.normpath(os.path.join(root_abs, relative))
    if os.path.commonpath([root_abs, path]) != root_abs:
        raise BadSampleError(f"{where}: image path '{relative}' points outside the dataset folder {root} (a relative "
                             "path may not leave the table's folder with '..'; write an absolute path to use a file "
                             "elsewhere)")
    return path


def _captioned_folder(root: str, caption_column: str, image_column: str, extension: str | None = None) -> dict:
    """Images with same-named caption files (.txt, else .caption), or kohya's `<repeats>_<name>` folders. `mask/`
    folders hold --masked_loss masks (utils/sd/masks.py), not training images."""
    if is_repeat_layout(root):
        images, captions = repeat_folder_rows(root, extension)
        return {image_column: images, caption_column: captions}
    images, captions = [], []
    for directory, _, files in sorted(os.walk(root)):
        if MASK_FOLDER in os.path.relpath(directory, root).split(os.sep):
            continue
        for name in sorted(files):
            if not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            path = os.path.join(directory, name)
            images.append(path)
            captions.append(caption_for(path, extension, None))
    return {image_column: images, caption_column: captions}


def _table_file(path: str, image_column: str) -> "datasets.Dataset":
    import datasets

    extension = os.path.splitext(path)[1].lower()
    if extension not in (".csv", ".jsonl", ".json"):
        raise UserError(f"--train_data_file {path}: expected a .csv or .jsonl file")
    # pyarrow keeps undecodable bytes in its string arrays and fails only when a row is read, naming nothing:
    # check the file's lines first (a table is small next to its images).
    bad = first_non_utf8_line(path) if extension == ".csv" else first_bad_json_line(path)
    if bad:
        rule = "UTF-8" if extension == ".csv" else "UTF-8, one JSON object per line"
        raise UserError(f"--train_data_file {bad}. Fix that line ({rule}).")
    with explained_table_errors([path]):
        dataset = datasets.load_dataset("csv" if extension == ".csv" else "json", data_files=path, split="train")
    if image_column not in dataset.column_names:
        raise UserError(f"--image_column '{image_column}' not in {path} columns {dataset.column_names}")
    root = os.path.dirname(os.path.abspath(path))
    return dataset.map(lambda row: {image_column: _safe_join(root, str(row[image_column]), path)})


def first_non_utf8_line(path: str) -> str | None:
    """`path:line: not valid UTF-8 (...)` for the first line of a text file that does not decode, else None."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as error:
                return f"{path}:{number}: not valid UTF-8 ({error})"
    return None


@contextlib.contextmanager
def explained_table_errors(files: list[str]):
    """Turn pyarrow's "Invalid encoding in string. in row 3" (no file named) into the file, line and problem."""
    try:
        yield
    except Exception as error:
        for path in files:
            if path.endswith((".jsonl", ".json")):
                bad = first_bad_json_line(path)
                if bad:
                    raise UserError(f"{bad}. Fix that line (one JSON object per line, UTF-8).") from error
        if type(error).__module__.split(".")[0] in ("pyarrow", "datasets") or isinstance(error, ValueError):
            raise UserError(f"Cannot read {', '.join(files)}: {type(error).__name__}: {error}") from error
        raise


def load_text_image_dataset(args, split: str = "train"):
    """The training rows as a `datasets.Dataset` with (undecoded) image and caption columns."""
    import datasets

    sources = [s for s in (args.dataset_name, args.train_data_dir, getattr(args, "train_data_file", None)) if s]
    if len(sources) != 1:
        raise UserError("Give exactly one of --dataset_name, --train_data_dir or --train_data_file "
                        f"(got {len(sources)}).")
    image_column, caption_column = args.image_column, args.caption_column
    if args.dataset_name:
        dataset = datasets.load_dataset(args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir, split=split)
    elif getattr(args, "train_data_file", None):
        if not os.path.isfile(args.train_data_file):
            raise UserFileNotFoundError(f"--train_data_file {args.train_data_file}: no such file")
        dataset = _table_file(args.train_data_file, image_column)
    else:
        root = args.train_data_dir
        if not os.path.isdir(root):
            raise UserFileNotFoundError(f"--train_data_dir {root}: no such directory")
        has_metadata = any(name in ("metadata.jsonl", "metadata.csv", "metadata.parquet")
                           for _, _, files in os.walk(root) for name in files)
        if has_metadata:
            with explained_table_errors([os.path.join(d, n) for d, _, files in os.walk(root) for n in files
                                         if n in ("metadata.jsonl", "metadata.csv", "metadata.parquet")]):
                dataset = datasets.load_dataset("imagefolder", data_dir=root, cache_dir=args.cache_dir, split=split)
        else:
            dataset = datasets.Dataset.from_dict(_captioned_folder(root, caption_column, image_column,
                                                                   args.caption_extension))
    where = data_source(args)
    if len(dataset) == 0:
        raise UserError(f"{where}: the dataset is empty (no images found for split '{split}')")
    for column, flag in ((image_column, "--image_column"), (caption_column, "--caption_column")):
        if column not in dataset.column_names:
            raise UserError(f"{flag} '{column}' not in dataset columns {dataset.column_names} ({where})")
    if isinstance(dataset.features.get(image_column), datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    warn_about_empty_captions(dataset, caption_column, image_column, where)
    return first_samples(dataset, args)


def first_samples(dataset, args):
    """--max_train_samples: that many rows, drawn with --seed (diffusers' scripts' rule); all without it."""
    if args.max_train_samples is None:
        return dataset
    return dataset.shuffle(seed=args.seed).select(range(min(args.max_train_samples, len(dataset))))


def warn_about_empty_captions(rows, caption_column: str, image_column: str, where: str) -> int:
    """Log how many captions are empty strings (they train as unconditional samples). Returns the count."""
    captions = rows[caption_column]
    empty = [index for index, caption in enumerate(captions) if isinstance(caption, str) and not caption.strip()]
    if empty:
        first = _row_name(rows[empty[0]][image_column]) or f"row {empty[0]}"
        logger.warning(f"{where}: {len(empty)} of {len(captions)} captions are empty (first: {first}); those samples "
                       "train unconditionally. Fill them in, or remove them, if that is not intended.")
    return len(empty)


def pick_caption(caption, rng: random.Random | None, where: str) -> str:
    """A caption string; from a list, a random one in training (rng given), the first in eval."""
    if isinstance(caption, (list, tuple, np.ndarray)):
        captions = [c for c in caption if isinstance(c, str)]
        if not captions:
            raise BadSampleError(f"{where}: empty caption list")
        return rng.choice(captions) if rng is not None else captions[0]
    if caption is None:
        raise BadSampleError(f"{where}: missing caption")
    if not isinstance(caption, str):
        raise BadSampleError(f"{where}: caption should contain either strings or lists of strings, got {type(caption).__name__}")
    return caption


@dataclass(frozen=True)
class CaptionTags:
    """kohya's caption options for tag-style captions ("1girl, red hair, smile"): split at `separator`, keep the
    first `keep_tokens` tags in place, shuffle the others (`shuffle`), drop each of them with probability
    `dropout_rate`; joined with `separator` and a space. Draws from the sample's rng only when enabled."""

    shuffle: bool = False
    keep_tokens: int = 0
    separator: str = ","
    dropout_rate: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.shuffle or self.dropout_rate > 0

    def apply(self, caption: str, rng: random.Random) -> str:
        tags = [tag.strip() for tag in caption.split(self.separator)]
        kept, rest = tags[:self.keep_tokens], tags[self.keep_tokens:]
        if self.dropout_rate > 0:
            rest = [tag for tag in rest if rng.random() >= self.dropout_rate]
        if self.shuffle:
            rng.shuffle(rest)
        return f"{self.separator} ".join(tag for tag in kept + rest if tag)


def add_caption_tag_args(parser) -> None:
    parser.add_argument("--shuffle_caption", action="store_true",
                        help="Shuffle the tags of each caption (split at --caption_separator) every epoch (kohya).")
    parser.add_argument("--keep_tokens", type=int, default=0,
                        help="Keep the first N tags of each caption in place (not shuffled, never dropped).")
    parser.add_argument("--caption_separator", type=str, default=",", help="What separates the tags of a caption.")
    parser.add_argument("--caption_tag_dropout_rate", type=float, default=0.0,
                        help="Drop each tag (after --keep_tokens) with this probability every epoch (kohya).")


def caption_tags(args) -> CaptionTags:
    tags = CaptionTags(args.shuffle_caption, args.keep_tokens, args.caption_separator, args.caption_tag_dropout_rate)
    if args.keep_tokens < 0 or not 0.0 <= args.caption_tag_dropout_rate < 1.0 or not args.caption_separator:
        raise UserError("--keep_tokens must be >= 0, --caption_tag_dropout_rate in [0, 1) and --caption_separator "
                        "not empty.")
    if tags.enabled and args.cache_text_embeddings:
        raise UserError("--shuffle_caption / --caption_tag_dropout_rate change each caption every epoch, but "
                        "--cache_text_embeddings (or --precompute) encodes every caption once. Drop "
                        "--cache_text_embeddings (--cache_latents still works), or the caption options.")
    return tags


@dataclass(frozen=True)
class Augmentation:
    """One sample's random choices for one epoch (see `TextImageDataset.plan`)."""

    caption: str
    crop: tuple[int, int]  # (top, left) in the short-side-resized image
    flip: bool


class TextImageDataset(SkipsBadSamples, EpochDataset):
    """Decoded, augmented, tokenized samples: {"pixel_values": [3, R, R] in [-1, 1], "input_ids": [L]}.

    With `skip_bad_samples`, an unreadable sample is replaced by the next good one and counted
    (`num_skipped`); otherwise it raises a BadSampleError naming the file.
    """

    first_caption = False  # of a caption list, always the first (held-out data) instead of a random one
    buckets = None  # --enable_bucket: each sample's (width, height) bucket

    def target(self, index: int) -> tuple[int, int] | None:
        return tuple(self.buckets[index]) if self.buckets is not None else None

    def interchangeable(self, index: int, other: int) -> bool:  # a skipped sample's stand-in: the same bucket
        return self.buckets is None or tuple(self.buckets[index]) == tuple(self.buckets[other])

    def __init__(self, rows, image_column, caption_column, transform: ImageTransform, tokenize,
                 seed=None, caption_dropout_prob=0.0, skip_bad_samples=False, source_name="dataset",
                 tags: CaptionTags | None = None, masked: bool = False, attention_mask=None, conditioning=None):
        self.rows, self.image_column, self.caption_column = rows, image_column, caption_column
        self.tags = tags or CaptionTags()
        self.transform, self.tokenize = transform, tokenize
        self.seed, self.caption_dropout_prob, self.skip_bad_samples = seed, caption_dropout_prob, skip_bad_samples
        self.source_name, self.epoch, self.num_skipped, self.masked = source_name, 0, 0, masked
        self.attention_mask = attention_mask  # caption -> its tokens' attention mask (--text_encoder_use_attention_mask)
        self.conditioning = conditioning  # ControlNet: a utils.sd.controlnet.ConditioningImages
        if conditioning is not None and conditioning.column not in getattr(rows, "column_names", ()):
            raise UserError(f"--conditioning_image_column '{conditioning.column}' not in {source_name} columns "
                            f"{getattr(rows, 'column_names', [])}")
        # DreamBooth's class rows (prior preservation): the train loader pairs them with instance rows.
        self.prior = list(rows[PRIOR_COLUMN]) if PRIOR_COLUMN in getattr(rows, "column_names", ()) else None

    def __len__(self) -> int:
        return len(self.rows)

    def where(self, index: int, row=None) -> str:
        image_name = _row_name((self.rows[index] if row is None else row)[self.image_column])
        return f"{self.source_name} row {index}" + (f" ({image_name})" if image_name else "")

    def plan(self, index: int, epoch: int, resized_size: tuple[int, int], row=None) -> Augmentation:
        """Every random choice for sample `index` in `epoch`, made here only: the caption (one of several),
        its dropout, the crop in the resized image, the flip. `__getitem__` and the latent cache
        (`utils.sd.cache`) both call this, so a cached run cannot drift from the image path.
        `row`: `self.rows[index]` when the caller has it (a Hub dataset decodes a row on every access)."""
        row = self.rows[index] if row is None else row
        rng = sample_rng(self.seed, epoch, index)
        caption = pick_caption(row[self.caption_column], None if self.first_caption else rng, self.where(index, row))
        if self.tags.enabled:
            caption = self.tags.apply(caption, rng)
        if self.caption_dropout_prob > 0 and rng.random() < self.caption_dropout_prob:
            caption = ""
        crop, flip = self.transform.draw(resized_size, rng, self.target(index))
        return Augmentation(caption, crop, flip)

    def load(self, index: int, epoch: int) -> dict:
        row = self.rows[index]
        image = load_image(row[self.image_column], name=_row_name(row[self.image_column]) or self.where(index, row))
        target = self.target(index)
        resized = self.transform.resize(image, target)
        plan = self.plan(index, epoch, resized.size, row)
        return {"pixel_values": self.transform.apply(resized, plan.crop, plan.flip, target),
                "input_ids": self.tokenize(plan.caption), "caption": plan.caption, **self.mask_of(plan.caption),
                "original_size": torch.tensor([image.height, image.width]),  # SDXL's time ids (h, w)
                "crop_top_left": torch.tensor(self.transform.crop_top_left(resized.size, plan.crop, plan.flip, target)),
                "name": self.file_name(index, row), **self.mask_item(index, resized.size, plan.crop, plan.flip, row),
                **self.conditioning_item(index, resized.size, plan.crop, plan.flip, row)}

    def mask_of(self, caption: str) -> dict:
        """{"attention_mask": ...} with --text_encoder_use_attention_mask, else {}."""
        return {"attention_mask": self.attention_mask(caption)} if self.attention_mask is not None else {}

    def mask_item(self, index: int, resized_size, crop, flip: bool, row=None) -> dict:
        """--masked_loss: {"mask": [1, H, W]} through the same resize, crop and flip as the image; else {}."""
        if not self.masked:
            return {}
        row = self.rows[index] if row is None else row
        target = self.transform.target(self.target(index))
        if self.prior is not None and self.prior[index] and not has_mask(row[self.image_column]):
            return {"mask": torch.ones(1, target[1], target[0])}  # a class image without a mask: all of it trains
        mask = load_mask(row[self.image_column], self.where(index, row))
        return {"mask": transform_mask(mask, resized_size, crop, flip, target)}

    def conditioning_item(self, index: int, resized_size, crop, flip: bool, row=None) -> dict:
        """ControlNet: {"conditioning_pixel_values": [C, H, W] in [0, 1]} through the same resize, crop and flip as
        the image; else {}."""
        if self.conditioning is None:
            return {}
        row = self.rows[index] if row is None else row
        value = row[self.conditioning.column]
        name = _row_name(value) or f"{self.where(index, row)}, column {self.conditioning.column}"
        return {"conditioning_pixel_values": self.conditioning(value, name, resized_size, crop, flip,
                                                               self.transform.target(self.target(index)))}

    def file_name(self, index: int, row=None) -> str:
        """The image's file name (--debug_loss logs under it), or "row N"."""
        name = _row_name((self.rows[index] if row is None else row)[self.image_column])
        return os.path.basename(name) if name else f"row {index}"

    def __getitem__(self, index: int) -> dict:
        return self.first_good(index, lambda current: self.load(current, self.epoch))


def _row_name(value) -> str | None:
    if isinstance(value, dict):
        return value.get("path")
    return value if isinstance(value, str) else None


def collate_text_image(examples: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]).contiguous(memory_format=torch.contiguous_format),
        "input_ids": torch.stack([e["input_ids"] for e in examples]),
        "original_size": torch.stack([e["original_size"] for e in examples]),
        "crop_top_left": torch.stack([e["crop_top_left"] for e in examples]),
        "captions": [e["caption"] for e in examples],
        "names": [e["name"] for e in examples],
        **({"mask": torch.stack([e["mask"] for e in examples])} if "mask" in examples[0] else {}),
        **({"conditioning_pixel_values": torch.stack([e["conditioning_pixel_values"] for e in examples])}
           if "conditioning_pixel_values" in examples[0] else {}),
        **({"attention_mask": torch.stack([e["attention_mask"] for e in examples])}
           if "attention_mask" in examples[0] else {}),
    }


def write_metadata_jsonl(folder: str, records: list[dict]) -> str:
    """Write an imagefolder `metadata.jsonl` (records need "file_name")."""
    path = os.path.join(folder, "metadata.jsonl")
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def usable_rows(args, rows):
    """The pre-flight scan of the rows (utils.preflight): image headers decode with a sane size, captions are text.
    With --skip_bad_samples the bad rows are left out, otherwise the run stops listing them."""
    from utils.preflight import caption_problem, image_header, preflight

    source = data_source(args)
    images, captions = rows[args.image_column], rows[args.caption_column]

    def check(index):
        name = _row_name(images[index]) or (images[index] if isinstance(images[index], str) else None)
        _, problem = image_header(images[index], name)
        if problem:
            yield name or f"{source} row {index}", problem
        problem = caption_problem(captions[index])
        if problem:
            yield f"{source} row {index}" + (f" ({name})" if name else ""), problem

    bad = preflight(args, len(rows), check, source)
    return rows.select([index for index in range(len(rows)) if index not in bad]) if bad else rows


def captions_for_new_tokenizer(args, rows):
    """The captions a from-scratch tokenizer learns its vocabulary from (None when a tokenizer is loaded)."""
    if not args.model_preset or args.text_encoder_name_or_path:
        return None
    return [c if isinstance(c, str) else " ".join(map(str, c)) for c in rows[args.caption_column] if c is not None]


@dataclass(frozen=True)
class TextImageSettings:
    """How rows become training samples: train_text_to_image.py's data flags, typed (`from_args`)."""

    image_column: str
    caption_column: str
    resolution: int
    image_interpolation_mode: str
    center_crop: bool
    random_flip: bool
    seed: int | None
    caption_dropout_prob: float
    skip_bad_samples: bool
    masked_loss: bool
    tokenizer_max_length: int | None  # None: each tokenizer's own (CLIP: 77)
    max_sequence_length: int | None  # a T5 (non-CLIP) tokenizer's length (SD3, FLUX: --max_sequence_length)
    system_prompt: str | None  # Lumina-2: tokenized as "<system prompt> <Prompt Start> <caption>" (Lumina2Pipeline's)
    text_encoder_use_attention_mask: bool  # samples carry the tokenizer's attention mask for the text encoder
    source_name: str  # the data's name in messages
    tags: CaptionTags  # --shuffle_caption, --keep_tokens, ...
    conditioning: object = None  # ControlNet: the conditioning images (utils.sd.controlnet.ConditioningImages)

    @classmethod
    def from_args(cls, args, conditioning=None) -> "TextImageSettings":
        """The flags of the same names; the source named by data_source(), the caption options by caption_tags();
        `conditioning`: the family's (ControlNet)."""
        plain = {f.name: getattr(args, f.name) for f in fields(cls)
                 if f.name not in ("source_name", "tags", "conditioning")}
        return cls(**plain, source_name=data_source(args), tags=caption_tags(args), conditioning=conditioning)


def build_text_image_dataset(settings: TextImageSettings, rows, tokenizer) -> TextImageDataset:
    """`TextImageDataset` of the rows as the settings say. `tokenizer`: one, or several (SDXL's two, SD3's three:
    then input_ids are [n, L], a row per tokenizer, right-padded with 0 to the longest; the family cuts each row to
    its tokenizer's length)."""
    tokenizers = tokenizer if isinstance(tokenizer, (list, tuple)) else [tokenizer]

    def tokenize(caption: str) -> torch.Tensor:
        return tokenized(caption, "input_ids")

    @functools.lru_cache(maxsize=1 << 16)  # captions repeat every epoch: tokenize each once (the tensors are only read)
    def tokenized(caption: str, key: str) -> torch.Tensor:
        """The caption's `key` (input_ids or attention_mask) [L], or [2, L] for SDXL's two tokenizers."""
        text = caption if settings.system_prompt is None else f"{settings.system_prompt} <Prompt Start> {caption}"
        rows = [t(text, max_length=token_length(t), padding="max_length", truncation=True,
                  return_tensors="pt")[key][0] for t in tokenizers]
        longest = max(len(row) for row in rows)
        rows = [torch.nn.functional.pad(row, (0, longest - len(row))) for row in rows]
        return rows[0] if len(rows) == 1 else torch.stack(rows)

    def token_length(tokenizer) -> int:
        if settings.max_sequence_length is not None and "CLIP" not in type(tokenizer).__name__:
            return settings.max_sequence_length  # T5's prompt length
        return settings.tokenizer_max_length or tokenizer.model_max_length

    transform = ImageTransform(settings.resolution, settings.image_interpolation_mode, settings.center_crop,
                               settings.random_flip)
    dataset = TextImageDataset(rows, settings.image_column, settings.caption_column, transform, tokenize,
                               seed=settings.seed, caption_dropout_prob=settings.caption_dropout_prob,
                               skip_bad_samples=settings.skip_bad_samples, source_name=settings.source_name,
                               tags=settings.tags, masked=settings.masked_loss,
                               attention_mask=(lambda caption: tokenized(caption, "attention_mask"))
                               if settings.text_encoder_use_attention_mask else None,
                               conditioning=settings.conditioning)
    if settings.masked_loss:  # (class images of prior preservation may go without: they train whole)
        check_masks(rows, settings.image_column, settings.source_name, dataset.prior)
    return dataset


def build_held_out_dataset(settings: TextImageSettings, rows, tokenizer) -> TextImageDataset | None:
    """The held-out samples as the model sees them, never augmented: centre crop, no flip, the first caption of a
    list, no caption dropout or tag options (None without held-out rows)."""
    if rows is None:
        return None
    plain = dataclasses.replace(settings, center_crop=True, random_flip=False, caption_dropout_prob=0.0,
                                tags=CaptionTags(), source_name="held-out data (--validation_split)")
    dataset = build_text_image_dataset(plain, rows, tokenizer)
    dataset.first_caption = True
    return dataset


def split_held_out(args, rows):
    """(training rows, held-out rows or None) for --validation_split: a seeded fraction of `rows` (removed from
    training), or every usable row of a held-out folder / CSV / JSONL file (same layouts as the training data)."""
    split = getattr(args, "validation_split", None)
    if split is None:
        return rows, None
    if isinstance(split, float):
        train, held_out = split_train_validation(len(rows), split, args.seed)
        return rows.select(train), rows.select(held_out)
    if not os.path.exists(split):
        raise UserFileNotFoundError(f"--validation_split {split}: no such folder or file (give a fraction such as "
                                    "0.05, or held-out data laid out like --train_data_dir / --train_data_file)")
    source = argparse.Namespace(**{**vars(args), "dataset_name": None, "max_train_samples": None,
                                   "train_data_dir": split if os.path.isdir(split) else None,
                                   "train_data_file": None if os.path.isdir(split) else split})
    return rows, usable_rows(source, load_text_image_dataset(source))


def assign_dataset_buckets(args, dataset: TextImageDataset, token_pixels: int | None = None) -> dict | None:
    """--enable_bucket: give every sample its bucket (from the image headers, no decode); returns the summary
    (images per bucket, the ones far outside; a transformer's tokens per bucket, `token_pixels` px a token) for the
    log, run_info.json and <output_dir>/buckets.json."""
    if not getattr(args, "enable_bucket", False):
        return None
    from utils.preflight import image_header

    images, sizes, names = dataset.rows[dataset.image_column], [], []
    for index, image in enumerate(images):
        size, problem = image_header(image, dataset.where(index))
        sizes.append(size or (args.resolution, args.resolution))  # an unreadable one is skipped when drawn
        names.append(dataset.file_name(index))
    dataset.buckets = assign_buckets(sizes, args)
    summary = bucket_summary(sizes, dataset.buckets, names, token_pixels, args.resolution)
    log_bucket_summary(summary)
    return summary
