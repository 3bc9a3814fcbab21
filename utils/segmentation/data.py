"""Infrared small-target datasets (MSHNet's and BasicIRSTD's layouts), their augmentation, a synthetic generator.

Layouts of one data set folder `root` (`--dataset_dir`)::

    root/images/<name>.png     # infrared frame (grayscale or RGB; read as RGB)
    root/masks/<name>.png      # binary mask, target pixels > 127, or 0/1-valued with 1 = target
                               # (SIRST's <name>_pixels0.png also accepted)
    # the split lists, the first of these that exists:
    root/trainval.txt, root/test.txt                             # MSHNet / IRSTD-1k download layout
    root/img_idx/train_<dataset>.txt, root/img_idx/test_<dataset>.txt  # BasicIRSTD layout
    utils/segmentation/splits/<dataset>/{train,test}_<dataset>.txt     # the standard split, shipped

<dataset> is `--dataset_name`, or the folder's name. With BasicIRSTD's command line, `--dataset_dir`
is the folder above: `--dataset_dir datasets --dataset_name NUDT-SIRST` reads datasets/NUDT-SIRST/.
`--dataset_name SIRST3` trains on NUAA-SIRST + NUDT-SIRST + IRSTD-1K and scores each part's test
split separately: from a merged SIRST3/ folder (BasicIRSTD) or from the three folders side by side.

Every sample has a fixed shape so XLA compiles the step once: training samples are random
crops of `crop_size`, evaluation samples are resized to `base_size` x `base_size`.

`write_synthetic_irstd(root, ...)` writes a small data set in this layout (cluttered
thermal-like backgrounds, dim targets of 1-9 px, some frames without a target), for tests
and the CPU demo: `python -m utils.segmentation.data --output_dir data/synthetic_irstd`.
"""

from __future__ import annotations

import argparse
import logging
import os
import random

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from scipy import ndimage

from utils.data import BadSampleError, EpochDataset, SkipsBadSamples, sample_rng
from utils.errors import UserError, UserFileNotFoundError
from utils.images import decode_image_file

logger = logging.getLogger(__name__)

# ImageNet statistics, as the reference implementation normalizes its RGB-converted IR frames.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
SPLIT_FILES = {"trainval": "trainval.txt", "test": "test.txt"}
BASICIRSTD_SPLIT = {"trainval": "train", "test": "test"}
SHIPPED_SPLITS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "splits")
KNOWN_DATASETS = ("IRSTD-1K", "NUAA-SIRST", "NUDT-SIRST", "NUDT-SIRST-Sea", "SIRST3")
ALIASES = {"SIRST": "NUAA-SIRST", "NUAA": "NUAA-SIRST", "NUDT": "NUDT-SIRST"}
SIRST3_PARTS = ("NUAA-SIRST", "NUDT-SIRST", "IRSTD-1K")


def canonical_dataset_name(name: str) -> str:
    """IRSTD-1k -> IRSTD-1K, SIRST -> NUAA-SIRST, ...; unknown names are returned unchanged."""
    upper = name.upper()
    for known in KNOWN_DATASETS:
        if known.upper() == upper:
            return known
    return ALIASES.get(upper, name)


def split_file(root: str, split: str, dataset_name: str | None = None) -> tuple[str, str]:
    """(path of the list of `split`, layout): MSHNet's file, BasicIRSTD's img_idx/ file, or the shipped standard."""
    if split not in SPLIT_FILES:
        raise ValueError(f"split must be one of {sorted(SPLIT_FILES)}, got {split!r}")
    name = dataset_name or os.path.basename(os.path.normpath(root))
    canonical, kind = canonical_dataset_name(name), BASICIRSTD_SPLIT[split]
    candidates = [(os.path.join(root, SPLIT_FILES[split]), "mshnet"),
                  (os.path.join(root, "img_idx", f"{kind}_{name}.txt"), "basicirstd"),
                  (os.path.join(root, "img_idx", f"{kind}_{canonical}.txt"), "basicirstd"),
                  (os.path.join(SHIPPED_SPLITS, canonical, f"{kind}_{canonical}.txt"), "standard")]
    candidates = list(dict.fromkeys(candidates))
    for path, layout in candidates:
        if os.path.isfile(path):
            return path, layout
    tried = [path for path, layout in candidates if layout != "standard"]
    raise UserFileNotFoundError(
        f"{tried[0]} not found (no {split} list for --dataset_dir {root}; tried {', '.join(tried)}). "
        "Give images/, masks/ and trainval.txt + test.txt (the IRSTD-1k layout) or img_idx/train_<name>.txt + "
        f"test_<name>.txt (BasicIRSTD), or --dataset_name one of {', '.join(KNOWN_DATASETS)} to use its standard "
        "split; `python -m utils.segmentation.data --output_dir DIR` writes a synthetic data set."
    )


