"""Aspect-ratio bucketing (--enable_bucket, kohya's flags): the buckets, the assignment from headers, the seeded
one-bucket batches (also as accelerate shards them over processes), and text-to-image runs on mixed sizes: SD and
SDXL (time ids = real size, crop and bucket), exact resume, cached = uncached, 2 processes."""

import json
import os
import types

import numpy as np
import pytest
import torch

import train_text_to_image
from tests.conftest import accelerate_launch, run_main_in_process, write_captioned_folder
from utils.buckets import BucketBatchSampler, assign_buckets, make_buckets


def losses(out):
    from utils.report import read_metrics

    values = read_metrics(str(out)).get("train/loss", {})
    return [values[step] for step in sorted(values)]


def bucket_args(**overrides):
    values = dict(resolution=32, min_bucket_reso=16, max_bucket_reso=64, bucket_reso_steps=8, bucket_no_upscale=False)
    return types.SimpleNamespace(**{**values, **overrides})


def test_buckets_follow_kohyas_rule():
    # resolution 32 (budget 1024 px), sides 16..64 in steps of 8: for each width w, the largest h (a multiple of 8,
    # at most 64) with w * h <= 1024, both ways round, plus the square.
    expected = {(32, 32), (16, 64), (64, 16), (24, 40), (40, 24), (48, 16), (16, 48), (56, 16), (16, 56)}
    assert set(make_buckets(32, 16, 64, 8)) == expected
    assert all(w * h <= 1024 and w % 8 == 0 and h % 8 == 0 for w, h in make_buckets(32, 16, 64, 8))


def test_assignment_by_aspect_ratio_and_no_upscale():
    sizes = [(64, 32), (32, 64), (48, 48), (200, 120), (17, 13)]
    assert assign_buckets(sizes, bucket_args()) == [(40, 24), (24, 40), (32, 32), (40, 24), (40, 24)]
    # no upscale: an image under the 32x32 budget keeps its own size (rounded down to the step)
    assert assign_buckets([(17, 13), (24, 16), (64, 32)], bucket_args(bucket_no_upscale=True)) == [
        (16, 8), (24, 16), (40, 24)]


