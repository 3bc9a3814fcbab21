"""kohya-ss/sd-scripts' DreamBooth folder layout, for --train_data_dir and --reg_data_dir: a folder of
`<repeats>_<name>` subfolders (`10_sks dog/`): every image in one is seen `repeats` times an epoch, captioned by
its own caption file (`.txt`, else `.caption`; --caption_extension picks one) or, without one, by the folder's
class tokens ("sks dog"), as kohya's train_util reads them. Subfolders not named that way are left out, as kohya
does, with a warning naming them."""

from __future__ import annotations

import logging
import os
import re

from utils.data import read_caption_file
from utils.images import IMAGE_EXTENSIONS

logger = logging.getLogger(__name__)
REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")
CAPTION_EXTENSIONS = (".txt", ".caption")


def add_kohya_folder_args(parser) -> None:
    parser.add_argument("--caption_extension", type=str, default=None,
                        help="Caption files' extension in a folder of images (kohya's flag; default: .txt, else "
                             ".caption).")


def image_files(directory: str) -> list[str]:
    """The image files directly in `directory`, sorted."""
    return sorted(os.path.join(directory, n) for n in os.listdir(directory) if n.lower().endswith(IMAGE_EXTENSIONS))


def is_repeat_layout(root: str) -> bool:
    """True for kohya's layout: no images at the top, at least one `<repeats>_<name>` subfolder."""
    entries = os.listdir(root)
    return not image_files(root) and any(REPEAT_FOLDER.match(n) and os.path.isdir(os.path.join(root, n))
                                     for n in entries)


def caption_for(image_path: str, extension: str | None, default: str | None) -> str | None:
    """The image's caption file (`extension`, or .txt then .caption), else `default`."""
    stem = os.path.splitext(image_path)[0]
    for candidate in ([extension] if extension else CAPTION_EXTENSIONS):
        if os.path.isfile(stem + candidate):
            return read_caption_file(stem + candidate)
    return default


def repeat_folder_rows(root: str, extension: str | None = None) -> tuple[list[str], list[str | None]]:
    """(image paths, captions) of a kohya-layout folder, each image `repeats` times (folder by folder, in name
    order), so an epoch sees it that often and the sample indices stay fixed (exact resume)."""
    images, captions, skipped = [], [], []
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        if not os.path.isdir(folder):
            continue
        match = REPEAT_FOLDER.match(name)
        if match is None:
            skipped += [name] if name != "mask" else []  # (--masked_loss masks)
            continue
        repeats, tokens = int(match.group(1)), match.group(2)
        for path in image_files(folder):
            caption = caption_for(path, extension, tokens)
            images += [path] * repeats
            captions += [caption] * repeats
    if skipped:
        logger.warning(f"{root}: left out {len(skipped)} subfolder(s) not named <repeats>_<name> (kohya's layout): "
                       f"{', '.join(skipped[:5])}" + (" ..." if len(skipped) > 5 else ""))
    return images, captions
