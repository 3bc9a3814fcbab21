"""utils/mask_dit/data.py: paired folders, identical augmentation, mask decoding, synthetic fundus."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from utils.data import split_train_validation
from utils.mask_dit.data import (PairedImageMaskDataset, collate_pairs, hub_records, make_synthetic_fundus,
                                 mask_to_channels, scan_paired_folder, select_fraction,
                                 write_synthetic_fundus_dataset)


def test_synthetic_fundus_is_deterministic_by_seed():
    image_a, mask_a, caption_a = make_synthetic_fundus(3, 64)
    image_b, mask_b, caption_b = make_synthetic_fundus(3, 64)
    assert np.array_equal(np.asarray(image_a), np.asarray(image_b)) and np.array_equal(np.asarray(mask_a), np.asarray(mask_b))
    assert caption_a == caption_b and caption_a.startswith("a fundus photograph")
    image_c, _, _ = make_synthetic_fundus(4, 64)
    assert not np.array_equal(np.asarray(image_a), np.asarray(image_c))
    mask = np.asarray(mask_a)
    assert set(np.unique(mask)) <= {0, 1, 2} and (mask == 1).mean() > 0.02  # vessels are there
    assert image_a.size == mask_a.size == (64, 64) and image_a.mode == "RGB"


def test_synthetic_structures_are_where_the_mask_says():
    image, mask, _ = make_synthetic_fundus(0, 128)
    green, red = np.asarray(image)[..., 1].astype(float), np.asarray(image)[..., 0].astype(float)
    vessels = np.asarray(mask) == 1
    ratio = green / np.maximum(red, 1)
    assert ratio[vessels].mean() < 0.3 < ratio[(~vessels) & (red > 60)].mean()


def _write_pair(root, stem, image_size=(20, 16), mask_size=None, mask_value=1):
    (root / "images").mkdir(exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    Image.new("RGB", image_size, (200, 100, 50)).save(root / "images" / f"{stem}.png")
    Image.new("L", mask_size or image_size, mask_value).save(root / "masks" / f"{stem}.png")


def test_scan_reads_metadata_and_txt_captions(tmp_path):
    for stem in ("a", "b", "c"):
        _write_pair(tmp_path, stem)
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "from jsonl"}) + "\n")
    (tmp_path / "images" / "b.txt").write_text("from txt\n")
    records = scan_paired_folder(str(tmp_path))
    assert [(r.name, r.caption) for r in records] == [("a", "from jsonl"), ("b", "from txt"), ("c", "")]


def test_unmatched_pairs_are_named(tmp_path):
    _write_pair(tmp_path, "a")
    _write_pair(tmp_path, "b")
    (tmp_path / "masks" / "b.png").rename(tmp_path / "masks" / "z.png")
    with pytest.raises(ValueError, match=r"b\.png.*z\.png"):
        scan_paired_folder(str(tmp_path))


def test_different_sizes_are_named(tmp_path):
    _write_pair(tmp_path, "a", image_size=(20, 16), mask_size=(10, 8))
    dataset = PairedImageMaskDataset(scan_paired_folder(str(tmp_path)), 8, 1)
    with pytest.raises(ValueError, match=r"images/a\.png is 20x16 but .*masks/a\.png is 10x8"):
        dataset[0]


def test_mask_decoding():
    binary = np.array([[0, 255], [128, 127]], np.uint8)
    assert mask_to_channels(binary, 1, "m").tolist() == [[[0, 1], [1, 0]]]
    index = np.array([[0, 1], [2, 1]], np.uint8)
    assert mask_to_channels(index, 2, "m").tolist() == [[[0, 1], [0, 1]], [[0, 0], [1, 0]]]
    with pytest.raises(ValueError, match="mask m: value 3 but --mask_channels is 2"):
        mask_to_channels(np.array([[3]], np.uint8), 2, "m")


def test_identical_random_crop_and_flip(tmp_path):
    # The image's red channel encodes x, green encodes y; the mask encodes x: after crop / flip they must agree.
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    xs, ys = np.meshgrid(np.arange(40), np.arange(24))  # short side = resolution: crop only, no resampling
    Image.fromarray(np.stack([xs * 6, ys * 8, xs * 0], -1).astype(np.uint8)).save(tmp_path / "images" / "p.png")
    Image.fromarray((xs >= 20).astype(np.uint8) * 255).save(tmp_path / "masks" / "p.png")
    dataset = PairedImageMaskDataset(scan_paired_folder(str(tmp_path)), 24, 1, random_crop=True, random_flip=True, seed=0)
    seen_offsets, seen_flips = set(), set()
    for epoch in range(12):
        dataset.set_epoch(epoch)
        item = dataset[0]
        red = ((item["pixel_values"][0] + 1) * 127.5).round() / 6  # original x of each pixel
        mask_from_image = (red >= 20).float()
        assert torch.equal(mask_from_image, item["mask"][0])
        seen_offsets.add(int(red.min()))
        seen_flips.add(bool(red[0, 0] > red[0, -1]))
    assert len(seen_offsets) > 1 and seen_flips == {True, False}
    dataset.set_epoch(3)
    assert torch.equal(dataset[0]["pixel_values"], dataset[0]["pixel_values"])  # pure function of (seed, epoch, index)


def test_synthetic_folder_round_trip_and_collate(tmp_path):
    write_synthetic_fundus_dataset(str(tmp_path), 3, size=32, seed=1)
    dataset = PairedImageMaskDataset(scan_paired_folder(str(tmp_path)), 32, 2)
    batch = collate_pairs([dataset[i] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, 32, 32) and batch["mask"].shape == (3, 2, 32, 32)
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1
    assert all(c.startswith("a fundus photograph") for c in batch["captions"])


def test_hub_dataset_records():
    import datasets

    image, mask, caption = make_synthetic_fundus(0, 32)
    table = datasets.Dataset.from_dict({"image": [image], "mask": [mask], "text": [caption]})
    table = table.cast_column("image", datasets.Image()).cast_column("mask", datasets.Image())
    item = PairedImageMaskDataset(hub_records(table), 32, 2)[0]
    assert item["caption"] == caption and item["mask"].shape == (2, 32, 32)
    with pytest.raises(ValueError, match="--mask_column 'label' not in dataset columns"):
        hub_records(table, mask_column="label")


def test_sample_ratio_and_split_are_seeded():
    assert select_fraction(100, 0.25, seed=1) == select_fraction(100, 0.25, seed=1)
    assert len(select_fraction(100, 0.25, seed=1)) == 25
    assert select_fraction(100, 0.25, seed=1) != select_fraction(100, 0.25, seed=2)
    assert select_fraction(7, 1.0, seed=None) == list(range(7))
    with pytest.raises(ValueError, match="--sample_ratio"):
        select_fraction(10, 0.0, seed=0)
    train, held_out = split_train_validation(20, 0.1, seed=0)
    assert len(held_out) == 2 and sorted(train + held_out) == list(range(20))
