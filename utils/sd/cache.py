"""Encode once, train many times: VAE latents and text embeddings cached on disk.

`--cache_latents` runs the frozen VAE over the dataset once, `--cache_text_embeddings` the frozen
text encoder over its unique captions once (`--precompute` = both). Results are safetensors
shards under a folder named by a fingerprint of everything that changes them::

    <--latent_cache_dir>/latents-<fingerprint>/manifest.json, shard-00000.safetensors, ...
    <--latent_cache_dir>/text-<fingerprint>/manifest.json, shard-00000.safetensors, ...

latents: image files (path, size, mtime; or the bytes' hash), captions, VAE weights and dtype,
resolution, interpolation, crop and flip settings (and the seed and caption-dropout probability
when crops are random). text: the tokenized captions, text-encoder weights and dtype. A run with
the same inputs reuses the folder; anything else gets a new one. `manifest.json` is written last,
into a temporary folder that is renamed into place, so a killed run never leaves a cache that
looks complete.

What is stored is the VAE's latent *distribution* (mean, std), not a sample: each step draws
`mean + std * randn` exactly as `vae.encode(x).latent_dist.sample()` would, with the same random
numbers, so training from the cache gives the same loss sequence as training from the images.
With `--random_flip` both orientations are encoded and the flip is drawn per (seed, epoch,
index) as in `utils.sd.data.TextImageDataset`. With random crops (no `--center_crop`) the crop
is drawn once (epoch 0) and kept for every epoch: a documented difference that only matters
for images that are not already square at `--resolution`.

train_mask_dit.py uses the same flags and storage for `PairedImageMaskDataset`s (section "Mask
DiT" below): the mask is cached with the latents (cropped like the image, flipped at load), and
the caption embeddings come with their attention mask from `encode_captions`.
"""

from __future__ import annotations

import hashlib
import json
import logging

import torch

from utils.cache import (BucketedLatents, CacheSettings, ShardedTensors, builders_first, fingerprint, image_reference, is_channels_last, load_or_build,
                         module_fingerprint)
from utils.data import BadSampleError
from utils.images import load_image

logger = logging.getLogger(__name__)


def rows_fingerprint(rows, image_column: str, caption_column: str, chunk: int = 1024) -> str:
    """Hash of every row's image reference and caption(s), read in chunks of columns."""
    digest = hashlib.sha256()
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        for image, caption in zip(part[image_column], part[caption_column]):
            digest.update(json.dumps([image_reference(image), caption], default=str).encode("utf-8"))
    return digest.hexdigest()[:20]


def all_captions(rows, caption_column: str, caption_dropout_prob: float) -> list[str]:
    """Every caption a training step can see, sorted (the empty prompt too when captions drop out)."""
    captions = set()
    for value in rows[caption_column]:
        if isinstance(value, str):
            captions.add(value)
        elif isinstance(value, (list, tuple)) or hasattr(value, "tolist"):
            captions.update(c for c in list(value) if isinstance(c, str))
    if caption_dropout_prob > 0:
        captions.add("")
    return sorted(captions)


def encode_latent_batches(dataset, vae, device, batch_size: int, indices: list[int] | None = None):
    """Yield {"mean", "std" [B, C, h, w] (+ "mean_flipped", "std_flipped"), "size" [B, 2] (the resized image's
    width, height), "original_size" [B, 2] (height, width: SDXL's time ids), "valid" [B]}, for `indices` (default:
    all; with buckets, the samples of one bucket)."""
    transform = dataset.transform
    rows = dataset.rows
    indices = list(range(len(rows))) if indices is None else indices
    single_layout = None  # the VAE's output layout for a batch of one (oneDNN: contiguous; larger: channels_last)
    for start in range(0, len(indices), batch_size):
        pixels, sizes, original_sizes, valid = [], [], [], []
        for index in indices[start:start + batch_size]:
            row = rows[index]
            target = dataset.target(index)
            where = f"{dataset.source_name} row {index}"
            try:
                image = load_image(row[dataset.image_column], name=where if not isinstance(row[dataset.image_column], str)
                                   else row[dataset.image_column])
                original_sizes.append((image.height, image.width))
                image = transform.resize(image, target)
                plan = dataset.plan(index, 0, image.size, row)  # the epoch-0 crop, kept (see the module docstring)
                pixels.append(transform.apply(image, plan.crop, flip=False, target=target))
                sizes.append(image.size)
                valid.append(True)
            except BadSampleError as error:
                if not dataset.skip_bad_samples:
                    raise
                logger.warning(f"Not caching bad sample ({error})")
                width, height = transform.target(target)
                pixels.append(torch.zeros(3, height, width))
                sizes.append((width, height))
                original_sizes.append((transform.resolution, transform.resolution))
                valid.append(False)
        pixel_values = torch.stack(pixels)
        if transform.random_flip:
            pixel_values = torch.cat([pixel_values, pixel_values.flip(-1)])
        with torch.no_grad():
            dist = vae.encode(pixel_values.to(device, vae.dtype)).latent_dist
        batch = {"mean": dist.mean, "std": dist.std}
        if transform.random_flip:
            half = len(pixels)
            batch = {"mean": dist.mean[:half], "std": dist.std[:half],
                     "mean_flipped": dist.mean[half:], "std_flipped": dist.std[half:]}
        channels_last = is_channels_last(dist.parameters)
        if single_layout is None:
            with torch.no_grad():
                single_layout = is_channels_last(vae.encode(pixel_values[:1].to(device, vae.dtype)).latent_dist.parameters)
        batch.update(size=torch.tensor(sizes, dtype=torch.int64), valid=torch.tensor(valid, dtype=torch.bool),
                     original_size=torch.tensor(original_sizes, dtype=torch.int64),
                     channels_last=torch.full((len(pixels),), channels_last, dtype=torch.bool),
                     channels_last_single=torch.full((len(pixels),), single_layout, dtype=torch.bool))
        yield batch


