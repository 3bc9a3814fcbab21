"""DeepSpeed ZeRO-2 (accelerate_configs/deepspeed_zero2.yaml) with the trainers, on DeepSpeed's CPU accelerator.

One process, bf16 as the config sets it. What is checked: the run trains (DeepSpeed's bf16 casts the weights, our
forward autocast casts the inputs), its logged losses and gradient norms match the same run without DeepSpeed to
the printed digits, and a run resumed from the save at step 2 of 4 logs the same losses and ends with the same
weights, bit for bit, as the run that was not interrupted (EMA included for text-to-image).
"""

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO_ROOT, accelerate_launch, launch_env, write_captioned_folder

pytest.importorskip("deepspeed", reason="deepspeed is installed by `make setup` (pip install --no-build-isolation)")

CONFIG = os.path.join(REPO_ROOT, "accelerate_configs", "deepspeed_zero2.yaml")
# The config's own process count is 8 (a GPU node); accelerate's flags override it, and DeepSpeed's CPU accelerator
# is used where there is no GPU (DS_ACCELERATOR=cpu makes that explicit).
LAUNCH = ["--config_file", CONFIG, "--num_processes", "1", "--num_machines", "1"]


def run(script, output_dir, args, monitor_dir):
    os.makedirs(monitor_dir, exist_ok=True)
    env = dict(launch_env(), DS_ACCELERATOR="cpu", TRAIN_DEBUG_MONITOR_DIR=str(monitor_dir))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *LAUNCH, os.path.join(REPO_ROOT, script),
           "--output_dir", str(output_dir), *map(str, args)]
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def logged(monitor_dir, key):
    with open(os.path.join(monitor_dir, "rank0.jsonl"), encoding="utf-8") as handle:
        return [entry[key] for entry in map(json.loads, handle) if key in entry]


def weights(folder):
    return load_file(glob.glob(os.path.join(folder, "*.safetensors"))[0])


def assert_resume_is_exact(tmp_path, script, args, weight_folders):
    """4 steps straight vs 2 steps, saved, then resumed to 4 from a copy of that save: same losses, same weights."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = run(script, straight, [*args, "--max_train_steps", 4, "--checkpointing_steps", 2], tmp_path / "m1")
    assert "DeepSpeed" in result.stdout + result.stderr  # the engine really ran
    assert os.path.isdir(straight / "checkpoint-2" / "pytorch_model"), "no DeepSpeed checkpoint folder was written"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    run(script, resumed, [*args, "--max_train_steps", 4, "--checkpointing_steps", 2, "--resume_from_checkpoint",
                          "latest"], tmp_path / "m2")
    losses = logged(tmp_path / "m1", "loss")
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert logged(tmp_path / "m2", "loss") == losses[2:]
    for folder in weight_folders:
        a, b = weights(straight / folder), weights(resumed / folder)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder
    return losses


def test_text_to_image_zero2_resumes_bitwise_with_ema(tmp_path, tiny_pipeline_dir):
    (tmp_path / "data").mkdir()
    data = write_captioned_folder(tmp_path / "data", count=8, size=(32, 32))
    args = ["--pretrained_model_name_or_path", tiny_pipeline_dir, "--train_data_dir", data, "--resolution", 32,
            "--train_batch_size", 2, "--learning_rate", 1e-4, "--lr_warmup_steps", 0, "--seed", 0, "--report_to",
            "none", "--logging_steps", 1, "--use_ema"]
    assert_resume_is_exact(tmp_path, "train_text_to_image.py", args, ["unet", "checkpoint-4/unet_ema"])
    grad_norms = logged(tmp_path / "m1", "grad_norm")  # DeepSpeed engine's global norm, before its clipping
    assert len(grad_norms) == 4 and all(g > 0 for g in grad_norms)
    # The final weights are the EMA's fp32 copy; the engine's own module is bf16.
    assert {t.dtype for t in weights(tmp_path / "straight" / "unet").values()} == {torch.float32}


def test_mask_dit_zero2_matches_plain_bf16_and_resumes_bitwise(tmp_path):
    """Against the same 4 steps without DeepSpeed (accelerate's bf16 autocast, fp32 weights): the same losses and
    gradient norms to within bf16's rounding (only where it happens differs). The tight --max_grad_norm shows the
    script's clipping reached DeepSpeed: with DeepSpeed's config value (1.0) instead, step 3's norm is 0.7% off."""
    from utils.mask_dit.data import write_synthetic_fundus_dataset

    data = write_synthetic_fundus_dataset(str(tmp_path / "fundus"), 16, size=32, seed=0)
    args = ["--train_data_dir", data, "--model_size", "cpu_demo", "--resolution", 32, "--mask_channels", 2,
            "--train_batch_size", 4, "--seed", 0, "--report_to", "none", "--logging_steps", 1, "--learning_rate", 3e-3,
            "--lr_warmup_steps", 0, "--max_grad_norm", 0.05]
    assert_resume_is_exact(tmp_path, "train_mask_dit.py", args, ["transformer"])
    os.makedirs(tmp_path / "m3")
    accelerate_launch("train_mask_dit.py", [*args, "--max_train_steps", 4, "--mixed_precision", "bf16",
                                            "--output_dir", tmp_path / "plain"],
                      env=dict(launch_env(), TRAIN_DEBUG_MONITOR_DIR=str(tmp_path / "m3")))
    for key in ("loss", "grad_norm"):
        deepspeed, plain = logged(tmp_path / "m1", key), logged(tmp_path / "m3", key)
        assert len(plain) == 4 and max(abs(a - b) / abs(b) for a, b in zip(deepspeed, plain)) < 3e-3, (key, deepspeed,
                                                                                                      plain)
