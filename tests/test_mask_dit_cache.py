"""train_mask_dit.py with --cache_latents / --cache_text_embeddings (utils/cache.py, "Mask DiT"):
the cache replays the dataset's crops, flips and masks, training from it gives the losses training
from images gives, it is reused and rebuilt when an input changes, and the encoders leave the device."""

import contextlib
import glob
import json
import os
import types

import numpy as np
import pytest
import torch
from conftest import accelerate_launch, count_builds, run_main_in_process
from PIL import Image

from utils import cache
from utils.cache import CacheSettings
from utils.mask_dit.cache import CachedPairedDataset, CaptionEncoding, cache_paired_datasets
from utils.mask_dit.data import (PairedImageMaskDataset, collate_pairs, scan_paired_folder,
                                 write_synthetic_fundus_dataset)
from utils.cache import collate_cached

CPU_ACCELERATOR = types.SimpleNamespace(device=torch.device("cpu"), main_process_first=contextlib.nullcontext,
                                        local_main_process_first=contextlib.nullcontext)


def write_pairs(root, sizes=((40, 32), (32, 46), (36, 36), (50, 34), (32, 32), (44, 40))):
    """Pairs of (width, height) `sizes` whose image and mask are left/right asymmetric (a wrong flip shows)."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    os.makedirs(os.path.join(root, "masks"), exist_ok=True)
    rng = np.random.default_rng(0)
    with open(os.path.join(root, "metadata.jsonl"), "w", encoding="utf-8") as metadata:
        for index, (width, height) in enumerate(sizes):
            image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
            mask = np.zeros((height, width), np.uint8)
            mask[:, : width // 3] = 1
            mask[height // 2:, width // 2: width // 2 + 5] = 2
            Image.fromarray(image).save(os.path.join(root, "images", f"{index}.png"))
            Image.fromarray(mask).save(os.path.join(root, "masks", f"{index}.png"))
            metadata.write(json.dumps({"file_name": f"{index}.png", "text": f"pair {index % 3}"}) + "\n")
    return str(root)


@pytest.fixture(scope="module")
def encoders(tiny_pipeline_dir):
    from utils.mask_dit.pipeline import load_vae
    from utils.text_encoders import load_text_encoder

    tokenizer, text_encoder = load_text_encoder(tiny_pipeline_dir)
    return load_vae(tiny_pipeline_dir), tokenizer, text_encoder


def cache_args(cache_dir, latents=True, text=True, **overrides):
    return types.SimpleNamespace(**{
        "cache_latents": latents, "cache_text_embeddings": text, "latent_cache_dir": str(cache_dir), "cache_batch_size": 4,
        "caption_dropout_prob": 0.5, "mask_dropout_prob": 0.3, "max_caption_length": 16, "caption_hidden_layer": -1,
        **overrides})


def cache_with_flags(datasets, vae, tokenizer, text_encoder, args):
    """cache_paired_datasets with the typed settings of a flags namespace, on the CPU."""
    return cache_paired_datasets(datasets, vae, tokenizer, text_encoder, CacheSettings.from_args(args),
                                 CaptionEncoding.from_args(args), CPU_ACCELERATOR)


def pairs(folder, resolution=32, random_crop=True, random_flip=True, seed=3):
    return PairedImageMaskDataset(scan_paired_folder(folder), resolution, 2, random_crop, random_flip, seed=seed)


def test_cache_replays_the_datasets_crops_flips_masks_and_captions(tmp_path, encoders):
    from utils.mask_dit.pipeline import encode_captions

    vae, tokenizer, text_encoder = encoders
    folder = write_pairs(tmp_path / "data")
    dataset = pairs(folder)
    (cached,), empty_caption = cache_with_flags([dataset], vae, tokenizer, text_encoder, cache_args(tmp_path / "cache"))
    assert isinstance(cached, CachedPairedDataset)
    assert cached.text.manifest["captions"] == ["", "pair 0", "pair 1", "pair 2"]  # dropout > 0: "" is cached too
    expected_empty = encode_captions(tokenizer, text_encoder, [""], 16)
    assert torch.equal(empty_caption[1], expected_empty[1][0])
    torch.testing.assert_close(empty_caption[0], expected_empty[0][0], rtol=1e-5, atol=1e-6)
    unflipped, epoch0 = pairs(folder, random_flip=False), pairs(folder, random_flip=False)
    flips = set()
    for epoch in range(4):
        cached.set_epoch(epoch)
        dataset.set_epoch(epoch)
        unflipped.set_epoch(epoch)
        for index in range(len(dataset)):
            got, first = cached[index], epoch0[index]
            assert "pixel_values" not in got and got["caption"] == dataset[index]["caption"]
            # The flip drawn this epoch (after this epoch's crop draw), applied to the epoch-0 crop.
            flip = not torch.equal(dataset[index]["mask"], unflipped[index]["mask"])
            flips.add(flip)
            assert torch.equal(got["mask"], first["mask"].flip(-1) if flip else first["mask"])
            pixels = first["pixel_values"].flip(-1) if flip else first["pixel_values"]
            with torch.no_grad():
                dist = vae.encode(pixels[None]).latent_dist
            torch.testing.assert_close(got["latent_mean"], dist.mean[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got["latent_std"], dist.std[0], rtol=1e-5, atol=1e-6)
            embedding, attention_mask = encode_captions(tokenizer, text_encoder, [got["caption"]], 16)
            torch.testing.assert_close(got["caption_embedding"], embedding[0], rtol=1e-5, atol=1e-6)
            assert torch.equal(got["caption_mask"], attention_mask[0])
        if epoch == 0:  # epoch 0: the very items of the dataset
            assert all(torch.equal(cached[i]["mask"], dataset[i]["mask"]) for i in range(len(dataset)))
    assert flips == {True, False}


def test_conditioner_gives_the_same_inputs_from_the_cache(tmp_path, encoders):
    from train_mask_dit import Conditioner, step_generator

    vae, tokenizer, text_encoder = encoders
    dataset = PairedImageMaskDataset(scan_paired_folder(write_synthetic_fundus_dataset(str(tmp_path / "data"), 6, size=32)),
                                     32, 2, random_flip=True, seed=0)
    args = cache_args(tmp_path / "cache", caption_dropout_prob=0.5)
    (cached,), empty_caption = cache_with_flags([dataset], vae, tokenizer, text_encoder, args)
    from_images = Conditioner(args, vae, tokenizer, text_encoder)
    from_cache = Conditioner(args, vae, tokenizer, text_encoder, empty_caption)
    dropped = []
    for epoch in range(3):
        dataset.set_epoch(epoch)
        cached.set_epoch(epoch)
        batch = collate_pairs([dataset[i] for i in range(len(dataset))])
        cached_batch = collate_cached([cached[i] for i in range(len(dataset))])
        expected = from_images(batch, step_generator(0, epoch, 0, 0, "cpu"))
        got = from_cache(cached_batch, step_generator(0, epoch, 0, 0, "cpu"))
        for name, want, have in zip(["target", "mask", "mask_keep", "caption", "caption_mask"], expected, got):
            torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-5, msg=name)
        dropped += [torch.equal(row, empty_caption[0].float()) for row in got[3]]
    assert True in dropped and False in dropped  # caption dropout swapped in the cached "" embedding


def test_cache_is_reused_and_rebuilt_when_anything_changes(tmp_path, encoders, monkeypatch):
    vae, tokenizer, text_encoder = encoders
    folder = write_pairs(tmp_path / "data")
    builds = count_builds(monkeypatch)

    def build(dataset=None, **arg_overrides):
        (cached,), _ = cache_with_flags([dataset or pairs(folder)], vae, tokenizer, text_encoder,
                                             cache_args(tmp_path / "cache", **arg_overrides))
        return os.path.basename(cached.latents.directory), os.path.basename(cached.text.directory)

    first = build()
    assert len(builds) == 2
    assert build() == first and len(builds) == 2  # same inputs: reused, nothing encoded
    resized = build(pairs(folder, resolution=16))
    assert resized[0] != first[0] and resized[1] == first[1] and len(builds) == 3  # new latents, same captions
    assert build(pairs(folder, random_flip=False))[0] != first[0]
    assert build(pairs(folder, random_crop=False))[0] != first[0]
    assert build(pairs(folder, seed=4))[0] != first[0]  # random crops depend on the seed
    assert build(pairs(folder, random_crop=False, seed=4))[0] == build(pairs(folder, random_crop=False))[0]
    before = len(builds)
    assert build(max_caption_length=8)[1] != first[1] and len(builds) == before + 1  # text only
    # A changed mask file changes the data fingerprint (the captions do not change: text reused).
    path = os.path.join(folder, "masks", "2.png")
    Image.fromarray(np.zeros((36, 36), np.uint8)).save(path)
    os.utime(path, ns=(1, 1))
    changed = build()
    assert changed[0] != first[0] and changed[1] == first[1]
    # Changed VAE weights: new latents.
    with torch.no_grad():
        next(vae.parameters()).add_(0.01)
    try:
        assert build()[0] != changed[0]
    finally:
        with torch.no_grad():
            next(vae.parameters()).sub_(0.01)
    assert not [p for p in os.listdir(tmp_path / "cache") if p.startswith(".tmp-")]


def test_precompute_caches_what_the_model_has(tmp_path, encoders):
    from train_mask_dit import parse_args

    base = ["--train_data_dir", "unused", "--output_dir", str(tmp_path / "out")]
    args = parse_args(base + ["--precompute", "--text_encoder_name_or_path", "te"])  # pixel space with captions
    assert not args.cache_latents and args.cache_text_embeddings
    assert args.latent_cache_dir == os.path.join(str(tmp_path / "out"), "latent_cache")
    args = parse_args(base + ["--precompute", "--vae_model_name_or_path", "vae"])  # latent space without captions
    assert args.cache_latents and not args.cache_text_embeddings
    with pytest.raises(ValueError, match="--cache_latents needs a VAE"):
        parse_args(base + ["--cache_latents"])
    with pytest.raises(ValueError, match="--cache_text_embeddings needs a text encoder"):
        parse_args(base + ["--cache_text_embeddings", "--vae_model_name_or_path", "vae"])

    # Pixel space: the text cache alone; items keep their pixels.
    vae, tokenizer, text_encoder = encoders
    dataset = pairs(write_pairs(tmp_path / "data"))
    (cached,), _ = cache_with_flags([dataset], None, tokenizer, text_encoder,
                                         cache_args(tmp_path / "cache", latents=False, caption_dropout_prob=0.0))
    item, expected = cached[1], dataset[1]
    assert torch.equal(item["pixel_values"], expected["pixel_values"]) and torch.equal(item["mask"], expected["mask"])
    assert item["caption_embedding"].shape == (16, 32) and "" not in cached.text.manifest["captions"]


# ----------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fundus_dir(tmp_path_factory):
    return write_synthetic_fundus_dataset(str(tmp_path_factory.mktemp("fundus")), 12, size=32, seed=0)


def latent_run_args(data_dir, model_dir, output_dir, *extra):
    """Latent space (tiny VAE, downsample 2) with captions: 11 training pairs / batch 4 = 3 steps an epoch."""
    return ["--train_data_dir", data_dir, "--output_dir", output_dir, "--model_size", "tiny", "--resolution", "32",
            "--mask_channels", "2", "--train_batch_size", "4", "--seed", "0", "--report_to", "tensorboard",
            "--vae_model_name_or_path", model_dir, "--text_encoder_name_or_path", model_dir, "--max_caption_length", "16",
            "--caption_dropout_prob", "0.5", "--num_inference_steps", "2", "--num_validation_images", "1",
            "--logging_steps", "1", "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--validation_steps", "2",
            "--validation_epochs", "0", "--dataloader_num_workers", "0", *extra]


def read_scalars(output_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for path in glob.glob(os.path.join(output_dir, "logs", "**", "events.out.tfevents.*"), recursive=True):
        events = EventAccumulator(path)
        events.Reload()
        if tag in events.Tags()["scalars"]:
            values.update({e.step: e.value for e in events.Scalars(tag)})
    return [values[step] for step in sorted(values)]


@pytest.mark.slow
@pytest.mark.parametrize("flip", [False, True], ids=["no_flip", "random_flip"])
def test_training_from_cache_gives_the_same_losses(flip, fundus_dir, tiny_pipeline_dir, tmp_path):
    extra = ["--max_train_steps", "5"] + (["--random_flip"] if flip else [])  # 5 steps cross into epoch 1
    cache_dir = str(tmp_path / "cache")
    accelerate_launch("train_mask_dit.py", latent_run_args(fundus_dir, tiny_pipeline_dir, str(tmp_path / "images"), *extra))
    result = accelerate_launch("train_mask_dit.py", latent_run_args(
        fundus_dir, tiny_pipeline_dir, str(tmp_path / "cached"), *extra, "--precompute", "--latent_cache_dir", cache_dir))
    log = result.stderr + result.stdout
    assert "Building the latents cache" in log and "Building the text cache" in log
    for tag in ("train/loss", "val/loss"):
        from_images, from_cache = read_scalars(str(tmp_path / "images"), tag), read_scalars(str(tmp_path / "cached"), tag)
        assert len(from_images) == {"train/loss": 5, "val/loss": 2}[tag] and len(from_cache) == len(from_images)
        torch.testing.assert_close(torch.tensor(from_cache), torch.tensor(from_images), rtol=1e-4, atol=1e-6)
    folders = sorted(os.listdir(cache_dir))
    assert len([f for f in folders if f.startswith("latents-")]) == 2 and len([f for f in folders if f.startswith("text-")]) == 1
    if flip:  # a second run with the same settings reads the same folders, encodes nothing
        again = accelerate_launch("train_mask_dit.py", latent_run_args(
            fundus_dir, tiny_pipeline_dir, str(tmp_path / "again"), *extra, "--precompute", "--latent_cache_dir", cache_dir))
        log = again.stderr + again.stdout
        assert "Building" not in log and log.count("Reusing cached") == 3
        assert sorted(os.listdir(cache_dir)) == folders
        assert read_scalars(str(tmp_path / "again"), "train/loss") == read_scalars(str(tmp_path / "cached"), "train/loss")


@pytest.mark.slow
def test_encoders_leave_the_device_and_resume_from_cache_is_exact(fundus_dir, tiny_pipeline_dir, tmp_path, monkeypatch):
    """After caching, the VAE and text encoder are moved to the CPU and never run during training
    (validation sampling brings them back and moves them off again); a resumed cached run equals
    the uninterrupted one bitwise."""
    from safetensors.torch import load_file

    import train_mask_dit

    offloaded = []
    real_offload = train_mask_dit.offload_cached_encoders

    def offload_and_forbid(models, args):
        real_offload(models, args)
        for name, module in models.items():
            assert all(p.device.type == "cpu" for p in module.parameters()), name
            offloaded.append(name)
            module.forward = lambda *a, name=name, **k: pytest.fail(f"{name} ran after caching")
            if name == "vae":
                module.encode = lambda *a, **k: pytest.fail("vae.encode ran after caching")
    monkeypatch.setattr(train_mask_dit, "offload_cached_encoders", offload_and_forbid)

    common = ["--max_train_steps", "5", "--checkpointing_steps", "2", "--random_flip", "--num_validation_images", "0",
              "--precompute", "--latent_cache_dir", str(tmp_path / "cache")]
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    run_main_in_process(train_mask_dit, latent_run_args(fundus_dir, tiny_pipeline_dir, full, *common))
    assert offloaded == ["vae", "text_encoder"]
    run_main_in_process(train_mask_dit, latent_run_args(fundus_dir, tiny_pipeline_dir, resumed, *common,
                                                        "--resume_from_checkpoint", os.path.join(full, "checkpoint-2")))
    weights = "transformer/diffusion_pytorch_model.safetensors"
    expected, actual = load_file(os.path.join(full, weights)), load_file(os.path.join(resumed, weights))
    assert all(torch.equal(expected[k], actual[k]) for k in expected), "resume from the cache diverged"
    full_losses = read_scalars(full, "train/loss")
    assert len(full_losses) > 2 and read_scalars(resumed, "train/loss") == full_losses[2:]


@pytest.mark.slow
def test_two_processes_build_the_cache_once_and_train_from_it(fundus_dir, tiny_pipeline_dir, tmp_path):
    """The main process builds while the other waits (accelerator.main_process_first), then both read it:
    two ranks train from one set of complete folders (the other rank logs errors only, so the log shows rank 0)."""
    cache_dir = str(tmp_path / "cache")
    result = accelerate_launch("train_mask_dit.py", latent_run_args(
        fundus_dir, tiny_pipeline_dir, str(tmp_path / "out"), "--max_train_steps", "2", "--random_flip",
        "--train_batch_size", "2", "--precompute", "--latent_cache_dir", cache_dir), num_processes=2)
    log = result.stderr + result.stdout
    assert log.count("Building the latents cache") == 2 and log.count("Building the text cache") == 1
    folders = sorted(os.listdir(cache_dir))
    assert len(folders) == 3 and all(cache.read_manifest(os.path.join(cache_dir, f)) for f in folders)
    assert len(read_scalars(str(tmp_path / "out"), "train/loss")) == 2