def test_sampler_batches_one_bucket_each_seeded_by_epoch_and_sharded_whole():
    from accelerate.data_loader import BatchSamplerShard

    buckets = [(8, 8)] * 7 + [(16, 8)] * 5 + [(8, 16)] * 2
    sampler = BucketBatchSampler(buckets, 3, seed=1)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == 3 + 2 + 1
        assert sorted(i for b in batches for i in b) == list(range(14))  # every sample once per epoch
        assert all(len({buckets[i] for i in b}) == 1 for b in batches)  # never two buckets in a batch
    sampler.set_epoch(0)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first  # reshuffled per epoch
    sampler.set_epoch(0)
    assert list(sampler) == first and list(BucketBatchSampler(buckets, 3, seed=1)) == first  # a function of (seed, epoch)
    shards = [list(BatchSamplerShard(sampler, 2, rank, split_batches=False, even_batches=True)) for rank in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 3  # the epoch is balanced across the two processes
    assert all(len({buckets[i] for i in b}) == 1 for shard in shards for b in shard)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    write_captioned_folder(root, count=3, size=(32, 64), prefix="wide")  # (height, width)
    write_captioned_folder(root, count=3, size=(64, 32), seed=1, prefix="tall")
    write_captioned_folder(root, count=2, size=(48, 48), seed=2, prefix="square")
    return str(root)


def run_args(pipeline, data, out, steps, *extra):
    return ["--pretrained_model_name_or_path", pipeline, "--train_data_dir", data, "--resolution", "32",
            "--train_batch_size", "2", "--max_train_steps", str(steps), "--learning_rate", "1e-3",
            "--lr_warmup_steps", "0", "--report_to", "none", "--seed", "0", "--output_dir", str(out),
            "--enable_bucket", "--min_bucket_reso", "16", "--max_bucket_reso", "64", "--bucket_reso_steps", "8",
            *extra]


@pytest.mark.slow
def test_sdxl_buckets_batches_and_time_ids(tiny_sdxl_pipeline_dir, mixed, tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel

    calls = []
    original_forward = UNet2DConditionModel.forward

    def recording_forward(self, sample, *args, added_cond_kwargs=None, **kwargs):
        calls.append((tuple(sample.shape[-2:]), added_cond_kwargs["time_ids"].long().tolist()))
        return original_forward(self, sample, *args, added_cond_kwargs=added_cond_kwargs, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", recording_forward)
    out = tmp_path / "out"
    run_main_in_process(train_text_to_image, run_args(tiny_sdxl_pipeline_dir, mixed, out, 4, "--random_flip"))
    record = json.load(open(out / "buckets.json"))
    assert record["buckets"] == {"24x40": 3, "40x24": 3, "32x32": 2}
    assert record["assignment"]["wide0.png"] == "40x24" and record["assignment"]["tall0.png"] == "24x40"
    assert json.load(open(out / "run_info.json"))["buckets"]["images_per_bucket"] == record["buckets"]
    assert len(calls) == 4
    originals = {"40x24": [32, 64], "24x40": [64, 32], "32x32": [48, 48]}  # (height, width) of each bucket's images
    for (latent_h, latent_w), time_ids in calls:
        bucket = f"{latent_w * 2}x{latent_h * 2}"  # the tiny VAE halves each side
        for ids in time_ids:  # (original h, w, crop top, left, target h, w)
            assert ids[4:] == [latent_h * 2, latent_w * 2] and ids[:2] == originals[bucket]
            assert 0 <= ids[2] <= ids[0] and 0 <= ids[3]


@pytest.mark.slow
def test_bucketed_resume_is_exact_and_cache_equals_images(tiny_pipeline_dir, mixed, tmp_path):
    from safetensors.torch import load_file

    flags = ("--checkpointing_steps", "2", "--random_flip", "--center_crop", "--logging_steps", "1")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_main_in_process(train_text_to_image, run_args(tiny_pipeline_dir, mixed, straight, 5, *flags))
    run_main_in_process(train_text_to_image, run_args(tiny_pipeline_dir, mixed, resumed, 3, *flags))
    run_main_in_process(train_text_to_image, run_args(tiny_pipeline_dir, mixed, resumed, 5, *flags,
                                                      "--resume_from_checkpoint", "checkpoint-2"))
    a = load_file(straight / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(resumed / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

    cached = tmp_path / "cached"
    run_main_in_process(train_text_to_image, run_args(tiny_pipeline_dir, mixed, cached, 5, *flags, "--precompute"))

    assert len(losses(straight)) == 5
    np.testing.assert_allclose(losses(cached), losses(straight), rtol=1e-5)
    assert len([d for d in os.listdir(cached / "latent_cache") if d.startswith("latents-")]) == 3  # one per bucket


@pytest.mark.slow
def test_bucketed_two_processes(tiny_pipeline_dir, mixed, tmp_path):
    out = tmp_path / "two"
    accelerate_launch("train_text_to_image.py", run_args(tiny_pipeline_dir, mixed, out, 3), num_processes=2)
    assert (out / "unet").is_dir() and json.load(open(out / "buckets.json"))["buckets"]["32x32"] == 2


def test_bucket_flags_are_checked(tiny_pipeline_dir, mixed, tmp_path):
    from utils.errors import UserError

    with pytest.raises(UserError, match="--train_batch_size auto"):
        train_text_to_image.parse_args(run_args(tiny_pipeline_dir, mixed, tmp_path, 2, "--train_batch_size", "auto"))
    args = train_text_to_image.parse_args(run_args(tiny_pipeline_dir, mixed, tmp_path, 2, "--bucket_reso_steps", "6"))
    from utils.buckets import check_bucket_args

    with pytest.raises(UserError, match="multiple of 4"):
        check_bucket_args(args, 4)


@pytest.mark.slow
def test_mask_dit_buckets_crop_image_and_mask_together(tiny_pipeline_dir, tmp_path, monkeypatch):
    """Pairs of three shapes: every step's batch has one shape (tokens per side follow the bucket), the mask
    is cropped with its image, the run record lists the buckets, and a resume is exact."""
    from PIL import Image
    from safetensors.torch import load_file

    import train_mask_dit
    from utils.mask_dit.data import PairedImageMaskDataset
    from utils.mask_dit.nextdit import MaskNextDiT2DModel

    root = tmp_path / "pairs"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i, (height, width) in enumerate([(32, 64)] * 4 + [(64, 32)] * 4 + [(48, 48)] * 4):
        picture = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
        split = int(rng.integers(width // 4, 3 * width // 4))
        picture[:, :split, 0] = 255  # a bright red left part whose edge the mask follows: checkable after crops
        mask = np.zeros((height, width), dtype=np.uint8)
        mask[:, :split] = 1
        Image.fromarray(picture).save(root / "images" / f"{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"{i}.png")

    original_item = PairedImageMaskDataset.load_item

    def checked_item(self, index):
        item = original_item(self, index)
        if self.buckets is not None:
            width, height = self.target(index)
            assert item["pixel_values"].shape[-2:] == item["mask"].shape[-2:] == (height, width)
            red, mask = item["pixel_values"][0] > 0.5, item["mask"][0] > 0.5  # same crop and flip: they agree
            assert (red == mask).float().mean() > 0.9
        return item
    monkeypatch.setattr(PairedImageMaskDataset, "load_item", checked_item)
    shapes = []
    original_forward = MaskNextDiT2DModel.forward

    def recording_forward(self, sample, *args, **kwargs):
        shapes.append(tuple(sample.shape))
        return original_forward(self, sample, *args, **kwargs)
    monkeypatch.setattr(MaskNextDiT2DModel, "forward", recording_forward)

    def args(out, steps, *extra):
        return ["--train_data_dir", str(root), "--output_dir", str(out), "--model_size", "tiny", "--resolution", "32",
                "--mask_channels", "1", "--train_batch_size", "2", "--seed", "0", "--report_to", "none",
                "--max_train_steps", str(steps), "--validation_split", "0", "--validation_epochs", "0",
                "--num_validation_images", "0", "--enable_bucket", "--min_bucket_reso", "16",
                "--max_bucket_reso", "64", "--bucket_reso_steps", "8", "--random_crop", "--random_flip",
                "--checkpointing_steps", "2", "--lr_warmup_steps", "0", "--lr_scheduler", "constant", *extra]

    straight = tmp_path / "straight"
    run_main_in_process(train_mask_dit, args(straight, 5))
    assert len({s[-2:] for s in shapes}) >= 2 and len(shapes) == 5  # different buckets, one shape per batch
    info = json.load(open(straight / "run_info.json"))
    assert info["buckets"]["images_per_bucket"] == {"24x40": 4, "40x24": 4, "32x32": 4}
    cached = tmp_path / "cached"  # a latent cache per bucket trains exactly as the images
    vae = ("--vae_model_name_or_path", tiny_pipeline_dir, "--logging_steps", "1")
    run_main_in_process(train_mask_dit, args(cached, 5, "--cache_latents", *vae))
    assert len([d for d in os.listdir(cached / "latent_cache") if d.startswith("latents-")]) == 3
    run_main_in_process(train_mask_dit, args(tmp_path / "plain", 5, *vae))
    np.testing.assert_allclose(losses(cached), losses(tmp_path / "plain"), rtol=1e-5)

    resumed = tmp_path / "resumed"
    run_main_in_process(train_mask_dit, args(resumed, 2))
    run_main_in_process(train_mask_dit, args(resumed, 5, "--resume_from_checkpoint", "latest"))
    weights = [load_file(next(p for p in (d / "transformer").glob("*.safetensors"))) for d in (straight, resumed)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
