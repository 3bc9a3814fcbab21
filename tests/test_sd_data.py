"""utils/images.py, utils/data.py, utils/sd/data.py: robust image decoding, transforms, sources, and the
text-image dataset."""

import argparse
import io
import json
import logging
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

from utils import images
from utils.data import BadSampleError, sample_rng
from utils.images import load_image, pil_to_tensor, tensor_to_pil
from utils.sd import data as sd_data
from utils.sd.data import ImageTransform, TextImageDataset, collate_text_image, load_text_image_dataset, pick_caption


def data_args(**overrides):
    args = dict(dataset_name=None, dataset_config_name=None, train_data_dir=None, train_data_file=None,
                image_column="image", caption_column="text", max_train_samples=None, cache_dir=None, seed=0,
                caption_extension=None, masked_loss=False, instance_data_dir=None)
    args.update(overrides)
    return argparse.Namespace(**args)


def save(image, path, **kwargs):
    image.save(path, **kwargs)
    return str(path)


def fake_tokenize(caption):
    return torch.tensor([len(caption)])


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "RGBA", "LA", "CMYK", "I;16", "I", "F", "YCbCr"])
def test_every_mode_decodes_to_rgb(tmp_path, mode):
    image = Image.new(mode, (12, 10))
    source = image if mode in ("CMYK", "YCbCr", "F", "I") else save(image, tmp_path / "x.png" if mode not in ("CMYK",) else tmp_path / "x.jpg")
    out = load_image(source)
    assert out.mode == "RGB" and out.size == (12, 10)


def test_sixteen_bit_scaled_to_eight_bit(tmp_path):
    array = np.full((4, 4), 65535, dtype=np.uint16)
    array[0, 0] = 0
    image = Image.fromarray(array)
    assert image.mode == "I;16"
    path = save(image, tmp_path / "deep.png")
    assert Image.open(path).mode in ("I;16", "I")
    rgb = np.asarray(load_image(path))
    assert rgb[1, 1].tolist() == [255, 255, 255] and rgb[0, 0].tolist() == [0, 0, 0]


def test_transparency_composited_on_white(tmp_path):
    path = save(Image.new("RGBA", (4, 4), (0, 0, 0, 0)), tmp_path / "clear.png")
    assert np.asarray(load_image(path)).min() == 255
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0] * 256)
    path = save(palette, tmp_path / "pal.png", transparency=0)
    assert np.asarray(load_image(path)).min() == 255


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (20, 10), (255, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    path = save(image, tmp_path / "rotated.jpg", exif=exif.tobytes())
    assert load_image(path).size == (10, 20)


def test_sources_bytes_dict_and_pil(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (5, 6)).save(buffer, format="PNG")
    assert load_image(buffer.getvalue()).size == (5, 6)
    assert load_image({"bytes": buffer.getvalue(), "path": "a.png"}).size == (5, 6)
    path = save(Image.new("RGB", (7, 3)), tmp_path / "p.png")
    assert load_image({"bytes": None, "path": path}).size == (7, 3)
    with pytest.raises(BadSampleError, match="unsupported image value of type int"):
        load_image(3)


def test_wrong_extension_is_decoded_by_content(tmp_path):
    path = save(Image.new("RGB", (8, 8), (1, 2, 3)), tmp_path / "actually_png.jpg", format="PNG")
    assert np.asarray(load_image(path))[0, 0].tolist() == [1, 2, 3]


@pytest.mark.parametrize("case", ["missing", "zero_bytes", "text", "truncated", "garbage_bytes"])
def test_unreadable_images_name_the_file(tmp_path, case):
    path = tmp_path / f"{case}.png"
    if case == "zero_bytes":
        path.write_bytes(b"")
    elif case == "text":
        path.write_text("not an image")
    elif case == "truncated":
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, format="PNG")
        path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    expected = {"missing": "not found", "zero_bytes": "empty (0 bytes)"}.get(case, "cannot read image")
    source = str(path) if case != "garbage_bytes" else b"\x89PNG\r\n\x1a\nxxxx"
    with pytest.raises(BadSampleError) as error:
        load_image(source, name=None if case != "garbage_bytes" else "row 7")
    assert expected in str(error.value)
    assert (str(path) if case != "garbage_bytes" else "row 7") in str(error.value)


