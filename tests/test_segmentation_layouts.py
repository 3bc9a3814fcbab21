"""train_segmentation_tpu.py's evaluation protocol: data set layouts (MSHNet, BasicIRSTD, shipped standard splits,
SIRST3), native-size scoring, the scored head, the Pd-Fa curve and the papers' table row."""

import csv
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import train_segmentation_tpu as script
from tests.conftest import run_main_in_process
from utils.segmentation.data import (SHIPPED_SPLITS, SIRST3_PARTS, IRSTDDataset, list_split, native_eval_size,
                                     synthetic_frame, write_synthetic_irstd)

SIZES = {"NUAA-SIRST": (48, 32), "NUDT-SIRST": (32, 32), "IRSTD-1K": (64, 48)}  # (width, height): frames differ
# Names that the standard lists hold (a merged SIRST3 folder is split into its parts by them).
NAMES = {"NUAA-SIRST": ("Misc_119", "Misc_64", "Misc_338", "Misc_379"),
         "NUDT-SIRST": ("001137", "000345", "000541", "000832"),
         "IRSTD-1K": ("XDU514", "XDU646", "XDU189", "XDU935")}


def shipped(part, kind):
    return open(os.path.join(SHIPPED_SPLITS, part, f"{kind}_{part}.txt")).read().split()


def test_shipped_sirst3_split_is_the_three_standard_splits_concatenated():
    for kind in ("train", "test"):
        assert shipped("SIRST3", kind) == sum((shipped(part, kind) for part in SIRST3_PARTS), [])
    assert (len(shipped("IRSTD-1K", "train")), len(shipped("IRSTD-1K", "test"))) == (800, 201)
    assert (len(shipped("NUDT-SIRST", "train")), len(shipped("NUDT-SIRST", "test"))) == (663, 664)


