"""Aspect-ratio bucketing (kohya-ss/sd-scripts' `--enable_bucket` flags and meanings).

Buckets are (width, height) pairs of about `--resolution`² pixels, each side a multiple of `--bucket_reso_steps`
between `--min_bucket_reso` and `--max_bucket_reso` (kohya's `make_bucket_resolutions`: for every width w in
steps, h = the largest multiple of the step with w * h <= resolution², plus the square). Each image goes to the
bucket nearest its aspect ratio (by |log(ar_image / ar_bucket)|), is resized to cover it and cropped (centre or
random); `--bucket_no_upscale` gives an image smaller than the budget a bucket of its own size rounded down to the
step instead. Assignment reads image headers only (no decode), once per run.

`BucketBatchSampler` makes every batch from one bucket, in an order that is a function of (seed, epoch) only (the
epoch is read from the dataset at iteration, as `utils.data.epoch_batches` sets it), so a resume replays the same
batches. It declares `batch_size = None` so that accelerate's `BatchSamplerShard` hands whole batches to the
processes and evens the epoch out with whole batches, never mixing buckets.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import random

from utils.errors import UserError

logger = logging.getLogger(__name__)


def add_bucket_args(parser) -> None:
    group = parser.add_argument_group("aspect-ratio buckets (kohya's flags)")
    group.add_argument("--enable_bucket", action="store_true",
                       help="Train on images at their own aspect ratio: buckets of about --resolution² pixels, every "
                            "batch from one bucket, instead of square crops.")
    group.add_argument("--min_bucket_reso", type=int, default=256, help="The smallest bucket side (pixels).")
    group.add_argument("--max_bucket_reso", type=int, default=1024, help="The largest bucket side (pixels).")
    group.add_argument("--bucket_reso_steps", type=int, default=64,
                       help="Bucket sides are multiples of this (it must be a multiple of the model's downsampling).")
    group.add_argument("--bucket_no_upscale", action="store_true",
                       help="Images smaller than the --resolution² budget get a bucket of their own size (rounded "
                            "down to the step) instead of being upscaled.")


def check_bucket_combinations(args) -> None:
    """Before anything runs: what bucketing does not go with."""
    if args.enable_bucket and (args.train_vae or args.train_batch_size == "auto"):
        raise UserError("--enable_bucket trains on batches of different shapes: it does not go with --train_vae or "
                        "--train_batch_size auto (give a number).")


def check_bucket_args(args, multiple: int) -> None:
    """The flags make sense together, and bucket sides stay multiples of the model's `multiple`."""
    if not args.enable_bucket:
        return
    if args.bucket_reso_steps <= 0 or args.bucket_reso_steps % multiple:
        raise UserError(f"--bucket_reso_steps {args.bucket_reso_steps} must be a positive multiple of {multiple} "
                        "(the VAE and UNet downsampling of this model).")
    if not args.bucket_reso_steps <= args.min_bucket_reso <= args.resolution <= args.max_bucket_reso:
        raise UserError(f"--enable_bucket needs --bucket_reso_steps <= --min_bucket_reso <= --resolution <= "
                        f"--max_bucket_reso (got {args.bucket_reso_steps}, {args.min_bucket_reso}, {args.resolution}, "
                        f"{args.max_bucket_reso}).")