class SplitListing:
    """One split of a data set: sample names, the folder each sample lives in, the part (data set) it belongs to."""

    def __init__(self, names: list[str], roots: list[str], sources: list[str], files: list[str]):
        self.names, self.roots, self.sources, self.files = names, roots, sources, files

    def __len__(self) -> int:
        return len(self.names)

    def keep(self, indices) -> SplitListing:
        indices = list(indices)
        return SplitListing([self.names[i] for i in indices], [self.roots[i] for i in indices],
                            [self.sources[i] for i in indices], self.files)


def dataset_root(dataset_dir: str, dataset_name: str | None) -> str:
    """--dataset_dir itself, or --dataset_dir/--dataset_name when that folder exists (BasicIRSTD's command line)."""
    if dataset_name and os.path.isdir(os.path.join(dataset_dir, dataset_name)):
        return os.path.join(dataset_dir, dataset_name)
    return dataset_dir


def list_split(dataset_dir: str, split: str, dataset_name: str | None = None) -> SplitListing:
    """The samples of `split` in any supported layout (module docstring), SIRST3 included."""
    root = dataset_root(dataset_dir, dataset_name)
    name = dataset_name or os.path.basename(os.path.normpath(root))
    canonical = canonical_dataset_name(name)
    if canonical == "SIRST3" and not os.path.isdir(os.path.join(root, "images")):  # the three folders side by side
        parts = [(part, dataset_root(root, part)) for part in SIRST3_PARTS]
        missing = [folder for _, folder in parts if not os.path.isdir(os.path.join(folder, "images"))]
        if missing:
            raise UserFileNotFoundError(f"--dataset_name SIRST3: {', '.join(missing)} not found; give a merged "
                                        f"SIRST3 folder or {', '.join(SIRST3_PARTS)} side by side in {root}")
        listings = [list_split(folder, split, part) for part, folder in parts]
        return SplitListing(sum((l.names for l in listings), []), sum((l.roots for l in listings), []),
                            sum((l.sources for l in listings), []), sum((l.files for l in listings), []))
    path, _ = split_file(root, split, name)
    names = read_split_file(root, path)
    if canonical == "SIRST3":  # a merged folder: each name's part from the parts' standard lists
        part_of = {}
        for part in SIRST3_PARTS:
            kind = BASICIRSTD_SPLIT[split]
            for listed in read_split_file(root, os.path.join(SHIPPED_SPLITS, part, f"{kind}_{part}.txt")):
                part_of.setdefault(listed, part)
        sources = [part_of.get(sample, "SIRST3") for sample in names]
    else:
        sources = [canonical] * len(names)
    return SplitListing(names, [root] * len(names), sources, [path])


def read_split(root: str, split: str, dataset_name: str | None = None) -> list[str]:
    """Sample names of `split` in `root` (see `split_file` for where the list comes from)."""
    return read_split_file(root, split_file(root, split, dataset_name)[0])


def read_split_file(root: str, path: str) -> list[str]:
    """Names listed in `path` (blank lines skipped, a trailing .png tolerated), none leaving `root`."""
    with open(path, encoding="utf-8") as handle:
        names = [line.strip() for line in handle if line.strip()]
    names = [name[: -len(".png")] if name.endswith(".png") else name for name in names]
    if not names:
        raise UserError(f"{path} lists no samples")
    root_real = os.path.realpath(root)
    for line, name in enumerate(names, 1):  # (blank lines were dropped: the number counts listed names)
        for folder in ("images", "masks"):
            target = os.path.realpath(os.path.join(root_real, folder, name))
            if os.path.isabs(name) or os.path.commonpath([root_real, target]) != root_real:
                raise UserError(f"{path}, name {line} '{name}': points outside --dataset_dir {root}; list sample "
                                "names relative to images/ and masks/ (no '..', no absolute paths).")
    return names


