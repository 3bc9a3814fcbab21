"""Malformed inputs across the three training scripts: each gives a clear error naming the file /
column / flag, or (`--skip_bad_samples`) a counted, logged skip, and never a crash deep inside a model.

The scripts run in-process (`main(parse_args([...]))`), so the many cases stay cheap; the data
layers are the ones each script uses (utils/data.py, utils/mask_dit/data.py, utils/segmentation/data.py).
"""

import io
import logging
import os

import numpy as np
import pytest
from conftest import run_main_in_process
from PIL import Image

from utils.data import BadSampleError


@pytest.fixture
def in_process():
    """Run a script's main() here: fresh accelerate state, signal handlers put back afterwards."""
    return run_main_in_process


def noise_image(size=(40, 36), seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)


def truncated_png_bytes():
    buffer = io.BytesIO()
    noise_image((64, 64)).save(buffer, format="PNG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


# ----------------------------------------------------------------------------------------------
# train_text_to_image.py
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def t2i_folder(tmp_path):
    """Four good captioned images."""
    root = tmp_path / "data"
    root.mkdir()
    for i in range(4):
        noise_image(seed=i).save(root / f"good{i}.png")
        (root / f"good{i}.txt").write_text(f"good picture {i}", encoding="utf-8")
    return root


def t2i_argv(pipeline, data_flag, data, output_dir, *extra):
    return ["--pretrained_model_name_or_path", pipeline, data_flag, data, "--resolution", "16", "--train_batch_size", "2",
            "--max_train_steps", "1", "--output_dir", output_dir, "--report_to", "none", "--lr_warmup_steps", "0",
            "--seed", "0", "--checkpointing_steps", "100", *extra]


@pytest.fixture
def t2i(in_process, tiny_pipeline_dir, tmp_path):
    import train_text_to_image as script

    def train(data, *extra, data_flag="--train_data_dir", output_dir=None):
        return in_process(script, t2i_argv(tiny_pipeline_dir, data_flag, data, output_dir or tmp_path / "out", *extra))

    return train


@pytest.mark.parametrize("case, content, expected", [
    ("truncated image", truncated_png_bytes(), "cannot read image"),  # header intact: caught when decoded
    ("zero-byte file", b"", "image file is empty (0 bytes)"),
    ("text saved as .png", b"this is not an image", "cannot read image header"),  # pre-flight
])
def test_t2i_unreadable_image_names_the_file(t2i, t2i_folder, case, content, expected):
    (t2i_folder / "bad.png").write_bytes(content)
    (t2i_folder / "bad.txt").write_text("a bad one")
    for i in range(4):  # make the bad one the only one, so the first batch meets it
        os.remove(t2i_folder / f"good{i}.png")
    with pytest.raises(BadSampleError) as error:
        t2i(t2i_folder)
    assert str(t2i_folder / "bad.png") in str(error.value) and expected in str(error.value), case


def test_t2i_skip_bad_samples_counts_and_logs_every_bad_file(t2i, t2i_folder, tmp_path, caplog):
    bad = {"truncated.png": truncated_png_bytes(), "empty.png": b"", "text.png": b"not an image"}
    for name, content in bad.items():
        (t2i_folder / name).write_bytes(content)
        (t2i_folder / name.replace(".png", ".txt")).write_text("bad")
    (t2i_folder / "nocaption.png").write_bytes((t2i_folder / "good0.png").read_bytes())
    with caplog.at_level(logging.WARNING):
        t2i(t2i_folder, "--skip_bad_samples", "--max_train_steps", "4", "--train_batch_size", "2")
    assert os.path.isfile(tmp_path / "out" / "model_index.json"), "the run should finish"
    # The pre-flight scan leaves out what its header/caption check sees, listed in one warning; a file whose
    # header is intact (truncated.png) is skipped, and counted, each time it is drawn.
    left_out = [r.getMessage() for r in caplog.records if "Pre-flight: leaving out 3 of 8 samples" in r.getMessage()]
    assert len(left_out) == 1, caplog.text
    for name in ("empty.png", "text.png", "nocaption.png"):
        assert name in left_out[0], f"{name} not listed by the pre-flight scan"
    skipped = [r.getMessage() for r in caplog.records if "Skipping bad sample" in r.getMessage()]
    assert skipped and all("truncated.png" in message for message in skipped)
    assert any("2 skipped so far" in message for message in skipped)


def test_t2i_every_image_mode_and_odd_file_trains(t2i, tmp_path):
    """Grayscale, RGBA, 16-bit, CMYK, palette (with transparency), bilevel, EXIF-rotated, a PNG named
    .jpg, a tiny image and a very elongated one: all decoded to RGB and trained on."""
    root = tmp_path / "modes"
    root.mkdir()
    base = noise_image((24, 20))
    samples = {
        "gray.png": base.convert("L"), "rgba.png": base.convert("RGBA"), "cmyk.jpg": base.convert("CMYK"),
        "palette.png": base.convert("P"), "bilevel.png": base.convert("1"), "tiny.png": base.resize((3, 2)),
        "long.png": base.resize((200, 8)),
    }
    for name, image in samples.items():
        image.save(root / name)
    Image.fromarray((np.asarray(base.convert("L"), dtype=np.uint16) * 257)).save(root / "deep16.png")
    base.convert("P").save(root / "transparent.png", transparency=0)
    exif = base.getexif()
    exif[0x0112] = 6
    base.save(root / "rotated.jpg", exif=exif.tobytes())
    base.save(root / "png_named.jpg", format="PNG")
    for path in root.iterdir():
        path.with_suffix(".txt").write_text(f"a {path.stem} picture")
    t2i(root, "--max_train_steps", "6", "--train_batch_size", "2")
    assert os.path.isfile(tmp_path / "out" / "model_index.json")


def test_t2i_huge_image_is_refused_by_name(t2i, t2i_folder, monkeypatch):
    import utils.images

    monkeypatch.setattr(utils.images, "MAX_IMAGE_PIXELS", 30 * 30)  # the real limit is 16384^2
    with pytest.raises(BadSampleError, match=r"good\d\.png: image is 40x36, larger than the 900-pixel limit"):
        t2i(t2i_folder)


def test_t2i_missing_caption_names_the_image(t2i, t2i_folder):
    for i in range(4):
        os.remove(t2i_folder / f"good{i}.txt")
    with pytest.raises(BadSampleError, match=r"good\d\.png\): missing caption"):
        t2i(t2i_folder)


def test_t2i_empty_captions_are_counted_and_logged(t2i, t2i_folder, tmp_path, caplog):
    (t2i_folder / "good1.txt").write_text("")
    with caplog.at_level(logging.WARNING):
        t2i(t2i_folder)
    assert "1 of 4 captions are empty (first: " in caplog.text and "good1.png" in caplog.text


def test_t2i_non_utf8_caption_names_the_caption_file(t2i, t2i_folder):
    (t2i_folder / "good2.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(BadSampleError, match=r"good2\.txt: caption file is not valid UTF-8"):
        t2i(t2i_folder)


def test_t2i_missing_column_names_flag_and_columns(t2i, t2i_folder):
    from utils.sd.data import write_metadata_jsonl

    write_metadata_jsonl(str(t2i_folder), [{"file_name": f"good{i}.png", "text": f"t{i}"} for i in range(4)])
    with pytest.raises(ValueError, match=r"--caption_column 'caption' not in dataset columns \['image', 'text'\]"):
        t2i(t2i_folder, "--caption_column", "caption")
    table = t2i_folder / "train.csv"
    table.write_text("file,text\ngood0.png,hello\n")
    with pytest.raises(ValueError, match=r"--image_column 'image' not in .*train\.csv columns \['file', 'text'\]"):
        t2i(table, data_flag="--train_data_file")


def test_t2i_empty_dataset(t2i, tmp_path):
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "readme.md").write_text("no images here")
    with pytest.raises(ValueError, match="nothing: the dataset is empty"):
        t2i(tmp_path / "nothing")


def test_t2i_dataset_path_cannot_escape_the_root(t2i, t2i_folder, tmp_path):
    root = tmp_path / "table"
    root.mkdir()
    (root / "train.jsonl").write_text('{"image": "../data/good0.png", "text": "escape"}\n')
    with pytest.raises(BadSampleError, match="points outside the dataset folder"):
        t2i(root / "train.jsonl", data_flag="--train_data_file")


def test_t2i_resolution_not_divisible(t2i, t2i_folder):
    with pytest.raises(ValueError, match=r"--resolution 17 must be a multiple of 2"):
        t2i(t2i_folder, "--resolution", "17")


def test_t2i_output_dir_is_a_file(t2i, t2i_folder, tmp_path):
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(ValueError, match=r"--output_dir .*taken exists and is a file"):
        t2i(t2i_folder, output_dir=tmp_path / "taken")


def test_t2i_resume_path_does_not_exist(t2i, t2i_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--resume_from_checkpoint .*checkpoint-7: no such checkpoint directory"):
        t2i(t2i_folder, "--resume_from_checkpoint", tmp_path / "elsewhere" / "checkpoint-7")


def test_t2i_missing_data_dir_and_config(t2i, tmp_path):
    with pytest.raises(FileNotFoundError, match="--train_data_dir .*nope: no such directory"):
        t2i(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="--config .*missing.yaml: no such file"):
        t2i(tmp_path, "--config", tmp_path / "missing.yaml")


# ----------------------------------------------------------------------------------------------
# train_mask_dit.py (utils/mask_dit/data.py)
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def paired_folder(tmp_path):
    root = tmp_path / "pairs"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(4):
        noise_image((32, 32), seed=i).save(root / "images" / f"{i}.png")
        mask = np.zeros((32, 32), dtype=np.uint8)
        mask[8:16, 8:16] = 1
        Image.fromarray(mask).save(root / "masks" / f"{i}.png")
    return root


def mask_dit_argv(data, output_dir, *extra):
    return ["--train_data_dir", data, "--output_dir", output_dir, "--model_size", "tiny", "--resolution", "32",
            "--mask_channels", "1", "--train_batch_size", "2", "--max_train_steps", "1", "--seed", "0",
            "--report_to", "none", "--num_inference_steps", "1", "--num_validation_images", "1", *extra]


@pytest.fixture
def mask_dit(in_process, tmp_path):
    import train_mask_dit as script

    return lambda data, *extra: in_process(script, mask_dit_argv(data, tmp_path / "out", *extra))


def test_mask_dit_missing_mask_names_the_image(mask_dit, paired_folder):
    os.remove(paired_folder / "masks" / "2.png")
    with pytest.raises(ValueError, match=r"Images without a mask: \['2\.png'\]"):
        mask_dit(paired_folder)


def test_mask_dit_size_mismatch_names_both_files(paired_folder):
    from utils.mask_dit.data import PairedImageMaskDataset, scan_paired_folder

    Image.fromarray(np.zeros((30, 32), dtype=np.uint8)).save(paired_folder / "masks" / "1.png")
    dataset = PairedImageMaskDataset(scan_paired_folder(str(paired_folder)), 32, 1)
    with pytest.raises(ValueError) as error:
        for index in range(len(dataset)):
            dataset[index]
    message = str(error.value)
    assert "images/1.png is 32x32" in message and "masks/1.png is 32x30" in message


def test_mask_dit_non_binary_mask_names_the_mask(paired_folder):
    from utils.mask_dit.data import PairedImageMaskDataset, scan_paired_folder

    Image.fromarray(np.full((32, 32), 7, dtype=np.uint8)).save(paired_folder / "masks" / "3.png")
    dataset = PairedImageMaskDataset(scan_paired_folder(str(paired_folder)), 32, mask_channels=2)
    with pytest.raises(ValueError, match=r"mask 3: value 7 but --mask_channels is 2"):
        for index in range(len(dataset)):
            dataset[index]


def test_mask_dit_corrupt_image_names_the_file(paired_folder):
    from utils.mask_dit.data import PairedImageMaskDataset, scan_paired_folder

    (paired_folder / "images" / "0.png").write_bytes(b"not a png")
    (paired_folder / "images" / "1.png").write_bytes(truncated_png_bytes())
    dataset = PairedImageMaskDataset(scan_paired_folder(str(paired_folder)), 32, 1)
    for index in (0, 1):
        with pytest.raises(Exception, match=rf"images/{index}\.png"):
            dataset[index]


def test_mask_dit_resolution_not_divisible(mask_dit, paired_folder, tmp_path):
    (tmp_path / "model.json").write_text('{"patch_size": 4}')
    with pytest.raises(ValueError, match=r"--resolution 34 must be a multiple of 4"):
        mask_dit(paired_folder, "--resolution", "34", "--model_config", tmp_path / "model.json")


def test_mask_dit_missing_layout_folder(mask_dit, tmp_path):
    (tmp_path / "flat").mkdir()
    with pytest.raises(FileNotFoundError, match=r"missing folder .*images \(expected images/ and masks/\)"):
        mask_dit(tmp_path / "flat")


# ----------------------------------------------------------------------------------------------
# train_segmentation_tpu.py (utils/segmentation/data.py)
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def irstd(tmp_path):
    from utils.segmentation.data import write_synthetic_irstd

    return write_synthetic_irstd(str(tmp_path / "irstd"), num_train=4, num_test=2, size=32, seed=0)


def test_segmentation_split_names_a_missing_image(irstd):
    from utils.segmentation.data import IRSTDDataset

    with open(os.path.join(irstd, "trainval.txt"), "a") as handle:
        handle.write("ghost_frame\n")
    dataset = IRSTDDataset(irstd, "trainval", train=True, base_size=32, crop_size=32)
    with pytest.raises(FileNotFoundError, match=r"image for sample 'ghost_frame' not found: .*images/ghost_frame\.png"):
        dataset[len(dataset) - 1]


def test_segmentation_missing_mask_and_size_mismatch(irstd):
    from utils.segmentation.data import IRSTDDataset

    names = open(os.path.join(irstd, "trainval.txt")).read().split()
    os.remove(os.path.join(irstd, "masks", names[0] + ".png"))
    Image.fromarray(np.zeros((16, 32), dtype=np.uint8)).save(os.path.join(irstd, "masks", names[1] + ".png"))
    dataset = IRSTDDataset(irstd, "trainval", train=True, base_size=32, crop_size=32)
    with pytest.raises(FileNotFoundError, match=f"no mask for sample '{names[0]}'"):
        dataset[0]
    with pytest.raises(ValueError, match=f"sample '{names[1]}': image is .* but mask is"):
        dataset[1]


def test_segmentation_missing_split_file_explains_the_layout(irstd, in_process, tmp_path):
    import train_segmentation_tpu as script

    os.remove(os.path.join(irstd, "trainval.txt"))
    with pytest.raises(FileNotFoundError, match=r"trainval\.txt not found .*Give images/, masks/ and trainval\.txt"):
        in_process(script, ["--dataset_dir", irstd, "--output_dir", tmp_path / "out", "--report_to", "none",
                            "--crop_size", "32", "--base_size", "32", "--max_train_steps", "1"])


def test_segmentation_crop_size_not_divisible(tmp_path):
    from train_segmentation_tpu import parse_args

    with pytest.raises(ValueError, match="--crop_size 40 must be a multiple of 16"):
        parse_args(["--dataset_dir", str(tmp_path), "--crop_size", "40"])
