"""train_mask_dit.py: learning, exact resume, EMA, captions + VAE + pretrained, the YAML configs, the API."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO_ROOT, accelerate_launch, launch_env
from utils.mask_dit.data import (PairedImageMaskDataset, collate_pairs, scan_paired_folder,
                                 write_synthetic_fundus_dataset)

CONFIGS = ["mask_dit_ultrafast_256.yaml", "mask_dit_fast_512.yaml", "mask_dit_standard_1024.yaml"]


@pytest.fixture(scope="module")
def fundus_dir(tmp_path_factory):
    return write_synthetic_fundus_dataset(str(tmp_path_factory.mktemp("fundus")), 20, size=32, seed=0)


def tiny_run_args(data_dir, output_dir, *extra):
    return ["--train_data_dir", data_dir, "--output_dir", output_dir, "--model_size", "tiny", "--resolution", "32",
            "--mask_channels", "2", "--train_batch_size", "4", "--seed", "0", "--report_to", "tensorboard",
            "--num_inference_steps", "2", "--num_validation_images", "2", "--logging_steps", "1", *extra]


def test_warmup_cosine_schedule():
    from train_mask_dit import warmup_cosine

    factor = warmup_cosine(warmup_steps=10, total_steps=110, min_ratio=0.01)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.01 + 0.99 * 0.5)
    assert factor(110) == pytest.approx(0.01) and factor(500) == pytest.approx(0.01)
    assert warmup_cosine(10, 110, 0.0, cosine=False)(80) == 1.0


def test_loss_falls_on_synthetic_fundus(fundus_dir):
    from train_mask_dit import Conditioner, flow_step_loss, parse_args, step_generator
    from utils.mask_dit.nextdit import build_mask_nextdit

    args = parse_args(tiny_run_args(fundus_dir, "unused", "--mask_dropout_prob", "0"))
    torch.manual_seed(0)
    model = build_mask_nextdit("tiny", in_channels=3, mask_channels=2, sample_size=32)
    dataset = PairedImageMaskDataset(scan_paired_folder(fundus_dir), 16, 2)
    batch = collate_pairs([dataset[i] for i in range(8)])
    conditioner = Conditioner(args, None, None, None)
    fixed_t = torch.linspace(0.05, 0.95, 8)

    def held_loss():
        with torch.no_grad():
            return flow_step_loss(model, conditioner, batch, step_generator(0, 999, 0, 0, "cpu"), args, fixed_t, False).item()

    before = held_loss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(30):
        loss = flow_step_loss(model, conditioner, batch, step_generator(0, step, 0, 0, "cpu"), args)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = held_loss()
    assert after < 0.6 * before, (before, after)


def _final_weights(output_dir):
    return load_file(os.path.join(output_dir, "transformer", "diffusion_pytorch_model.safetensors"))


@pytest.mark.slow
def test_resume_mid_epoch_equals_one_run_and_pipeline_api(fundus_dir, tmp_path):
    # 18 training pairs / batch 4 = 5 steps per epoch: checkpoint-3 is mid-epoch and the run crosses an epoch.
    common = ["--max_train_steps", "7", "--checkpointing_steps", "3", "--use_ema", "--ema_decay", "0.9",
              "--validation_steps", "2", "--validation_epochs", "1", "--random_crop", "--random_flip",
              "--learning_rate", "1e-3", "--lr_warmup_steps", "2", "--min_lr", "1e-5", "--sample_ratio", "1.0"]
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    accelerate_launch("train_mask_dit.py", tiny_run_args(fundus_dir, full, *common))
    result = accelerate_launch("train_mask_dit.py", tiny_run_args(
        fundus_dir, resumed, *common, "--resume_from_checkpoint", os.path.join(full, "checkpoint-3")))
    assert "Resumed from" in result.stderr + result.stdout
    expected, actual = _final_weights(full), _final_weights(resumed)
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected), "resume diverged from the uninterrupted run"

    # The EMA is checkpointed and the final weights are the EMA weights (they differ from the raw ones).
    assert os.path.isdir(os.path.join(full, "checkpoint-6", "transformer_ema"))
    raw = load_file(os.path.join(full, "checkpoint-6", "transformer", "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(raw[k], expected[k]) for k in raw)

    # Validation artefacts: sample grids (mask | ground truth | sample) and the metrics in the log.
    samples = os.listdir(os.path.join(full, "samples"))
    assert any(name.startswith("mask_gt_sample_step_") for name in samples)
    log = result.stderr + result.stdout
    for metric in ("val/loss", "val/psnr", "val/ssim", "val/mask_iou", "val/mask_iou_ground_truth"):
        assert metric in log

    # The generate.py-facing API.
    from utils.mask_dit.nextdit import is_mask_dit_dir
    from utils.mask_dit.pipeline import generate_from_mask, load_mask_dit_pipeline

    assert is_mask_dit_dir(full)
    pipeline = load_mask_dit_pipeline(full, device="cpu")
    mask = torch.zeros(2, 2, 64, 64)
    mask[:, 0, 20:40] = 1
    images = generate_from_mask(pipeline, mask, None, steps=3, guidance_scale=1.0, mask_guidance_scale=2.0, seed=1,
                                sampler="midpoint")
    assert images.shape == (2, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    again = generate_from_mask(pipeline, mask, None, steps=3, guidance_scale=1.0, mask_guidance_scale=2.0, seed=1,
                               sampler="midpoint")
    assert torch.equal(images, again)


@pytest.mark.slow
def test_captions_vae_and_finetune_from_lumina(fundus_dir, tiny_pipeline_dir, tmp_path):
    from diffusers import LuminaNextDiT2DModel

    # A tiny Lumina-Next transformer that fits the tiny SD pipeline's VAE (4 latent channels) and CLIP (width 32).
    torch.manual_seed(0)
    LuminaNextDiT2DModel(sample_size=16, patch_size=2, in_channels=4, hidden_size=32, num_layers=1,
                         num_attention_heads=2, num_kv_heads=2, multiple_of=16, cross_attention_dim=32).save_pretrained(tmp_path / "lumina")
    output = str(tmp_path / "out")
    accelerate_launch("train_mask_dit.py", tiny_run_args(
        fundus_dir, output, "--max_train_steps", "2", "--validation_steps", "2", "--validation_epochs", "0",
        "--pretrained_model_name_or_path", str(tmp_path / "lumina"), "--vae_model_name_or_path", tiny_pipeline_dir,
        "--text_encoder_name_or_path", tiny_pipeline_dir, "--caption_dropout_prob", "0.5",
        "--guidance_scale", "3.0", "--mask_guidance_scale", "1.5"))
    for folder in ("transformer", "vae", "tokenizer", "text_encoder"):
        assert os.path.isdir(os.path.join(output, folder)), folder
    settings = json.load(open(os.path.join(output, "mask_dit_config.json")))
    assert settings["vae_downsample"] == 2 and settings["resolution"] == 32

    from utils.mask_dit.pipeline import generate_from_mask, load_mask_dit_pipeline

    pipeline = load_mask_dit_pipeline(output, device="cpu")
    assert pipeline.transformer.config.caption_dim == 32 and pipeline.transformer.config.mask_channels == 2
    images = generate_from_mask(pipeline, torch.rand(2, 2, 32, 32).round(), ["a fundus photograph", "optic disc"],
                                steps=2, guidance_scale=3.0, mask_guidance_scale=1.5, seed=0, sampler="euler")
    assert images.shape == (2, 3, 32, 32)


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS)
def test_yaml_config_runs_two_steps_at_tiny_size(config, fundus_dir, tiny_pipeline_dir, tmp_path):
    """Each guide-003 planning point parses and trains (bf16, its schedule) with the tiny model."""
    from train_mask_dit import parse_args

    path = os.path.join(REPO_ROOT, "configs", config)
    args = parse_args(["--config", path, "--train_data_dir", fundus_dir])
    assert args.mixed_precision == "bf16" and args.max_grad_norm == 1.0 and args.min_lr == 1e-6
    assert args.lr_warmup_steps == 200 and args.loss_weighting == "uniform" and args.timestep_sampling == "uniform"
    overrides = tiny_run_args(fundus_dir, str(tmp_path / "out"), "--max_train_steps", "2", "--validation_epochs", "0",
                              "--num_validation_images", "0", "--dataloader_num_workers", "0")
    if args.vae_model_name_or_path:  # the Hub VAE is not reachable offline: the tiny one stands in
        overrides += ["--vae_model_name_or_path", tiny_pipeline_dir]
    cmd = [sys.executable, os.path.join(REPO_ROOT, "train_mask_dit.py"), "--config", path, *overrides]
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=launch_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert os.path.isfile(tmp_path / "out" / "mask_dit_config.json")


@pytest.mark.slow
def test_early_stopping_on_validation_loss(fundus_dir, tmp_path):
    # An impossible min_delta means no validation ever improves: stop after `patience` validations.
    cmd = [sys.executable, os.path.join(REPO_ROOT, "train_mask_dit.py"), *tiny_run_args(
        fundus_dir, str(tmp_path / "out"), "--max_train_steps", "50", "--validation_steps", "1", "--validation_epochs",
        "0", "--num_validation_images", "0", "--early_stopping_patience", "2", "--early_stopping_min_delta", "1e9")]
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=launch_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Early stopping" in result.stderr
    state = json.load(open(tmp_path / "out" / "checkpoint-3" / "training_state.json"))
    assert state["global_step"] == 3 and state["validations_without_improvement"] == 2
