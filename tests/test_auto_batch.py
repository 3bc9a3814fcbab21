"""utils/auto_batch.py: the probe finds the largest fitting batch (OOM errors and memory caps),
keeps the effective batch with accumulation, and leaves the RNG untouched."""

import contextlib
import json
import os
import types

import pytest
import torch
from conftest import accelerate_launch

from utils.auto_batch import (PeakMemory, batch_size_arg, find_max_batch_size, make_probe_step, optimizer_state_bytes,
                              parse_bytes, plan_accumulation)


def oom_above(limit, calls):
    def step(batch_size):
        calls.append(batch_size)
        if batch_size > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {batch_size} GiB")
    return step


@pytest.mark.parametrize("limit", [1, 2, 37, 64, 100])
def test_finds_the_largest_batch_below_an_oom(limit):
    calls = []
    assert find_max_batch_size(oom_above(limit, calls), max_batch_size=1000, measure=False) == limit
    assert len(calls) <= 2 * 10 + 1  # doubling then bisection, not a linear scan


def test_respects_the_upper_bound_and_reraises_other_errors():
    assert find_max_batch_size(oom_above(10**6, []), max_batch_size=24, measure=False) == 24

    def broken(batch_size):
        raise RuntimeError("shape mismatch")
    with pytest.raises(RuntimeError, match="shape mismatch"):
        find_max_batch_size(broken, measure=False)
    with pytest.raises(RuntimeError, match="even a batch of 1"):
        find_max_batch_size(oom_above(0, []), measure=False)


def test_cpu_memory_cap_with_real_allocations():
    meter = PeakMemory("cpu")
    base = meter.current()
    mib = 2**20

    def step(batch_size):  # 8 MiB per sample, touched so it is resident
        block = torch.ones(batch_size * 2 * mib)
        del block
    cap = base + 100 * mib
    found = find_max_batch_size(step, max_batch_size=256, max_memory_bytes=cap, device="cpu")
    assert 6 <= found <= 12, found
    assert find_max_batch_size(step, max_batch_size=256, max_memory_bytes=base + 400 * mib, device="cpu") > found


def test_probe_does_not_change_the_random_stream():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    find_max_batch_size(lambda b: torch.randn(b, 5), max_batch_size=8, measure=False)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("fit, effective, processes, expected", [
    (48, 256, 1, (32, 8)), (64, 64, 1, (64, 1)), (100, 64, 1, (64, 1)), (4, 7, 1, (4, 2)),
    (16, 64, 2, (16, 2)), (5, 12, 1, (4, 3)),
])
def test_plan_accumulation_keeps_the_effective_batch(fit, effective, processes, expected):
    batch, accumulation = plan_accumulation(fit, effective, processes)
    assert (batch, accumulation) == expected
    assert batch <= fit and batch * accumulation * processes >= effective


