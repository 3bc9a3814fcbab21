"""The pre-flight scan: every sample's files checked before the first step, not when its batch is drawn.

Without it a bad file surfaces only when its batch comes up, possibly hours in, and again after a resume.
The scan reads image *headers* only (PIL opens lazily: format, mode and size, no pixel decode), so it
costs milliseconds per thousand files (`benchmarks/bench_preflight.py` measures it; docs/PERFORMANCE.md
has the number). What it checks: the file exists and is not empty, the header decodes, the size is sane
(>= 1 px, <= utils.images.MAX_IMAGE_PIXELS), a mask has its image's size, a caption is a string (or a
list of strings). A truncated file whose header is intact is still caught when it is decoded
(BadSampleError naming the file, or skipped and counted with --skip_bad_samples).

Every script: problems are listed (the first 20, with the total) in one UserError naming the fix;
with --skip_bad_samples they are logged and the samples are left out of the run; --skip_preflight
turns the scan off.
"""

from __future__ import annotations

import io
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
from PIL import Image

from utils.errors import UserError

logger = logging.getLogger(__name__)

MAX_LISTED = 20


def add_preflight_args(parser) -> None:
    parser.add_argument("--skip_preflight", action="store_true",
                        help="Do not scan every sample's files before training (image headers, sizes, captions).")
    parser.add_argument("--skip_bad_samples", action="store_true",
                        help="Leave out (and count) unreadable samples instead of stopping with an error.")


@dataclass
class Problem:
    index: int
    where: str
    message: str


def image_header(source, where: str) -> tuple[tuple[int, int] | None, str | None]:
    """(width, height) from the image header of a path / {"path", "bytes"} dict / bytes / PIL image, or
    (None, problem)."""
    from utils.images import MAX_IMAGE_PIXELS

    if isinstance(source, dict):
        source = source.get("bytes") or source.get("path")
    if isinstance(source, Image.Image):
        return source.size, None
    try:
        if isinstance(source, (bytes, bytearray)):
            image = Image.open(io.BytesIO(source))
        elif isinstance(source, str):
            if not os.path.isfile(source):
                return None, "image file not found"
            if os.path.getsize(source) == 0:
                return None, "image file is empty (0 bytes)"
            image = Image.open(source)
        else:
            return None, f"not an image (a {type(source).__name__})"
        with image:
            width, height = image.size
    except Exception as error:  # PIL raises UnidentifiedImageError, SyntaxError, struct.error... on bad headers
        return None, f"cannot read image header ({type(error).__name__}: {error})"
    if width < 1 or height < 1:
        return None, f"image is {width}x{height}"
    if width * height > MAX_IMAGE_PIXELS:
        return None, f"image is {width}x{height}, larger than the {MAX_IMAGE_PIXELS}-pixel limit"
    return (width, height), None


def caption_problem(caption) -> str | None:
    if caption is None:
        return "missing caption"
    if isinstance(caption, str):
        return None
    if isinstance(caption, (list, tuple, np.ndarray)):
        if any(isinstance(c, str) for c in caption):
            return None
        return "caption list holds no string"
    return f"caption is a {type(caption).__name__} ({caption!r}), not text; quote it in the metadata file"


def scan(count: int, check: Callable[[int], Iterable[tuple[str, str]]]) -> list[Problem]:
    """Run `check(index)` (yielding (where, problem) pairs) over every sample."""
    return [Problem(index, where, message) for index in range(count) for where, message in check(index)]


def resolve(problems: list[Problem], total: int, what: str, skip_bad_samples: bool | None, seconds: float) -> set[int]:
    """Refuse the run over `problems` (one block), or with --skip_bad_samples return the indices to leave out."""
    if not problems:
        logger.info(f"Pre-flight: {total} samples of {what} checked in {seconds:.2f} s, all usable")
        return set()
    listed = "\n".join(f"  - {p.where}: {p.message}" for p in problems[:MAX_LISTED])
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    bad = {p.index for p in problems}
    if skip_bad_samples:
        logger.warning(f"Pre-flight: leaving out {len(bad)} of {total} samples of {what} (--skip_bad_samples):\n"
                       f"{listed}{more}")
        if len(bad) == total:
            raise UserError(f"Pre-flight: every sample of {what} is unusable:\n{listed}{more}")
        return bad
    hint = "pass --skip_bad_samples to train without them" if skip_bad_samples is not None else \
        "remove them from the split"
    from utils.data import BadSampleError

    raise BadSampleError(
        f"Pre-flight check of {what}: {len(bad)} of {total} samples are unusable:\n{listed}{more}\n"
        f"Fix or remove these files, {hint}, or --skip_preflight to start without this check."
    )


def preflight(args, count: int, check: Callable[[int], Iterable[tuple[str, str]]], what: str) -> set[int]:
    """The scan with the script's flags: the indices to leave out (empty when all is well or the scan is off)."""
    if getattr(args, "skip_preflight", False):
        return set()
    start = time.perf_counter()
    problems = scan(count, check)
    return resolve(problems, count, what, getattr(args, "skip_bad_samples", None), time.perf_counter() - start)