def usable_samples(args, listing: SplitListing, what: str) -> SplitListing:
    """The pre-flight scan of a split (utils.preflight): image and mask exist, headers decode, sizes match."""
    from utils.preflight import image_header, preflight

    def check(index):
        root, name = listing.roots[index], listing.names[index]
        image_path = os.path.join(root, "images", f"{name}.png")
        image_size, problem = image_header(image_path, name)
        if problem:
            yield image_path, problem
        try:
            mask_path = _mask_path(root, name)
        except UserFileNotFoundError as error:
            yield f"sample '{name}'", str(error).split(": ", 1)[-1]
            return
        mask_size, problem = image_header(mask_path, name)
        if problem:
            yield mask_path, problem
        elif image_size is not None and image_size != mask_size:
            yield mask_path, f"mask is {mask_size[0]}x{mask_size[1]} but its image is {image_size[0]}x{image_size[1]}"

    bad = preflight(args, len(listing), check, what)
    return listing.keep(index for index in range(len(listing)) if index not in bad)


def _mask_path(root: str, name: str) -> str:
    for candidate in (f"{name}.png", f"{name}_pixels0.png"):
        path = os.path.join(root, "masks", candidate)
        if os.path.isfile(path):
            return path
    raise UserFileNotFoundError(f"no mask for sample '{name}': expected {os.path.join(root, 'masks', name + '.png')}")