def test_huge_image_refused_before_decoding(tmp_path, monkeypatch):
    path = save(Image.new("RGB", (64, 64)), tmp_path / "huge.png")
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 32 * 32)
    with pytest.raises(BadSampleError, match="64x64, larger than"):
        load_image(path)


# ----------------------------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------------------------

def test_transform_shape_range_and_determinism():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (30, 50, 3), dtype=np.uint8))
    transform = ImageTransform(16, random_flip=True)
    first, origin = transform(image, sample_rng(3, 1, 5))
    second, origin_again = transform(image, sample_rng(3, 1, 5))
    assert first.shape == (3, 16, 16) and first.dtype == torch.float32
    assert -1.0 <= first.min() and first.max() <= 1.0
    assert torch.equal(first, second) and origin == origin_again
    crops = {transform(image, sample_rng(3, epoch, 5))[1] for epoch in range(20)}
    assert len(crops) > 1, "random crops should vary with the epoch"


def test_center_crop_is_centred():
    image = Image.new("RGB", (40, 20))
    _, (top, left) = ImageTransform(20, center_crop=True)(image, random.Random(0))
    assert (top, left) == (0, 10)


def test_sample_rng_is_a_pure_function():
    assert sample_rng(1, 2, 3).random() == sample_rng(1, 2, 3).random()
    assert sample_rng(1, 2, 3).random() != sample_rng(1, 2, 4).random()
    assert sample_rng(None, 0, 0).random() == sample_rng(0, 0, 0).random()


def test_tensor_pil_round_trip():
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (8, 8, 3), dtype=np.uint8))
    back = tensor_to_pil(pil_to_tensor(image)[None])[0]
    assert np.array_equal(np.asarray(back), np.asarray(image))


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def captioned_folder(tmp_path):
    root = tmp_path / "folder"
    (root / "sub").mkdir(parents=True)
    for i, folder in enumerate([root, root, root / "sub"]):
        save(Image.new("RGB", (10, 10), (i, 0, 0)), folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"caption {i}\n", encoding="utf-8")
    (root / "notes.md").write_text("ignored")
    return root


def test_captioned_folder(captioned_folder):
    rows = load_text_image_dataset(data_args(train_data_dir=str(captioned_folder)))
    assert len(rows) == 3 and sorted(rows["text"]) == ["caption 0", "caption 1", "caption 2"]


def test_captioned_folder_missing_caption_is_a_bad_sample(captioned_folder):
    os.remove(captioned_folder / "img1.txt")
    rows = load_text_image_dataset(data_args(train_data_dir=str(captioned_folder)))
    dataset = TextImageDataset(rows, "image", "text", ImageTransform(8), fake_tokenize, source_name="folder")
    index = rows["image"].index(str(captioned_folder / "img1.png"))
    with pytest.raises(BadSampleError, match="missing caption"):
        dataset[index]


