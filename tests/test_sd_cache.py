"""utils/cache.py: cached latents/embeddings equal what training from images computes,
caches are reused and invalidated correctly, and training from the cache gives the same losses."""

import contextlib
import glob
import json
import os
import types

import pytest
import torch
from conftest import accelerate_launch, count_builds
from PIL import Image

from utils import cache as cache_module
from utils.cache import ShardedTensors, load_or_build, read_manifest
from utils.sd.cache import CachedTextImageDataset, cache_text_image_dataset
from utils.cache import collate_cached, sample_cached_latents
from utils.sd.data import ImageTransform, TextImageDataset, write_metadata_jsonl


def sd_encode(text_encoder):
    """The SD family's encode_text over this one text encoder (what the trainer hands the cache)."""
    from utils.families.sd import StableDiffusion

    return lambda ids, mask: StableDiffusion().encode_text({"text_encoder": text_encoder}, ids, mask)


def make_folder(path, sizes=((40, 32), (32, 48), (36, 36), (50, 34), (32, 32), (44, 40))):
    os.makedirs(path, exist_ok=True)
    records = []
    for index, (width, height) in enumerate(sizes):
        image = Image.new("RGB", (width, height), (30 * index, 255 - 30 * index, 90))
        for x in range(width // 3):  # asymmetric content, so a wrong flip shows
            for y in range(height):
                image.putpixel((x, y), (255, 255, 255))
        image.save(os.path.join(path, f"{index}.png"))
        captions = [f"shape {index}", f"colour {index}"] if index % 2 else [f"picture {index}"]
        records.append({"file_name": f"{index}.png", "text": captions})
    write_metadata_jsonl(path, records)
    return path


@pytest.fixture(scope="module")
def tiny_components():
    from utils.sd.builder import build_components

    components = build_components("tiny", resolution=32, seed=0)
    components["vae"].eval()
    components["text_encoder"].eval()
    return components


def rows_of(folder):
    import datasets

    rows = datasets.load_dataset("imagefolder", data_dir=folder, split="train")
    return rows.cast_column("image", datasets.Image(decode=False))


def make_dataset(folder, tokenizer, resolution=32, center_crop=True, random_flip=True, dropout=0.3):
    def tokenize(caption):
        return tokenizer(caption, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                         return_tensors="pt").input_ids[0]
    return TextImageDataset(rows_of(folder), "image", "text", ImageTransform(resolution, "bilinear", center_crop, random_flip),
                            tokenize, seed=3, caption_dropout_prob=dropout, source_name=folder)


def cache_args(cache_dir, latents=True, text=True):
    from utils.cache import CacheSettings

    return CacheSettings(cache_latents=latents, cache_text_embeddings=text, latent_cache_dir=str(cache_dir),
                         cache_batch_size=4)


CPU_ACCELERATOR = types.SimpleNamespace(device=torch.device("cpu"), main_process_first=contextlib.nullcontext,
                                        local_main_process_first=contextlib.nullcontext)


def test_cached_latent_sample_equals_vae_sample(tiny_components):
    vae = tiny_components["vae"]
    pixels = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        dist = vae.encode(pixels).latent_dist
    torch.manual_seed(7)
    expected = dist.sample() * vae.config.scaling_factor
    expected_noise = torch.randn_like(expected)  # follows the latents' memory layout
    channels_last = dist.parameters.is_contiguous(memory_format=torch.channels_last) and not dist.parameters.is_contiguous()
    torch.manual_seed(7)
    got = sample_cached_latents({"latent_mean": dist.mean.contiguous(), "latent_std": dist.std.contiguous(),
                                 "latent_channels_last": channels_last}, vae.config)
    assert torch.equal(got, expected) and torch.equal(torch.randn_like(got), expected_noise)


def test_cached_dataset_replays_captions_crops_and_flips(tmp_path, tiny_components):
    vae, text_encoder, tokenizer = tiny_components["vae"], tiny_components["text_encoder"], tiny_components["tokenizer"]
    dataset = make_dataset(make_folder(str(tmp_path / "data")), tokenizer)
    cached = cache_text_image_dataset(dataset, vae, text_encoder, cache_args(tmp_path / "cache"), CPU_ACCELERATOR,
                                      sd_encode(text_encoder))
    assert isinstance(cached, CachedTextImageDataset)
    seen_flips = set()
    for epoch in range(3):
        cached.set_epoch(epoch)
        for index in range(len(dataset)):
            expected, got = dataset[index], cached[index]
            assert got["caption"] == expected["caption"]
            assert "pixel_values" not in got and "input_ids" not in got
            with torch.no_grad():
                dist = vae.encode(expected["pixel_values"][None]).latent_dist
                states = text_encoder(expected["input_ids"][None], return_dict=False)[0]
            torch.testing.assert_close(got["latent_mean"], dist.mean[0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(got["latent_std"], dist.std[0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(got["encoder_hidden_states"], states[0], rtol=1e-4, atol=1e-5)
            flipped = cache_module.ShardedTensors.get(cached.latents, "mean_flipped", index)
            seen_flips.add(bool(torch.equal(got["latent_mean"], flipped)))
    assert seen_flips == {True, False}  # both orientations were used
    batch = collate_cached([cached[0], cached[1]])
    assert batch["latent_mean"].shape == (2, 4, 16, 16) and batch["encoder_hidden_states"].shape[:2] == (2, 77)
    assert len(batch["captions"]) == 2


def test_text_only_cache_keeps_pixels(tmp_path, tiny_components):
    dataset = make_dataset(make_folder(str(tmp_path / "data")), tiny_components["tokenizer"], dropout=0.0)
    cached = cache_text_image_dataset(dataset, tiny_components["vae"], tiny_components["text_encoder"],
                                      cache_args(tmp_path / "cache", latents=False), CPU_ACCELERATOR,
                                      sd_encode(tiny_components["text_encoder"]))
    item = cached[1]
    assert torch.equal(item["pixel_values"], dataset[1]["pixel_values"])
    assert item["encoder_hidden_states"].shape == (77, 32) and "input_ids" not in item
    assert "" not in cached.text.manifest["captions"]  # no dropout: no empty prompt cached


def test_cache_is_reused_and_rebuilt_when_anything_changes(tmp_path, tiny_components, monkeypatch):
    vae, text_encoder, tokenizer = tiny_components["vae"], tiny_components["text_encoder"], tiny_components["tokenizer"]
    folder = make_folder(str(tmp_path / "data"))
    args = cache_args(tmp_path / "cache")
    builds = count_builds(monkeypatch)

    def build(**dataset_kwargs):
        cached = cache_text_image_dataset(make_dataset(folder, tokenizer, **dataset_kwargs), vae, text_encoder, args,
                                          CPU_ACCELERATOR, sd_encode(text_encoder))
        return os.path.basename(cached.latents.directory), os.path.basename(cached.text.directory)

    first = build()
    assert len(builds) == 2
    assert build() == first and len(builds) == 2  # same inputs: reused, nothing encoded
    assert build(resolution=16)[0] != first[0] and len(builds) == 3  # latents rebuilt, text reused
    assert build(random_flip=False)[0] != first[0]
    assert build(center_crop=False)[0] != first[0]
    # A changed image file changes the data fingerprint.
    path = os.path.join(folder, "2.png")
    Image.new("RGB", (36, 36), (1, 2, 3)).save(path)
    os.utime(path, ns=(1, 1))
    changed = build()
    assert changed[0] != first[0] and changed[1] == first[1]
    # Changed VAE weights: new latents; changed text-encoder weights: new embeddings.
    before = len(builds)
    with torch.no_grad():
        next(vae.parameters()).add_(0.01)
        next(text_encoder.parameters()).add_(0.01)
    try:
        latents_dir, text_dir = build()
    finally:
        with torch.no_grad():
            next(vae.parameters()).sub_(0.01)
            next(text_encoder.parameters()).sub_(0.01)
    assert latents_dir not in (first[0], changed[0]) and text_dir != first[1] and len(builds) == before + 2


def test_incomplete_cache_is_rebuilt(tmp_path):
    key = {"kind": "test"}
    batches = lambda: iter([{"x": torch.arange(6.0).view(3, 2)}, {"x": torch.ones(2, 2)}])  # noqa: E731
    cache = load_or_build(str(tmp_path), "demo", key, batches)
    assert len(cache) == 5 and torch.equal(cache.get("x", 4), torch.ones(2))
    os.remove(os.path.join(cache.directory, "manifest.json"))
    assert read_manifest(cache.directory) is None
    with pytest.raises(FileNotFoundError, match="not a complete cache"):
        ShardedTensors(cache.directory)
    rebuilt = load_or_build(str(tmp_path), "demo", key, batches)
    assert rebuilt.directory == cache.directory and torch.equal(rebuilt.get("x", 1), torch.tensor([2.0, 3.0]))
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]


def test_sharding_splits_rows(tmp_path):
    cache_module.write_cache(str(tmp_path / "c"), iter([{"x": torch.arange(10.0)[:, None]}] * 3), {"k": 1}, shard_size=10)
    cache = ShardedTensors(str(tmp_path / "c"))
    assert len(cache.manifest["shards"]) == 3 and len(cache) == 30
    assert cache.get("x", 23).item() == 3.0 and cache.column("x").shape == (30, 1)


def read_losses(output_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    losses = {}
    for path in glob.glob(os.path.join(output_dir, "logs", "**", "events.out.tfevents.*"), recursive=True):
        events = EventAccumulator(path)
        events.Reload()
        if "train_loss" in events.Tags()["scalars"]:
            losses.update({e.step: e.value for e in events.Scalars("train_loss")})
    return [losses[step] for step in sorted(losses)]


@pytest.mark.slow
def test_training_from_cache_gives_the_same_losses(tmp_path, tiny_pipeline_dir):
    folder = make_folder(str(tmp_path / "data"), sizes=((36, 32),) * 3 + ((32, 40),) * 3)
    common = ["--pretrained_model_name_or_path", tiny_pipeline_dir, "--train_data_dir", folder, "--resolution", "32",
              "--center_crop", "--random_flip", "--train_batch_size", "2", "--max_train_steps", "4", "--seed", "0",
              "--logging_steps", "1", "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--checkpointing_steps", "1000",
              "--caption_dropout_prob", "0.3"]
    accelerate_launch("train_text_to_image.py", common + ["--output_dir", str(tmp_path / "images")])
    result = accelerate_launch("train_text_to_image.py", common + ["--output_dir", str(tmp_path / "cached"), "--precompute",
                                                                   "--latent_cache_dir", str(tmp_path / "cache")])
    assert "Building the latents cache" in result.stderr + result.stdout
    from_images, from_cache = read_losses(str(tmp_path / "images")), read_losses(str(tmp_path / "cached"))
    assert len(from_images) == 4 and len(from_cache) == 4
    torch.testing.assert_close(torch.tensor(from_cache), torch.tensor(from_images), rtol=1e-4, atol=1e-6)
    args = json.load(open(tmp_path / "cached" / "training_args.json"))
    assert args["cache_latents"] and args["cache_text_embeddings"]