def random_scale_crop(
    image: Image.Image, mask: Image.Image, base_size: int, crop_size: int, rng: random.Random
) -> tuple[Image.Image, Image.Image]:
    """The reference training augmentation.

    Random horizontal flip; rescale so the long side is uniform in [base_size/2, 2*base_size];
    zero-pad to at least crop_size; random crop_size x crop_size crop; Gaussian blur
    (radius in [0, 1)) with probability 1/2. The mask is resized with nearest neighbour.
    """
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    long_size = rng.randint(int(base_size * 0.5), int(base_size * 2.0))
    width, height = image.size
    if height > width:
        new_height, new_width = long_size, int(width * long_size / height + 0.5)
    else:
        new_width, new_height = long_size, int(height * long_size / width + 0.5)
    image = image.resize((new_width, new_height), Image.Resampling.BILINEAR)
    mask = mask.resize((new_width, new_height), Image.Resampling.NEAREST)
    pad_width, pad_height = max(crop_size - new_width, 0), max(crop_size - new_height, 0)
    if pad_width or pad_height:
        image = ImageOps.expand(image, border=(0, 0, pad_width, pad_height), fill=0)
        mask = ImageOps.expand(mask, border=(0, 0, pad_width, pad_height), fill=0)
    width, height = image.size
    left, top = rng.randint(0, width - crop_size), rng.randint(0, height - crop_size)
    box = (left, top, left + crop_size, top + crop_size)
    image, mask = image.crop(box), mask.crop(box)
    if rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(radius=rng.random()))
    return image, mask


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> normalized float tensor [3, H, W]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    mean = torch.tensor(IMAGE_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(3, 1, 1)
    return (tensor - mean) / std


def tensor_to_image(tensor: torch.Tensor) -> np.ndarray:
    """Inverse of `image_to_tensor`: [3, H, W] -> uint8 [H, W, 3] (for prediction grids)."""
    mean = torch.tensor(IMAGE_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(3, 1, 1)
    array = (tensor.detach().float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
    return (array * 255).round().astype(np.uint8)


def mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    """Mask image -> float tensor [1, H, W] in {0, 1} (pixels > 127 are target)."""
    return torch.from_numpy((np.asarray(mask.convert("L")) > 127).astype(np.float32))[None]


class DecodedFrames:
    """Decoded (image RGB, mask L) uint8 frames in one shared-memory buffer (`--cache_images`).

    Decoding a 512 px PNG is about half of a training sample's CPU time (measured by
    `python benchmarks/bench_data_loading.py`, numbers in docs/PERFORMANCE.md); a GPU at 1500
    images/s would need about twice the loader cores without the cache. One buffer in shared memory (not one array per
    frame) is shared by forked and spawned DataLoader workers alike, without copy-on-write
    copies. Frames may differ in size (SIRST); offsets and shapes index the buffer.
    """

    def __init__(self, pairs):
        """pairs: an iterable of (image, mask) PIL images; a generator keeps one decoded pair alive at a time."""
        arrays = []
        for image, mask in pairs:
            arrays += [np.asarray(image, dtype=np.uint8), np.asarray(mask, dtype=np.uint8)]
        self.shapes = [a.shape for a in arrays]
        self.offsets = np.cumsum([0] + [a.size for a in arrays]).tolist()
        self.buffer = torch.empty(self.offsets[-1], dtype=torch.uint8).share_memory_()
        flat = self.buffer.numpy()
        for array, start in zip(arrays, self.offsets):
            flat[start:start + array.size] = array.reshape(-1)

    def _array(self, k: int) -> np.ndarray:
        return self.buffer[self.offsets[k]:self.offsets[k + 1]].numpy().reshape(self.shapes[k])

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self._array(2 * index), self._array(2 * index + 1)

    @property
    def nbytes(self) -> int:
        return self.offsets[-1]


class IRSTDDataset(SkipsBadSamples, EpochDataset):
    """One split of an IRSTD-1k-layout data set.

    Items are dicts: `pixel_values` [3, S, S] normalized float, `mask` [1, S, S] in {0, 1},
    `index` (int, position in `names`), with S = crop_size when `train` else base_size.
    With `native_size=(H, W)` (evaluation at the frames' own resolution, as BasicIRSTD scores) frames are
    not resized but zero-padded at the bottom/right (after normalisation, as BasicIRSTD pads) to one fixed
    H x W for the whole set, and `size` holds the frame's (height, width) to crop predictions back to.

    Training augmentation draws from an RNG seeded by (augment_seed, epoch, index), not from a
    global RNG: a sample's crop does not depend on prefetching, worker count or process, so a
    resumed run sees exactly the crops the interrupted one would have. Call `set_epoch` each epoch.
    """

    def __init__(
        self, root: str, split: str, train: bool, base_size: int = 256, crop_size: int = 256, augment_seed: int = 0,
        cache_in_memory: bool = False, names: list[str] | None = None, skip_bad_samples: bool = False,
        listing: SplitListing | None = None, native_size: tuple[int, int] | None = None,
    ):
        self.skip_bad_samples, self.source_name = skip_bad_samples, root
        if listing is None:
            if not os.path.isdir(os.path.join(root, "images")):
                raise UserFileNotFoundError(f"{os.path.join(root, 'images')} not found (--dataset_dir {root})")
            names = read_split(root, split) if names is None else names
            listing = SplitListing(names, [root] * len(names), [os.path.basename(root)] * len(names), [])
        for folder in sorted(set(listing.roots)):
            if not os.path.isdir(os.path.join(folder, "images")):
                raise UserFileNotFoundError(f"{os.path.join(folder, 'images')} not found (--dataset_dir {root})")
        self.root = root
        self.names, self.roots, self.sources = listing.names, listing.roots, listing.sources
        self.native_size = native_size
        self.train = train
        self.base_size = base_size
        self.crop_size = crop_size
        self.augment_seed = augment_seed
        self.epoch = 0
        self.frames = None
        if cache_in_memory:  # each distinct frame once, however often the split lists it
            first = {}
            for index, key in enumerate(zip(self.roots, self.names)):
                first.setdefault(key, index)
            self._frame_of = {key: k for k, key in enumerate(first)}
            self.frames = DecodedFrames(self._decode(index) for index in first.values())

    def __len__(self) -> int:
        return len(self.names)

    def load(self, index: int) -> tuple[Image.Image, Image.Image]:
        if self.frames is not None:
            image, mask = self.frames[self._frame_of[self.roots[index], self.names[index]]]
            return Image.fromarray(image, "RGB"), Image.fromarray(mask, "L")
        return self._decode(index)

    def _decode(self, index: int) -> tuple[Image.Image, Image.Image]:
        name, root = self.names[index], self.roots[index]
        image_path = os.path.join(root, "images", f"{name}.png")
        if not os.path.isfile(image_path):
            raise UserFileNotFoundError(f"image for sample '{name}' not found: {image_path}")
        mask_path = _mask_path(root, name)
        image, mask = decode_image_file(image_path, "RGB"), decode_image_file(mask_path, "L")
        if image.size != mask.size:
            raise BadSampleError(f"sample '{name}': image is {image.size} but mask is {mask.size} (width, height)")
        if mask.getextrema()[1] == 1:  # a 0/1-valued mask: 1 is the target (the usual rule, > 127, would see none)
            if not getattr(IRSTDDataset, "_told_01", False):
                IRSTDDataset._told_01 = True
                logger.info(f"{mask_path}: a mask with values 0/1; such masks are read as 1 = target")
            mask = mask.point(lambda value: 255 if value else 0)
        return image, mask

    def __getitem__(self, index: int) -> dict:
        return self.first_good(index, self.load_item)

    def load_item(self, index: int) -> dict:
        image, mask = self.load(index)
        if self.train:
            image, mask = random_scale_crop(
                image, mask, self.base_size, self.crop_size, sample_rng(self.augment_seed, self.epoch, index)
            )
        elif self.native_size is not None:
            return self.padded_item(image, mask, index)
        else:
            image = image.resize((self.base_size, self.base_size), Image.Resampling.BILINEAR)
            mask = mask.resize((self.base_size, self.base_size), Image.Resampling.NEAREST)
        return {"pixel_values": image_to_tensor(image), "mask": mask_to_tensor(mask), "index": index}

    def padded_item(self, image: Image.Image, mask: Image.Image, index: int) -> dict:
        height, width = self.native_size
        if image.height > height or image.width > width:
            raise ValueError(f"sample '{self.names[index]}' is {image.width}x{image.height}, larger than the "
                             f"evaluation size {width}x{height}")
        pixels, target = image_to_tensor(image), mask_to_tensor(mask)
        pad = (0, width - image.width, 0, height - image.height)
        return {"pixel_values": torch.nn.functional.pad(pixels, pad), "mask": torch.nn.functional.pad(target, pad),
                "index": index, "size": torch.tensor([image.height, image.width])}


def native_eval_size(listing: SplitListing, multiple: int = 32) -> tuple[int, int]:
    """The largest frame height and width of a split (from the PNG headers), rounded up to `multiple`."""
    heights, widths = [], []
    for root, name in zip(listing.roots, listing.names):
        with Image.open(os.path.join(root, "images", f"{name}.png")) as image:
            widths.append(image.width)
            heights.append(image.height)
    return -(-max(heights) // multiple) * multiple, -(-max(widths) // multiple) * multiple


# ----------------------------------------------------------------------------------------------
# Synthetic infrared small-target frames.
# ----------------------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma=sigma, mode="wrap")
    return field / (field.std() + 1e-8)


def synthetic_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A thermal-like background in [0, 1]: sky gradient, clouds, ground clutter, bright blobs."""
    rows = np.linspace(0.0, 1.0, size)[:, None]
    sky = 0.35 + 0.15 * rows * rng.uniform(-1, 1)
    clouds = 0.08 * _smooth_noise(rng, size, size / 8) + 0.04 * _smooth_noise(rng, size, size / 32)
    background = sky + clouds
    if rng.random() < 0.5:  # a horizon with warmer, textured ground below it
        horizon = int(size * rng.uniform(0.55, 0.9))
        ground = 0.15 + 0.06 * _smooth_noise(rng, size, 2.0)
        background[horizon:] += ground[horizon:]
    for _ in range(rng.integers(0, 4)):  # large warm clutter (clouds' edges, buildings): not targets
        cy, cx = rng.uniform(0, size, 2)
        ry, rx = rng.uniform(6, max(8, size / 6), 2)
        yy, xx = np.mgrid[:size, :size]
        blob = np.exp(-0.5 * (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2))
        background += rng.uniform(0.05, 0.2) * blob
    return background


def add_target(
    rng: np.random.Generator, frame: np.ndarray, mask: np.ndarray, noise_sigma: float, snr_range=(3.0, 10.0)
) -> tuple[int, int]:
    """Add one small target (extent 1-9 px per axis, peak SNR in `snr_range` over `noise_sigma`) in place.

    The mask is the target's elliptical footprint (always at least its centre pixel).
    Returns the target's (height, width) extent in pixels.
    """
    size = frame.shape[0]
    extent_y, extent_x = rng.integers(1, 10, 2)
    cy = rng.uniform(8, size - 8)
    cx = rng.uniform(8, size - 8)
    yy, xx = np.mgrid[:size, :size]
    distance = np.sqrt(((yy + 0.5 - cy) / (extent_y / 2)) ** 2 + ((xx + 0.5 - cx) / (extent_x / 2)) ** 2)
    footprint = distance <= 1.0
    footprint[int(cy), int(cx)] = True
    amplitude = rng.uniform(*snr_range) * noise_sigma
    frame += amplitude * np.exp(-1.5 * distance**2) * (distance <= 1.5)
    mask |= footprint
    return int(extent_y), int(extent_x)


def synthetic_frame(
    rng: np.random.Generator, size: int, max_targets: int = 3, p_empty: float = 0.15, snr_range=(3.0, 10.0)
):
    """One synthetic frame: (uint8 image [size, size], bool mask [size, size], target count).

    p_empty: probability of a frame without targets; snr_range: peak target amplitude over the
    sensor noise's standard deviation (3 is barely visible, 20 is obvious).
    """
    frame = synthetic_background(rng, size)
    mask = np.zeros((size, size), dtype=bool)
    noise_sigma = rng.uniform(0.01, 0.03)
    count = 0 if rng.random() < p_empty else int(rng.integers(1, max_targets + 1))
    for _ in range(count):
        add_target(rng, frame, mask, noise_sigma, snr_range)
    frame += noise_sigma * rng.standard_normal(frame.shape)
    image = (np.clip(frame, 0, 1) * 255).round().astype(np.uint8)
    return image, mask, count


def write_synthetic_irstd(
    root: str, num_train: int = 64, num_test: int = 16, size: int = 128, seed: int = 0, p_empty: float = 0.15,
    snr_range=(3.0, 10.0),
) -> str:
    """Write `num_train` + `num_test` synthetic frames of size x size in the IRSTD-1k layout under `root`."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    os.makedirs(os.path.join(root, "masks"), exist_ok=True)
    names = [f"synth_{i:05d}" for i in range(num_train + num_test)]
    for name in names:
        image, mask, _ = synthetic_frame(rng, size, p_empty=p_empty, snr_range=snr_range)
        Image.fromarray(image, mode="L").save(os.path.join(root, "images", f"{name}.png"))
        Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(os.path.join(root, "masks", f"{name}.png"))
    for split, split_names in (("trainval", names[:num_train]), ("test", names[num_train:])):
        with open(os.path.join(root, SPLIT_FILES[split]), "w", encoding="utf-8") as handle:
            handle.write("\n".join(split_names) + "\n")
    return root


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write a synthetic IR small-target data set (IRSTD-1k layout).")
    parser.add_argument("--output_dir", "--output-dir", required=True)
    parser.add_argument("--num_train", "--num-train", type=int, default=200)
    parser.add_argument("--num_test", "--num-test", type=int, default=50)
    parser.add_argument("--size", type=int, default=256, help="Frame height and width in pixels.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--snr", type=float, nargs=2, default=[3.0, 10.0], metavar=("MIN", "MAX"),
                        help="Range of target peak amplitude over the noise standard deviation.")
    args = parser.parse_args(argv)
    write_synthetic_irstd(args.output_dir, args.num_train, args.num_test, args.size, args.seed, snr_range=tuple(args.snr))
    print(f"Wrote {args.num_train} training and {args.num_test} test frames to {args.output_dir}")


if __name__ == "__main__":
    main()