def test_non_utf8_caption_file_is_named(captioned_folder):
    (captioned_folder / "img0.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(BadSampleError) as error:
        load_text_image_dataset(data_args(train_data_dir=str(captioned_folder)))
    assert "img0.txt" in str(error.value) and "UTF-8" in str(error.value)


def test_utf8_bom_caption_is_read(captioned_folder):
    (captioned_folder / "img0.txt").write_bytes("\ufeffa bom caption".encode("utf-8"))
    rows = load_text_image_dataset(data_args(train_data_dir=str(captioned_folder)))
    assert "a bom caption" in rows["text"]


def test_imagefolder_with_metadata(tmp_path):
    for i in range(2):
        save(Image.new("RGB", (6, 6)), tmp_path / f"{i}.png")
    sd_data.write_metadata_jsonl(str(tmp_path), [{"file_name": f"{i}.png", "text": f"t{i}"} for i in range(2)])
    rows = load_text_image_dataset(data_args(train_data_dir=str(tmp_path)))
    assert sorted(rows["text"]) == ["t0", "t1"]
    with pytest.raises(ValueError) as error:
        load_text_image_dataset(data_args(train_data_dir=str(tmp_path), caption_column="caption"))
    assert "--caption_column 'caption'" in str(error.value) and "text" in str(error.value)


def test_table_file_paths_are_relative_to_the_file(tmp_path):
    (tmp_path / "imgs").mkdir()
    save(Image.new("RGB", (6, 6)), tmp_path / "imgs" / "a.png")
    table = tmp_path / "train.jsonl"
    table.write_text(json.dumps({"image": "imgs/a.png", "text": "hello"}) + "\n", encoding="utf-8")
    rows = load_text_image_dataset(data_args(train_data_file=str(table)))
    assert rows[0]["image"] == str(tmp_path / "imgs" / "a.png")


@pytest.mark.parametrize("escape", ["../outside.png", "imgs/../../outside.png", "./../ds2/x.png"])
def test_relative_table_paths_cannot_climb_out_of_the_table_folder(tmp_path, escape):
    root = tmp_path / "ds"
    root.mkdir()
    table = root / "train.csv"
    table.write_text(f"image,text\n{escape},x\n", encoding="utf-8")
    with pytest.raises(BadSampleError, match="outside the dataset folder"):
        load_text_image_dataset(data_args(train_data_file=str(table)))


def test_absolute_paths_and_symlinks_in_a_table_are_accepted(tmp_path):
    """The user wrote the absolute path and placed the symlink: both are theirs to choose (issue 16)."""
    root = tmp_path / "ds"
    root.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "shared").mkdir()
    save(Image.new("RGB", (4, 4)), tmp_path / "elsewhere" / "abs.png")
    save(Image.new("RGB", (4, 4)), tmp_path / "shared" / "target.png")
    os.symlink(tmp_path / "shared" / "target.png", root / "link.png")
    table = root / "train.csv"
    table.write_text(f"image,text\n{tmp_path / 'elsewhere' / 'abs.png'},x\nlink.png,y\n", encoding="utf-8")
    rows = load_text_image_dataset(data_args(train_data_file=str(table)))
    assert rows["image"] == [str(tmp_path / "elsewhere" / "abs.png"), str(root / "link.png")]