def make_buckets(resolution: int, min_reso: int, max_reso: int, step: int) -> list[tuple[int, int]]:
    """The (width, height) buckets, sorted (kohya's `make_bucket_resolutions`)."""
    max_area = resolution * resolution
    square = int(math.sqrt(max_area) // step) * step
    buckets = {(square, square)}
    width = min_reso
    while width <= max_reso:
        height = min(max_reso, int((max_area // width) // step) * step)
        if height >= min_reso:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    return sorted(buckets)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the image's (ties: the first, buckets being sorted)."""
    log_ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - log_ratio))


def assign_buckets(sizes: list[tuple[int, int]], args) -> list[tuple[int, int]]:
    """Each image's (width, height) bucket from its header size (width, height)."""
    buckets = make_buckets(args.resolution, args.min_bucket_reso, args.max_bucket_reso, args.bucket_reso_steps)
    step, budget = args.bucket_reso_steps, args.resolution * args.resolution
    assigned = []
    for width, height in sizes:
        if args.bucket_no_upscale and width * height <= budget:
            assigned.append((max(step, width // step * step), max(step, height // step * step)))
        else:
            assigned.append(nearest_bucket((width, height), buckets))
    return assigned


def bucket_summary(sizes: list[tuple[int, int]], assigned: list[tuple[int, int]], names: list[str],
                   token_pixels: int | None = None, resolution: int | None = None) -> dict:
    """Images per bucket and the images far outside the bucket range (aspect ratio off by more than 1.5x from their
    bucket's, or upscaled more than 2x): for the log line, run_info.json and buckets.json. For a transformer
    (`token_pixels`: the image pixels one token covers along a side, VAE x patch (x FLUX's 2x2 packing)), also the
    tokens of each bucket's images and the budget every bucket keeps within, (--resolution / token_pixels)²: a
    bucket's area is at most --resolution²."""
    counts = collections.Counter(f"{w}x{h}" for w, h in assigned)
    outliers = []
    for (width, height), (bw, bh), name in zip(sizes, assigned, names):
        ratio_off = abs(math.log((width / height) / (bw / bh)))
        upscale = max(bw / width, bh / height)
        if ratio_off > math.log(1.5) or upscale > 2.0:
            outliers.append({"image": name, "size": f"{width}x{height}", "bucket": f"{bw}x{bh}",
                             "upscale": round(upscale, 2)})
    summary = {"buckets": dict(sorted(counts.items(), key=lambda item: (-item[1], item[0]))), "far_outside": outliers}
    if token_pixels:
        summary["tokens_per_bucket"] = {f"{w}x{h}": (w // token_pixels) * (h // token_pixels)
                                        for w, h in sorted(set(assigned))}
        summary["token_budget"] = resolution * resolution // (token_pixels * token_pixels)
        summary["pixels_per_token"] = token_pixels
    return summary


def log_bucket_summary(summary: dict) -> None:
    listing = ", ".join(f"{bucket}: {count}" for bucket, count in summary["buckets"].items())
    logger.info(f"Aspect-ratio buckets (width x height: images): {listing}")
    if "tokens_per_bucket" in summary:
        tokens = ", ".join(f"{bucket}: {count}" for bucket, count in summary["tokens_per_bucket"].items())
        logger.info(f"Tokens per image ({summary['pixels_per_token']}x{summary['pixels_per_token']} px each): {tokens} "
                    f"(budget {summary['token_budget']}: --resolution² pixels)")
    if summary["far_outside"]:
        first = summary["far_outside"][:3]
        logger.warning(f"{len(summary['far_outside'])} images are far outside the bucket range (aspect ratio more than "
                       f"1.5x off their bucket's, or upscaled more than 2x), e.g. "
                       + "; ".join(f"{o['image']} {o['size']} -> {o['bucket']}" for o in first)
                       + ". Widen --min_bucket_reso/--max_bucket_reso, or crop them beforehand.")


def record_buckets(record, summary: dict, accelerator, output_dir: str, names: list[str], buckets: list) -> None:
    """Images per bucket into the run record (run_info.json), every image's bucket into <output_dir>/buckets.json."""
    from utils.atomic import write_json_atomic

    record.note("buckets", {"images_per_bucket": summary["buckets"], "far_outside": len(summary["far_outside"]),
                            **{key: summary[key] for key in ("tokens_per_bucket", "token_budget") if key in summary}})
    if accelerator.is_main_process:
        write_json_atomic(os.path.join(output_dir, "buckets.json"),
                          dict(summary, assignment={name: f"{w}x{h}" for name, (w, h) in zip(names, buckets)}))


class BucketBatchSampler:
    """Batches of `batch_size` indices from one bucket each (a bucket's last batch may be smaller), shuffled within
    and across buckets by (seed, epoch). `bucket_of[i]`: sample i's bucket."""

    batch_size = None  # accelerate: batches are units (see the module docstring)
    drop_last = False

    def __init__(self, bucket_of: list, batch_size: int, seed: int | None, dataset=None, shuffle: bool = True):
        self.bucket_of, self.per_batch, self.seed = list(bucket_of), int(batch_size), seed or 0
        self.dataset, self.shuffle, self._epoch = dataset, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    @property
    def epoch(self) -> int:
        return int(getattr(self.dataset, "epoch", self._epoch)) if self.dataset is not None else self._epoch

    def batches(self, epoch: int) -> list[list[int]]:
        members = collections.defaultdict(list)
        for index, bucket in enumerate(self.bucket_of):
            members[tuple(bucket)].append(index)
        rng = random.Random(hash((self.seed, epoch, -7)) & 0xFFFFFFFFFFFF)  # ints only: the same in every process
        batches = []
        for bucket in sorted(members):
            indices = members[bucket]
            if self.shuffle:
                rng.shuffle(indices)
            batches += [indices[start:start + self.per_batch] for start in range(0, len(indices), self.per_batch)]
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def __iter__(self):
        return iter(self.batches(self.epoch))

    def __len__(self) -> int:
        counts = collections.Counter(tuple(b) for b in self.bucket_of)
        return sum(math.ceil(count / self.per_batch) for count in counts.values())