def encode_text_batches(captions: list[str], tokenize, encode, device, batch_size: int, attention_mask=None):
    """Yield {"embeddings": [B, L, D]} for `captions` in order, with {"pooled": [B, P]} where the family has a
    pooled prompt (SDXL, SD3, FLUX) and {"mask": [B, L]} where its denoiser reads the prompt's mask (Lumina-2). `encode(input_ids, attention_mask)`: the family's `encode_text`;
    `attention_mask(caption)`: --text_encoder_use_attention_mask's masks (None: none)."""
    for start in range(0, len(captions), batch_size):
        chunk = captions[start:start + batch_size]
        input_ids = torch.stack([tokenize(c) for c in chunk]).to(device)
        mask = torch.stack([attention_mask(c) for c in chunk]).to(device) if attention_mask is not None else None
        with torch.no_grad():
            encoded = encode(input_ids, mask)
        yield {"embeddings": encoded["encoder_hidden_states"],
               **({"pooled": encoded["pooled_prompt_embeds"]} if "pooled_prompt_embeds" in encoded else {}),
               **({"mask": encoded["encoder_attention_mask"]} if "encoder_attention_mask" in encoded else {})}


class CachedTextImageDataset(torch.utils.data.Dataset):
    """A `TextImageDataset` whose latents and/or caption embeddings come from the cache.

    Items: {"latent_mean", "latent_std": [C, h, w], "latent_channels_last": bool} instead of
    "pixel_values" when latents are cached; {"encoder_hidden_states": [L, D]} instead of "input_ids" when embeddings are; "caption".
    """

    def __init__(self, base, latents: ShardedTensors | None = None, text: ShardedTensors | None = None):
        self.base, self.latents, self.text = base, latents, text
        self.caption_index = {c: i for i, c in enumerate(text.manifest["captions"])} if text is not None else None
        self.valid = latents.column("valid").tolist() if latents is not None else None
        self.sizes = latents.column("size").tolist() if latents is not None else None
        self.original_sizes = latents.column("original_size") if latents is not None else None
        self.pooled = text is not None and text.has("pooled")
        self.mask = text is not None and text.has("mask")  # Lumina-2: the transformer reads the prompt's mask
        self.channels_last = bool(latents.column("channels_last").any()) if latents is not None else False
        self.channels_last_single = bool(latents.column("channels_last_single").any()) if latents is not None else False
        self.num_skipped = 0

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def _embeddings(self, caption: str) -> dict:
        index = self.caption_index[caption]
        item = {"encoder_hidden_states": self.text.get("embeddings", index)}
        if self.pooled:
            item["pooled_prompt_embeds"] = self.text.get("pooled", index)
        if self.mask:
            item["encoder_attention_mask"] = self.text.get("mask", index)
        return item

    def __getitem__(self, index: int) -> dict:
        base = self.base
        if self.latents is None:  # images as usual, embeddings from the cache
            item = dict(base[index])
            item.update(self._embeddings(item["caption"]))
            del item["input_ids"]
            item.pop("attention_mask", None)  # (the cached embeddings were encoded with it)
            return item
        for attempt in range(len(base)):
            current = (index + attempt) % len(base)
            if not base.interchangeable(index, current):
                continue
            if not self.valid[current]:
                self.num_skipped += 1
                continue
            plan = base.plan(current, base.epoch, tuple(self.sizes[current]))
            cached_crop = base.plan(current, 0, tuple(self.sizes[current])).crop
            caption, suffix = plan.caption, "_flipped" if plan.flip else ""
            size, target = tuple(self.sizes[current]), base.target(current)
            item = {"latent_mean": self.latents.get("mean" + suffix, current),
                    "latent_std": self.latents.get("std" + suffix, current), "caption": caption,
                    "latent_channels_last": self.channels_last, "original_size": self.original_sizes[current],
                    "latent_channels_last_single": self.channels_last_single,
                    "crop_top_left": torch.tensor(base.transform.crop_top_left(size, plan.crop, plan.flip, target)),
                    "name": base.file_name(current),
                    # mask and conditioning image: at the cached latents' crop (epoch 0's)
                    **base.mask_item(current, size, cached_crop, plan.flip),
                    **base.conditioning_item(current, size, cached_crop, plan.flip)}
            if self.text is not None:
                item.update(self._embeddings(caption))
            else:
                item.update(input_ids=base.tokenize(caption), **base.mask_of(caption))
            return item
        raise BadSampleError(f"{base.source_name}: every sample is unreadable")


