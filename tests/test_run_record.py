"""utils/run_record.py and utils/report.py: every script writes run_info.json (a copy in each checkpoint,
resumes appended, no secrets: text-to-image gets a --hub_token) and report/training_curves.png, with
--report_to none too."""

import json
import os

import pytest
from PIL import Image

from conftest import run_main_in_process, write_captioned_folder
from utils.report import read_metrics, smoothed, write_report

TOKEN = "hf_runrecordsecret0123456789"


def text_to_image_case(tmp_path, tiny_pipeline_dir):
    import train_text_to_image as script

    (tmp_path / "data").mkdir()
    data = write_captioned_folder(tmp_path / "data", count=4, size=(32, 32))
    return script, ["--pretrained_model_name_or_path", tiny_pipeline_dir, "--train_data_dir", data, "--resolution",
                    "32", "--train_batch_size", "2", "--lr_warmup_steps", "0", "--validation_prompts", "a thing",
                    "--validation_steps", "2", "--validation_inference_steps", "1", "--hub_token", TOKEN]


def mask_dit_case(tmp_path, _):
    import train_mask_dit as script
    from utils.mask_dit.data import write_synthetic_fundus_dataset

    data = write_synthetic_fundus_dataset(str(tmp_path / "fundus"), 8, size=32, seed=0)
    return script, ["--train_data_dir", data, "--model_size", "tiny", "--resolution", "32", "--mask_channels", "2",
                    "--train_batch_size", "2", "--num_inference_steps", "1", "--num_validation_images", "1",
                    "--validation_steps", "2"]


def segmentation_case(tmp_path, _):
    import train_segmentation_tpu as script
    from utils.segmentation.data import write_synthetic_irstd

    data = write_synthetic_irstd(str(tmp_path / "irstd"), num_train=8, num_test=2, size=32, seed=0)
    return script, ["--dataset_dir", data, "--batch_size", "2", "--crop_size", "32", "--base_size", "32",
                    "--warm_epoch", "0"]


@pytest.mark.parametrize("case", [text_to_image_case, mask_dit_case, segmentation_case],
                         ids=["train_text_to_image", "train_mask_dit", "train_segmentation_tpu"])
def test_run_info_and_report_for_a_run_and_its_resume(case, tmp_path, tiny_pipeline_dir):
    script, argv = case(tmp_path, tiny_pipeline_dir)
    output_dir = str(tmp_path / "out")
    common = argv + ["--output_dir", output_dir, "--seed", "0", "--report_to", "none", "--logging_steps", "1",
                     "--checkpointing_steps", "2"]
    run_main_in_process(script, common + ["--max_train_steps", "2"])
    info = json.load(open(os.path.join(output_dir, "run_info.json")))
    assert info["script"] == os.path.basename(script.__file__) and info["steps_done"] == 2 and info["finished"]
    assert info["args"]["max_train_steps"] == 2 and info["args"]["seed"] == 0 and info["seed"] == 0
    assert info["world_size"] == 1 and info["versions"]["torch"] and info["versions"]["accelerate"]
    assert info["data_fingerprint"] and "commit" in info["git"] and info["resumes"] == []
    assert "train/loss" in info["final_metrics"]
    in_checkpoint = json.load(open(os.path.join(output_dir, "checkpoint-2", "run_info.json")))
    assert in_checkpoint["steps_done"] == 2 and in_checkpoint["data_fingerprint"] == info["data_fingerprint"]
    if script.__name__ == "train_text_to_image":  # the model card carries the run's key facts
        card = open(os.path.join(output_dir, "README.md")).read()
        assert info["git"]["commit"] in card if info["git"]["commit"] else "| code | unknown |" in card
        assert "training data fingerprint" in card and info["data_fingerprint"] in card
    report = os.path.join(output_dir, "report", "training_curves.png")
    assert Image.open(report).size[0] > 300

    run_main_in_process(script, common + ["--max_train_steps", "4", "--resume_from_checkpoint", "latest"])
    info = json.load(open(os.path.join(output_dir, "run_info.json")))
    assert info["steps_done"] == 4 and len(info["resumes"]) == 1
    assert info["resumes"][0]["step"] == 2 and info["resumes"][0]["from_checkpoint"].endswith("checkpoint-2")
    assert info["args"]["max_train_steps"] == 2 and info["resumes"][0]["args"]["max_train_steps"] == 4
    assert sorted(read_metrics(output_dir)["train/loss"]) == [1, 2, 3, 4]
    for folder, _, files in os.walk(output_dir):
        for name in files:
            with open(os.path.join(folder, name), "rb") as handle:
                assert TOKEN.encode() not in handle.read(), os.path.join(folder, name)


def test_report_draws_loss_lr_grad_norm_and_validation_metrics(tmp_path):
    os.makedirs(tmp_path / "report")
    with open(tmp_path / "report" / "metrics.jsonl", "w") as handle:
        for step in range(1, 11):
            handle.write(json.dumps({"step": step, "train/loss": 1.0 / step, "train/lr": 1e-4,
                                     "train/grad_norm": 0.5}) + "\n")
        handle.write(json.dumps({"step": 10, "eval/mIoU": 0.25}) + "\n")
        handle.write('{"step": 11, "train/lo')  # a line cut by a kill is skipped
    path = write_report(str(tmp_path), "test")
    assert path and Image.open(path).size[0] > 300
    assert read_metrics(str(tmp_path))["eval/mIoU"] == {10: 0.25}
    assert write_report(str(tmp_path / "empty"), "nothing logged") is None


def test_smoothing_is_debiased():
    assert smoothed([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
    assert smoothed([0.0, 10.0])[1] == pytest.approx(10 * 0.1 / (1 - 0.81))
