"""Property-based fuzzing (hypothesis) of the data loaders: whatever bytes, images, captions, paths or
masks come in, the loaders either produce well-formed tensors or raise their own clear error type,
never an arbitrary exception from PIL or NumPy deep inside a DataLoader worker."""

import io
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from utils.data import BadSampleError, sample_rng
from utils.images import load_image
from utils.sd.data import ImageTransform, TextImageDataset, _safe_join, pick_caption

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I", "I;16", "F", "YCbCr"]
FORMATS = {"PNG": ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"], "JPEG": ["L", "RGB", "CMYK"],
           "TIFF": ["1", "L", "RGB", "RGBA", "CMYK", "I", "F", "I;16"], "BMP": ["1", "L", "P", "RGB"],
           "GIF": ["L", "P"], "WEBP": ["RGB", "RGBA"]}


@st.composite
def pil_images(draw, max_side=48):
    width, height = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    seed = draw(st.integers(0, 2**16))
    rgb = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))
    mode = draw(st.sampled_from(MODES))
    if mode == "I;16":
        return Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257))
    if mode in ("I", "F"):
        return rgb.convert("L").convert(mode)
    return rgb.convert(mode)


@st.composite
def encoded_images(draw):
    """A valid encoded image file (bytes) in a random format and mode, and its size."""
    image_format = draw(st.sampled_from(sorted(FORMATS)))
    image = draw(pil_images())
    mode = draw(st.sampled_from(FORMATS[image_format]))
    if image.mode != mode:
        image = (Image.fromarray((np.asarray(image.convert("L"), dtype=np.uint16) * 257)) if mode == "I;16"
                 else image.convert("RGB").convert(mode))
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue(), image.size


def assert_rgb(image, size=None):
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    if size is not None:
        assert image.size == size


@FUZZ
@given(data=st.binary(max_size=2048))
def test_arbitrary_bytes_decode_or_raise_bad_sample(data):
    try:
        image = load_image(data, name="fuzz.bin")
    except BadSampleError as error:
        assert "fuzz.bin" in str(error)
    else:
        assert_rgb(image)


@FUZZ
@given(encoded=encoded_images())
def test_every_format_and_mode_decodes_to_rgb(encoded):
    data, size = encoded
    assert_rgb(load_image(data, name="x"), size)


@FUZZ
@given(encoded=encoded_images(), cut=st.floats(0.0, 1.0), flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)),
                                                                            max_size=8))
def test_damaged_files_decode_or_raise_bad_sample(encoded, cut, flips):
    """Truncated and bit-flipped files: a clean BadSampleError naming the file, or a decodable image."""
    data = bytearray(encoded[0][: max(1, int(len(encoded[0]) * cut))])
    for position, mask in flips:
        data[position % len(data)] ^= mask
    try:
        image = load_image(bytes(data), name="damaged.png")
    except BadSampleError as error:
        assert "damaged.png" in str(error)
    else:
        assert_rgb(image)


@FUZZ
@given(image=pil_images(max_side=80), resolution=st.integers(1, 40), center=st.booleans(), flip=st.booleans(),
       seed=st.integers(0, 2**31), epoch=st.integers(0, 1000), index=st.integers(0, 10**6),
       interpolation=st.sampled_from(["lanczos", "bilinear", "bicubic", "nearest", "box", "hamming"]))
def test_transform_output_shape_range_and_determinism(image, resolution, center, flip, seed, epoch, index, interpolation):
    transform = ImageTransform(resolution, interpolation, center, flip)
    rgb = load_image(image)
    pixels, (top, left) = transform(rgb, sample_rng(seed, epoch, index))
    assert pixels.shape == (3, resolution, resolution) and pixels.dtype == torch.float32
    assert torch.isfinite(pixels).all() and pixels.min() >= -1.0 and pixels.max() <= 1.0
    again, origin = transform(rgb, sample_rng(seed, epoch, index))
    assert torch.equal(pixels, again) and origin == (top, left)