def test_source_errors(tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        load_text_image_dataset(data_args())
    with pytest.raises(ValueError, match="exactly one"):
        load_text_image_dataset(data_args(train_data_dir="a", train_data_file="b"))
    with pytest.raises(FileNotFoundError, match="--train_data_dir"):
        load_text_image_dataset(data_args(train_data_dir=str(tmp_path / "nope")))
    with pytest.raises(FileNotFoundError, match="--train_data_file"):
        load_text_image_dataset(data_args(train_data_file=str(tmp_path / "nope.csv")))
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(ValueError, match=r"expected a \.csv or \.jsonl"):
        load_text_image_dataset(data_args(train_data_file=str(tmp_path / "data.txt")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        load_text_image_dataset(data_args(train_data_dir=str(tmp_path / "empty")))
    table = tmp_path / "t.csv"
    table.write_text("file,text\na.png,x\n")
    with pytest.raises(ValueError, match=r"--image_column 'image' not in .*\['file', 'text'\]"):
        load_text_image_dataset(data_args(train_data_file=str(table)))


def test_max_train_samples(captioned_folder):
    rows = load_text_image_dataset(data_args(train_data_dir=str(captioned_folder), max_train_samples=2))
    assert len(rows) == 2


# ----------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------

def test_pick_caption():
    assert pick_caption("a", None, "w") == "a"
    assert pick_caption(["a", "b"], None, "w") == "a"
    assert pick_caption(["a", "b"], random.Random(0), "w") in ("a", "b")
    for bad, message in ((None, "missing caption"), ([], "empty caption list"), (3, "got int")):
        with pytest.raises(BadSampleError, match=message):
            pick_caption(bad, None, "row 4")


def test_dataset_items_and_collate(captioned_folder):
    rows = load_text_image_dataset(data_args(train_data_dir=str(captioned_folder)))
    dataset = TextImageDataset(rows, "image", "text", ImageTransform(8, random_flip=True), fake_tokenize, seed=1)
    batch = collate_text_image([dataset[0], dataset[1]])
    assert batch["pixel_values"].shape == (2, 3, 8, 8) and batch["input_ids"].shape == (2, 1)
    assert batch["captions"][0].startswith("caption")
    dataset.set_epoch(0)
    again = dataset[0]["pixel_values"]
    assert torch.equal(again, batch["pixel_values"][0]), "same (seed, epoch, index) must give the same sample"


def test_caption_dropout_replaces_some_captions(captioned_folder):
    rows = load_text_image_dataset(data_args(train_data_dir=str(captioned_folder)))
    dataset = TextImageDataset(rows, "image", "text", ImageTransform(8), fake_tokenize, seed=0, caption_dropout_prob=0.5)
    captions = []
    for epoch in range(10):
        dataset.set_epoch(epoch)
        captions += [dataset[i]["caption"] for i in range(3)]
    assert "" in captions and any(captions)


def test_skip_bad_samples_counts_logs_and_replaces(captioned_folder, caplog):
    (captioned_folder / "img0.png").write_bytes(b"")
    rows = load_text_image_dataset(data_args(train_data_dir=str(captioned_folder)))
    bad = rows["image"].index(str(captioned_folder / "img0.png"))
    strict = TextImageDataset(rows, "image", "text", ImageTransform(8), fake_tokenize)
    with pytest.raises(BadSampleError, match="img0.png"):
        strict[bad]
    lenient = TextImageDataset(rows, "image", "text", ImageTransform(8), fake_tokenize, skip_bad_samples=True)
    with caplog.at_level(logging.WARNING):
        item = lenient[bad]
    assert item["caption"].startswith("caption") and lenient.num_skipped == 1
    assert "img0.png" in caplog.text and "1 skipped" in caplog.text


def test_every_sample_bad_is_an_error(tmp_path):
    rows = {"image": [str(tmp_path / "a.png"), str(tmp_path / "b.png")], "text": ["a", "b"]}
    rows = [dict(zip(rows, values)) for values in zip(*rows.values())]
    dataset = TextImageDataset(rows, "image", "text", ImageTransform(8), fake_tokenize, skip_bad_samples=True,
                               source_name="my-set")
    with pytest.raises(BadSampleError, match="my-set: every sample is unreadable"):
        dataset[0]
    assert dataset.num_skipped == 2


def test_imagefolder_metadata_cannot_escape_the_root(tmp_path):
    """`datasets` itself refuses a metadata file_name outside the folder; we rely on (and pin) that."""
    root = tmp_path / "ds"
    root.mkdir()
    save(Image.new("RGB", (4, 4)), tmp_path / "secret.png")
    save(Image.new("RGB", (4, 4)), root / "a.png")
    sd_data.write_metadata_jsonl(str(root), [{"file_name": "a.png", "text": "x"}, {"file_name": "../secret.png", "text": "y"}])
    with pytest.raises(Exception) as error:
        load_text_image_dataset(data_args(train_data_dir=str(root)))
    chain, cause = [], error.value
    while cause is not None:
        chain.append(str(cause))
        cause = cause.__cause__
    assert any("../secret.png" in message for message in chain), chain


def test_empty_captions_are_counted_and_logged(captioned_folder, caplog):
    (captioned_folder / "img1.txt").write_text("  \n", encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        rows = load_text_image_dataset(data_args(train_data_dir=str(captioned_folder)))
    assert "1 of 3 captions are empty" in caplog.text and "img1.png" in caplog.text
    assert "" in rows["text"]


def test_missing_caption_error_names_the_image(captioned_folder):
    os.remove(captioned_folder / "img2.txt") if (captioned_folder / "img2.txt").exists() else None
    os.remove(captioned_folder / "sub" / "img2.txt")
    rows = load_text_image_dataset(data_args(train_data_dir=str(captioned_folder)))
    dataset = TextImageDataset(rows, "image", "text", ImageTransform(8), fake_tokenize, source_name="folder")
    index = rows["image"].index(str(captioned_folder / "sub" / "img2.png"))
    with pytest.raises(BadSampleError, match=r"folder row \d \(.*img2\.png\): missing caption"):
        dataset[index]


def test_persistent_workers_see_every_epoch(captioned_folder):
    """make_train_dataloader keeps its workers across epochs; the per-epoch augmentation they
    compute must still follow set_epoch (shared-memory epoch), exactly as in the main process."""
    from utils.data import make_train_dataloader

    rows = load_text_image_dataset(data_args(train_data_dir=str(captioned_folder)))

    def epochs(num_workers):
        dataset = TextImageDataset(rows, "image", "text", ImageTransform(8, random_flip=True, center_crop=False), fake_tokenize,
                                   seed=3, caption_dropout_prob=0.5)
        loader = make_train_dataloader(dataset, 2, num_workers, collate_text_image, shuffle=False)
        assert loader.persistent_workers is (num_workers > 0)
        out = []
        for epoch in range(4):
            dataset.set_epoch(epoch)
            out.append([(b["pixel_values"].clone(), b["captions"]) for b in loader])
        return out

    in_process, with_workers = epochs(0), epochs(2)
    assert any(not torch.equal(a[0][0], b[0][0]) or a[0][1] != b[0][1] for a, b in zip(in_process, in_process[1:])), \
        "the augmentation should change between epochs"
    for epoch_a, epoch_b in zip(in_process, with_workers):
        for (pixels_a, captions_a), (pixels_b, captions_b) in zip(epoch_a, epoch_b):
            assert torch.equal(pixels_a, pixels_b) and captions_a == captions_b


def test_caption_tags_keep_shuffle_and_drop_per_sample_and_epoch():
    from utils.sd.data import CaptionTags

    caption = "sks person, red hair, smile, outdoors, night, hat"
    tags = CaptionTags(shuffle=True, keep_tokens=1, dropout_rate=0.3)
    variants = [tags.apply(caption, sample_rng(0, epoch, 0)) for epoch in range(30)]
    for variant in variants:
        parts = variant.split(", ")
        assert parts[0] == "sks person"  # kept in place, never dropped
        assert set(parts[1:]) <= {"red hair", "smile", "outdoors", "night", "hat"} and len(set(parts)) == len(parts)
    assert len(set(variants)) > 10  # shuffled and dropped differently per epoch
    assert any(len(v.split(", ")) < 6 for v in variants) and any(len(v.split(", ")) == 6 for v in variants)
    assert variants == [tags.apply(caption, sample_rng(0, epoch, 0)) for epoch in range(30)]  # (seed, epoch, index)
    only_shuffle = CaptionTags(shuffle=True, keep_tokens=2, separator="|")
    assert sorted(only_shuffle.apply("a|b|c|d", random.Random(1)).split("| ")[2:]) == ["c", "d"]
    assert CaptionTags().apply(caption, random.Random(0)) == caption and not CaptionTags().enabled


def test_caption_tags_reach_the_samples_and_are_refused_with_cached_embeddings(captioned_folder, tmp_path):
    import train_text_to_image
    from utils.errors import UserError
    from utils.sd.data import CaptionTags

    rows = load_text_image_dataset(data_args(train_data_dir=str(captioned_folder)))
    rows = rows.map(lambda row, i: {"text": f"tag{i}, a, b, c, d"}, with_indices=True)
    dataset = TextImageDataset(rows, "image", "text", ImageTransform(8), fake_tokenize, seed=0,
                               tags=CaptionTags(shuffle=True, keep_tokens=1))
    seen = set()
    for epoch in range(6):
        dataset.set_epoch(epoch)
        seen.add(dataset[0]["caption"])
    assert len(seen) > 1 and all(caption.startswith("tag0, ") for caption in seen)
    common = ["--model_preset", "tiny", "--train_data_dir", str(captioned_folder), "--output_dir", str(tmp_path / "o")]
    assert train_text_to_image.parse_args(common + ["--shuffle_caption", "--cache_latents"]).shuffle_caption
    with pytest.raises(UserError, match="--cache_text_embeddings"):
        train_text_to_image.parse_args(common + ["--shuffle_caption", "--precompute"])