def cache_text_image_dataset(dataset, vae, text_encoders, cache: CacheSettings, accelerator, encode):
    """Wrap a `TextImageDataset` with the caches that --cache_latents/--cache_text_embeddings ask for.

    Builds missing caches on the main process (others wait and then read them). Returns the
    dataset unchanged when no caching is asked for. `text_encoders`: the list of text encoders (SDXL: two, SD3:
    three), whose fingerprints key the text cache; `encode(input_ids, attention_mask)`: the family's encode_text;
    `cache`: the resolved cache flags (utils.cache.CacheSettings).
    """
    if not (cache.cache_latents or cache.cache_text_embeddings):
        return dataset
    text_encoders = list(text_encoders) if isinstance(text_encoders, (list, tuple)) else [text_encoders]
    device = accelerator.device
    latents = text = None
    with builders_first(accelerator):
        if cache.cache_latents:
            transform = dataset.transform
            key = {"kind": "sd-latents", "columns": "original_size,channels_last_single", "rows": rows_fingerprint(dataset.rows, dataset.image_column, dataset.caption_column),
                   "vae": module_fingerprint(vae), "dtype": str(vae.dtype), "resolution": transform.resolution,
                   "interpolation": transform.interpolation, "center_crop": transform.center_crop,
                   "random_flip": transform.random_flip}
            if not transform.center_crop:  # the epoch-0 crop depends on the random draws before it
                key.update(seed=dataset.seed, caption_dropout_prob=dataset.caption_dropout_prob)
            if dataset.buckets is None:
                latents = load_or_build(cache.latent_cache_dir, "latents", key,
                                        lambda: encode_latent_batches(dataset, vae, device, cache.cache_batch_size))
            else:  # a cache per bucket
                members = {}
                for index, bucket in enumerate(dataset.buckets):
                    members.setdefault(tuple(bucket), []).append(index)
                latents = BucketedLatents([(indices, load_or_build(
                    cache.latent_cache_dir, "latents", dict(key, bucket=list(bucket), indices=fingerprint(indices)),
                    lambda indices=indices: encode_latent_batches(dataset, vae, device, cache.cache_batch_size, indices)))
                    for bucket, indices in sorted(members.items())], len(dataset))
            if not transform.center_crop:
                logger.warning("--cache_latents with random crops: each image keeps the crop drawn for epoch 0 "
                               "(no effect for images already square at --resolution; use --center_crop to silence).")
        if cache.cache_text_embeddings:
            captions = all_captions(dataset.rows, dataset.caption_column, dataset.caption_dropout_prob)
            input_ids = torch.stack([dataset.tokenize(c) for c in captions]) if captions else torch.zeros(0)
            key = {"kind": "clip-text", "captions": fingerprint(captions),
                   "input_ids": hashlib.sha256(input_ids.numpy().tobytes()).hexdigest()[:20],
                   **({"attention_mask": True} if dataset.attention_mask is not None else {}),
                   "text_encoder": [module_fingerprint(t) for t in text_encoders] if len(text_encoders) > 1
                   else module_fingerprint(text_encoders[0]), "dtype": str(text_encoders[0].dtype)}
            text = load_or_build(cache.latent_cache_dir, "text", key,
                                 lambda: encode_text_batches(captions, dataset.tokenize, encode, device,
                                                             cache.cache_batch_size, dataset.attention_mask),
                                 extra_fn=lambda: {"captions": captions})
    return CachedTextImageDataset(dataset, latents, text)