caption_values = st.one_of(
    st.none(), st.text(max_size=40), st.integers(), st.floats(allow_nan=True),
    st.lists(st.one_of(st.text(max_size=10), st.none(), st.integers()), max_size=5),
)


@FUZZ
@given(caption=caption_values, training=st.booleans())
def test_captions_become_strings_or_a_named_error(caption, training):
    try:
        text = pick_caption(caption, random.Random(0) if training else None, "row 3")
    except BadSampleError as error:
        assert "row 3" in str(error)
    else:
        assert isinstance(text, str)


@FUZZ
@given(relative=st.lists(st.sampled_from(list("ab./\\~_ ") + ["..", "%2e", "\x00", "/etc"]), max_size=12).map("".join))
def test_relative_dataset_paths_never_escape_the_root(tmp_path, relative):
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    try:
        path = _safe_join(str(root), relative, "table.csv")
    except BadSampleError as error:
        assert "outside the dataset folder" in str(error)
    except ValueError:  # an embedded NUL byte: rejected by the OS layer before any file access
        assert "\x00" in relative
    else:  # the rule: absolute paths as written; relative ones stay lexically inside the root
        if not os.path.isabs(relative):
            assert os.path.commonpath([str(root), path]) == str(root)
        else:
            assert path == os.path.normpath(relative)


@FUZZ
@given(rows=st.lists(st.tuples(st.sampled_from(["good", "empty", "garbage", "missing", "gray"]),
                               st.one_of(st.none(), st.text(max_size=8), st.lists(st.text(max_size=4), max_size=3))),
                     min_size=1, max_size=8),
       index=st.integers(0, 7), skip=st.booleans())
def test_dataset_items_are_well_formed_or_a_bad_sample_error(tmp_path, rows, index, skip):
    assume(index < len(rows))
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    records = []
    for number, (kind, caption) in enumerate(rows):
        path = folder / f"{number}.png"
        if kind in ("good", "gray"):
            Image.new("RGB" if kind == "good" else "L", (10 + number, 7)).save(path)
        elif kind == "empty":
            path.write_bytes(b"")
        elif kind == "garbage":
            path.write_bytes(np.random.default_rng(number).integers(0, 256, 64, dtype=np.uint8).tobytes())
        records.append({"image": str(path), "text": caption})
    dataset = TextImageDataset(records, "image", "text", ImageTransform(6, random_flip=True), lambda c: torch.tensor([len(c)]),
                               seed=1, skip_bad_samples=skip, source_name="fuzz")
    try:
        item = dataset[index]
    except BadSampleError as error:
        assert "fuzz" in str(error) or str(folder) in str(error)
        assert skip is False or "every sample is unreadable" in str(error)
    else:
        assert item["pixel_values"].shape == (3, 6, 6) and isinstance(item["caption"], str)
        assert dataset.num_skipped <= len(rows) - 1


@FUZZ
@given(height=st.integers(4, 40), width=st.integers(4, 40), channels=st.integers(1, 3), max_value=st.integers(0, 255),
       seed=st.integers(0, 1000), resolution=st.integers(2, 16), flip=st.booleans(), crop=st.booleans())
def test_paired_masks_are_binary_aligned_or_a_named_error(tmp_path, height, width, channels, max_value, seed, resolution,
                                                          flip, crop):
    from utils.mask_dit.data import PairedImageMaskDataset, PairRecord

    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    mask = Image.fromarray(rng.integers(0, max_value + 1, (height, width), dtype=np.uint8))
    dataset = PairedImageMaskDataset([PairRecord("fuzz-mask", image, mask)], resolution, channels, random_crop=crop,
                                     random_flip=flip, seed=seed)
    try:
        item = dataset[0]
    except ValueError as error:
        assert "fuzz-mask" in str(error) and "--mask_channels" in str(error)
        assert channels > 1 and max_value > channels
    else:
        assert item["pixel_values"].shape == (3, resolution, resolution)
        assert item["mask"].shape == (channels, resolution, resolution)
        assert set(torch.unique(item["mask"]).tolist()) <= {0.0, 1.0}
        assert item["pixel_values"].min() >= -1.0 and item["pixel_values"].max() <= 1.0