def write_basicirstd(root, part, rng, num_train=2, num_test=2, index_files=True):
    """A BasicIRSTD-layout folder: images/, masks/, img_idx/{train,test}_<part>.txt, frames of SIZES[part]."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    os.makedirs(os.path.join(root, "masks"), exist_ok=True)
    width, height = SIZES[part]
    names = NAMES[part][: num_train + num_test]
    for name in names:
        image, mask, _ = synthetic_frame(rng, max(width, height), p_empty=0.0, snr_range=(20.0, 30.0))
        Image.fromarray(image[:height, :width]).save(os.path.join(root, "images", f"{name}.png"))
        Image.fromarray(mask[:height, :width].astype(np.uint8) * 255).save(os.path.join(root, "masks", f"{name}.png"))
    if index_files:
        os.makedirs(os.path.join(root, "img_idx"), exist_ok=True)
        for kind, listed in (("train", names[:num_train]), ("test", names[num_train:])):
            with open(os.path.join(root, "img_idx", f"{kind}_{part}.txt"), "w") as handle:
                handle.write("\r\n".join(listed) + "\r\n")  # BasicIRSTD's files have CRLF line ends
    return names


def test_basicirstd_layout_with_its_command_line_and_with_the_folder_itself(tmp_path):
    names = write_basicirstd(tmp_path / "datasets" / "NUDT-SIRST", "NUDT-SIRST", np.random.default_rng(0))
    by_parent = list_split(str(tmp_path / "datasets"), "trainval", "NUDT-SIRST")  # BasicIRSTD's --dataset_dir
    by_folder = list_split(str(tmp_path / "datasets" / "NUDT-SIRST"), "test")  # the name from the folder
    assert by_parent.names == list(names[:2]) and by_folder.names == list(names[2:])
    assert by_parent.files[0].endswith(os.path.join("img_idx", "train_NUDT-SIRST.txt"))
    assert set(by_folder.sources) == {"NUDT-SIRST"}


def test_a_known_data_set_without_split_files_uses_the_shipped_standard_split(tmp_path):
    root = tmp_path / "IRSTD-1k"  # the download's own capitalisation
    os.makedirs(root / "images")
    listing = list_split(str(root), "test")
    assert listing.names == shipped("IRSTD-1K", "test") and listing.files[0].startswith(SHIPPED_SPLITS)
    with pytest.raises(FileNotFoundError, match=r"img_idx.*--dataset_name one of IRSTD-1K"):
        list_split(str(tmp_path / "unknown"), "test")


@pytest.fixture
def sirst3_side_by_side(tmp_path):
    rng = np.random.default_rng(1)
    for part in SIRST3_PARTS:
        write_basicirstd(tmp_path / "sirst3" / part, part, rng)
    return tmp_path / "sirst3"


def test_sirst3_from_three_folders_and_from_a_merged_folder_gives_the_same_parts(sirst3_side_by_side, tmp_path):
    side = list_split(str(sirst3_side_by_side), "test", "SIRST3")
    assert side.sources == [part for part in SIRST3_PARTS for _ in range(2)]
    assert side.names == [name for part in SIRST3_PARTS for name in NAMES[part][2:]]
    merged = tmp_path / "datasets" / "SIRST3"  # BasicIRSTD's merged folder, its lists the union
    for folder in ("images", "masks"):
        os.makedirs(merged / folder)
        for part in SIRST3_PARTS:
            for file in os.listdir(sirst3_side_by_side / part / folder):
                shutil.copy(sirst3_side_by_side / part / folder / file, merged / folder / file)
    os.makedirs(merged / "img_idx")
    with open(merged / "img_idx" / "test_SIRST3.txt", "w") as handle:
        handle.write("\n".join(side.names) + "\n")
    from_merged = list_split(str(tmp_path / "datasets"), "test", "SIRST3")
    assert from_merged.names == side.names and from_merged.sources == side.sources


def test_native_size_pads_to_one_shape_and_records_each_frames_size(sirst3_side_by_side):
    listing = list_split(str(sirst3_side_by_side), "test", "SIRST3")
    size = native_eval_size(listing)
    assert size == (64, 64)  # the largest frame (64 x 48) rounded up to a multiple of 32
    dataset = IRSTDDataset(str(sirst3_side_by_side), "test", train=False, listing=listing, native_size=size)
    for index in range(len(dataset)):
        item = dataset[index]
        width, height = SIZES[dataset.sources[index]]
        assert item["pixel_values"].shape == (3, 64, 64) and item["size"].tolist() == [height, width]
        truth = np.asarray(Image.open(os.path.join(dataset.roots[index], "masks", dataset.names[index] + ".png")))
        assert np.array_equal(item["mask"][0, :height, :width].numpy(), (truth > 127).astype(np.float32))
        assert item["mask"][0].sum() == (truth > 127).sum()  # the padding holds no target


def common_args(data, out, *extra):
    return ["--dataset_dir", data, "--output_dir", out, "--batch_size", 2, "--crop_size", 32, "--base_size", 32,
            "--seed", 0, "--report_to", "none", *extra]


def test_sirst3_run_scores_each_part_at_native_size_with_curve_and_table(sirst3_side_by_side, tmp_path, capsys):
    out, test_out = tmp_path / "run", tmp_path / "test"
    run_main_in_process(script, common_args(sirst3_side_by_side, out, "--dataset_name", "SIRST3",
                                            "--max_train_steps", 6, "--warm_epoch", 0))
    run_main_in_process(script, common_args(sirst3_side_by_side, test_out, "--dataset_name", "SIRST3", "--mode",
                                            "test", "--weight_path", out / "last", "--eval_batch_size", 4))
    metrics = json.load(open(test_out / "test_metrics.json"))
    assert metrics["eval_size"] == "native" and metrics["num_images"] == 6 and metrics["head"] == "fused"
    assert sorted(metrics["per_dataset"]) == sorted(SIRST3_PARTS)
    # Independently from the written masks (cropped to each frame's own size) and the ground truth.
    inter = union = 0
    for part in SIRST3_PARTS:
        part_inter = part_union = 0
        for name in NAMES[part][2:]:
            pred = np.asarray(Image.open(test_out / "predictions" / part / f"{name}.png")) > 127
            truth = np.asarray(Image.open(sirst3_side_by_side / part / "masks" / f"{name}.png")) > 127
            assert pred.shape == truth.shape == SIZES[part][::-1]
            part_inter += np.logical_and(pred, truth).sum()
            part_union += np.logical_or(pred, truth).sum()
        assert metrics["per_dataset"][part]["mIoU"] == pytest.approx(part_inter / part_union if part_union else None)
        assert metrics["per_dataset"][part]["num_images"] == 2
        inter, union = inter + part_inter, union + part_union
    assert metrics["mIoU"] == pytest.approx(inter / union)
    total_pixels = sum(2 * w * h for w, h in SIZES.values())
    assert metrics["Fa_1e-6"] == pytest.approx(1e6 * metrics["false_alarm_pixels"] / total_pixels)
    rows = list(csv.DictReader(open(test_out / "roc.csv")))
    assert [float(row["threshold"]) for row in rows] == pytest.approx([k / 10 for k in range(11)])
    half = rows[5]  # threshold 0.5 on the probability = logit > 0: the headline numbers
    assert float(half["mIoU"]) == pytest.approx(metrics["mIoU"]) and float(half["Pd"]) == pytest.approx(metrics["Pd"])
    assert os.path.getsize(test_out / "roc.png") > 1000
    table = open(test_out / "table_row.md").read()
    assert "| MSHNet (this run) | SIRST3 |" in table and "| MSHNet (this run) | NUDT-SIRST |" in table
    assert f"{100 * metrics['mIoU']:.2f}" in table
    assert "| MSHNet (README, published) | IRSTD-1K | 67.16 | - | 93.88 | 15.03 | - |" in table
    assert table.strip() in capsys.readouterr().out


def test_test_mode_scores_the_head_the_best_weights_were_selected_with(tmp_path):
    """All epochs in warm-up: best/ was scored with the main head; --mode test must reproduce best/metrics.json
    (it used to score the fused output of an untrained fusion layer)."""
    data = write_synthetic_irstd(str(tmp_path / "synth"), num_train=8, num_test=4, size=32, seed=0,
                                 snr_range=(20.0, 30.0))
    out, test_out = tmp_path / "run", tmp_path / "test"
    run_main_in_process(script, common_args(data, out, "--epochs", 2, "--warm_epoch", 5))
    best = json.load(open(out / "best" / "metrics.json"))
    assert best["head"] == "main" and best["eval_size"] == "32"
    assert json.load(open(out / "last" / "model_info.json"))["head"] == "main"
    for weights in ("best", "last"):
        run_main_in_process(script, common_args(data, test_out / weights, "--mode", "test",
                                                "--weight_path", out / weights))
        assert json.load(open(test_out / weights / "test_metrics.json"))["head"] == "main"
    tested = json.load(open(test_out / "best" / "test_metrics.json"))
    for key in ("mIoU", "nIoU", "nIoU_target_frames", "Pd", "Fa_1e-6", "F1"):
        assert tested[key] == pytest.approx(best[key], abs=1e-12)
    run_main_in_process(script, common_args(data, test_out / "fused", "--mode", "test", "--weight_path",
                                            out / "best", "--eval_head", "fused", "--metric_compat", "mshnet"))
    fused = json.load(open(test_out / "fused" / "test_metrics.json"))
    assert fused["head"] == "fused" and fused["metric_compat"] == "mshnet"


def test_weight_path_reads_the_reference_release_layouts_safely(tmp_path):
    """MSHNet's main.py saves a plain state dict (weight.pkl); its releases hold {"state_dict": ...} (.tar), some with
    DataParallel's `module.` prefix. All load to the same weights; a pickled object is refused, never executed."""
    import pickle

    import torch

    from utils.errors import UserError
    from utils.segmentation.mshnet import MSHNet

    torch.manual_seed(0)
    source = MSHNet(input_channels=3).state_dict()
    torch.save(source, tmp_path / "weight.pkl")
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.items()}, "epoch": 399}, tmp_path / "release.tar")
    torch.save({"net": source, "mean_IOU": 0.67}, tmp_path / "net.tar")
    for name in ("weight.pkl", "release.tar", "net.tar"):
        model = MSHNet(input_channels=3)
        script.load_weights(model, str(tmp_path / name))
        loaded = model.state_dict()
        assert all(torch.equal(loaded[key], source[key]) for key in source), name

    class Payload:  # what an unsafe torch.load would run on unpickling
        def __reduce__(self):
            return (open, (str(tmp_path / "executed"), "w"))

    with open(tmp_path / "evil.pkl", "wb") as handle:
        pickle.dump({"state_dict": Payload()}, handle)
    (tmp_path / "truncated.tar").write_bytes((tmp_path / "release.tar").read_bytes()[:1000])
    torch.save([1, 2, 3], tmp_path / "list.pkl")
    for name in ("evil.pkl", "truncated.tar", "list.pkl"):
        with pytest.raises(UserError, match=rf"--weight_path .*{name}"):
            script.load_weights(MSHNet(input_channels=3), str(tmp_path / name))
    assert not (tmp_path / "executed").exists()