def test_probe_with_a_real_unet_under_a_memory_cap():
    from utils.sd.builder import build_components

    unet = build_components("tiny", resolution=32, seed=0)["unet"]
    accelerator = types.SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext)
    example = {"sample": torch.randn(4, 16, 16), "states": torch.randn(77, 32), "caption": "x"}

    def loss_fn(batch):
        timesteps = torch.zeros(len(batch["sample"]), dtype=torch.long)
        return unet(batch["sample"], timesteps, batch["states"], return_dict=False)[0].pow(2).mean()

    def collate(items):
        return {"sample": torch.stack([i["sample"] for i in items]), "states": torch.stack([i["states"] for i in items])}
    step = make_probe_step(accelerator, loss_fn, example, collate, [unet])
    meter = PeakMemory("cpu")
    meter.reset()
    step(16)
    per_16 = meter.peak() - meter.current()
    assert all(p.grad is None for p in unet.parameters())
    uncapped = find_max_batch_size(step, max_batch_size=16, device="cpu")
    capped = find_max_batch_size(step, max_batch_size=16, max_memory_bytes=meter.current() + per_16 // 4, device="cpu")
    assert uncapped == 16 and 1 <= capped < 16
    assert optimizer_state_bytes(unet.parameters()) == 8 * sum(p.numel() for p in unet.parameters())


def test_argument_parsing():
    assert batch_size_arg("auto") == "auto" and batch_size_arg("AUTO") == "auto" and batch_size_arg("8") == 8
    with pytest.raises(ValueError, match="positive integer or 'auto'"):
        batch_size_arg("big")
    assert parse_bytes("12GB") == 12 * 2**30 and parse_bytes("512MiB") == 512 * 2**20 and parse_bytes("1e9") == 10**9
    with pytest.raises(ValueError, match="memory size"):
        parse_bytes("lots")


@pytest.mark.slow
def test_script_with_auto_batch_size(tmp_path, tiny_pipeline_dir):
    from benchmarks.bench_text_to_image import make_imagefolder

    data = make_imagefolder(str(tmp_path / "data"), 6, 40)
    assert len(data) == 6
    accelerate_launch("train_text_to_image.py", [
        "--pretrained_model_name_or_path", tiny_pipeline_dir, "--train_data_dir", str(tmp_path / "data"), "--resolution", "32",
        "--center_crop", "--train_batch_size", "auto", "--auto_batch_max", "4", "--effective_batch_size", "8",
        "--max_train_steps", "1", "--output_dir", str(tmp_path / "out"), "--checkpointing_steps", "100", "--report_to", "none",
        "--cache_latents"])
    saved = json.load(open(tmp_path / "out" / "training_args.json"))
    assert saved["train_batch_size"] == "auto" and saved["gradient_accumulation_steps"] == 1  # the flags as given
    assert saved["plan"]["batch_size"] == 4 and saved["plan"]["gradient_accumulation_steps"] == 2  # what ran


@pytest.mark.slow
def test_mask_dit_with_auto_batch_size(tmp_path):
    """train_mask_dit.py probes its own flow-matching loss; the effective batch is kept through accumulation."""
    from utils.mask_dit.data import write_synthetic_fundus_dataset

    data = write_synthetic_fundus_dataset(str(tmp_path / "fundus"), 8, size=32, seed=0)
    result = accelerate_launch("train_mask_dit.py", [
        "--train_data_dir", data, "--output_dir", str(tmp_path / "out"), "--model_size", "tiny", "--resolution", "32",
        "--mask_channels", "2", "--train_batch_size", "auto", "--auto_batch_max", "4", "--effective_batch_size", "8",
        "--max_train_steps", "1", "--report_to", "none", "--num_validation_images", "0", "--validation_epochs", "0"])
    assert "--train_batch_size auto: 4 fits; using batch 4 x accumulation 2 x 1 process(es)" in result.stderr + result.stdout
    assert os.path.isfile(tmp_path / "out" / "transformer" / "diffusion_pytorch_model.safetensors")


@pytest.mark.slow
def test_segmentation_auto_batch_trains_exactly_like_the_number_it_picks(tmp_path):
    """--batch_size auto in train_segmentation_tpu.py: the probe (real MSHNet steps) leaves no trace:
    BatchNorm running statistics are restored, so the run equals one given the chosen batch and
    accumulation explicitly, bitwise."""
    from safetensors.torch import load_file

    from utils.segmentation.data import write_synthetic_irstd

    data = write_synthetic_irstd(str(tmp_path / "irstd"), num_train=16, num_test=2, size=32, seed=0)
    common = ["--dataset-dir", data, "--crop-size", "32", "--base-size", "32", "--warm_epoch", "0", "--seed", "0",
              "--max_train_steps", "2", "--report_to", "none", "--eval_epochs", "1000"]
    auto = accelerate_launch("train_segmentation_tpu.py", common + [
        "--batch_size", "auto", "--auto_batch_max", "4", "--effective_batch_size", "8", "--output_dir", str(tmp_path / "auto")])
    assert "--train_batch_size auto: 4 fits; using batch 4 x accumulation 2 x 1 process(es)" in auto.stderr + auto.stdout
    accelerate_launch("train_segmentation_tpu.py", common + [
        "--batch_size", "4", "--gradient_accumulation_steps", "2", "--output_dir", str(tmp_path / "fixed")])
    trained, fixed = (load_file(tmp_path / run / "last" / "model.safetensors") for run in ("auto", "fixed"))
    assert trained.keys() == fixed.keys() and any("running_mean" in key for key in trained)
    for key in trained:
        assert torch.equal(trained[key], fixed[key]), key
