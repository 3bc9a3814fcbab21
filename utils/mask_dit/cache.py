"""Mask DiT latent and caption-embedding caches on top of `utils.cache`: the mask is cached with
the latents (cropped like the image, flipped at load), captions with their attention mask.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, fields

import torch
from PIL import Image

from utils.cache import (BucketedLatents, CacheSettings, ShardedTensors, builders_first, fingerprint, image_reference,
                         is_channels_last, load_or_build, module_fingerprint)
from utils.mask_dit.data import PairedImageMaskDataset

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaptionEncoding:
    """How train_mask_dit.py encodes captions (what the caption cache is keyed by), typed from the flags of the same
    names."""

    max_caption_length: int
    caption_hidden_layer: int
    caption_dropout_prob: float

    @classmethod
    def from_args(cls, args) -> "CaptionEncoding":
        return cls(**{field.name: getattr(args, field.name) for field in fields(cls)})


def _record_reference(record) -> list:
    return [record.name, image_reference(record.image), image_reference(record.mask), record.caption]


def paired_rows_fingerprint(dataset) -> str:
    """Hash of the dataset's pairs in order: image and mask files (path, size, mtime; or pixels) and captions."""
    digest = hashlib.sha256()
    for index in dataset.indices:
        digest.update(json.dumps(_record_reference(dataset.records[index]), default=str).encode("utf-8"))
    return digest.hexdigest()[:20]


def encode_pair_batches(dataset, vae, device, batch_size: int, indices: list[int] | None = None):
    """Yield {"mean", "std" [B, C, h, w] (+ "mean_flipped", "std_flipped"), "mask" uint8 [B, K, R, R],
    "size" [B, 2], "channels_last" [B]} for the epoch-0 crops of a `PairedImageMaskDataset` (`indices`: default all;
    with buckets, one bucket's items)."""
    # The same pairs without the flip: the crop is drawn before the flip, so it is the epoch-0 crop.
    unflipped = PairedImageMaskDataset(dataset.records, dataset.resolution, dataset.mask_channels, dataset.random_crop,
                                       False, dataset.indices, dataset.seed)
    unflipped.buckets = dataset.buckets
    indices = list(range(len(dataset))) if indices is None else indices
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        items = [unflipped[index] for index in chunk]
        sizes = []
        for index in chunk:
            image = dataset.records[dataset.indices[index]].image
            if isinstance(image, str):
                with Image.open(image) as opened:  # the header only
                    image_size = opened.size
            else:
                image_size = image.size
            sizes.append(dataset.resized_size(image_size, dataset.target(index)))
        pixel_values = torch.stack([item["pixel_values"] for item in items])
        if dataset.random_flip:
            pixel_values = torch.cat([pixel_values, pixel_values.flip(-1)])
        with torch.no_grad():
            dist = vae.encode(pixel_values.to(device, vae.dtype)).latent_dist
        half = len(items)
        batch = {"mean": dist.mean[:half], "std": dist.std[:half]}
        if dataset.random_flip:
            batch.update(mean_flipped=dist.mean[half:], std_flipped=dist.std[half:])
        channels_last = is_channels_last(dist.parameters)
        batch.update(mask=torch.stack([item["mask"] for item in items]).to(torch.uint8),
                     size=torch.tensor(sizes, dtype=torch.int64),
                     channels_last=torch.full((half,), channels_last, dtype=torch.bool))
        yield batch


def encode_caption_batches(captions: list[str], tokenizer, text_encoder, max_length: int, hidden_layer: int, batch_size: int):
    """Yield {"embeddings": [B, S, D], "attention_mask": [B, S]} from `encode_captions`, for `captions` in order."""
    from utils.mask_dit.pipeline import encode_captions

    for start in range(0, len(captions), batch_size):
        embeddings, attention_mask = encode_captions(tokenizer, text_encoder, captions[start:start + batch_size],
                                                     max_length, hidden_layer)
        yield {"embeddings": embeddings, "attention_mask": attention_mask}


class CachedPairedDataset(torch.utils.data.Dataset):
    """A `PairedImageMaskDataset` whose latents (+ masks) and/or caption embeddings come from the cache.

    Items: {"latent_mean", "latent_std": [C, h, w], "latent_channels_last": bool, "mask": [K, R, R]}
    instead of "pixel_values" and "mask" when latents are cached; plus {"caption_embedding": [S, D],
    "caption_mask": [S]} when embeddings are; always "caption".
    """

    def __init__(self, base, latents: ShardedTensors | None = None, text: ShardedTensors | None = None):
        self.base, self.latents, self.text = base, latents, text
        self.caption_index = {c: i for i, c in enumerate(text.manifest["captions"])} if text is not None else None
        self.sizes = latents.column("size").tolist() if latents is not None else None
        self.captions = latents.manifest["captions"] if latents is not None else None
        self.channels_last = bool(latents.column("channels_last").any()) if latents is not None else False

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        if self.latents is None:
            item = dict(self.base[index])
        else:
            _, flip = self.base.plan(index, self.base.epoch, tuple(self.sizes[index]))
            suffix = "_flipped" if flip else ""
            mask = self.latents.get("mask", index).float()
            item = {"latent_mean": self.latents.get("mean" + suffix, index), "latent_std": self.latents.get("std" + suffix, index),
                    "latent_channels_last": self.channels_last, "mask": mask.flip(-1) if flip else mask,
                    "caption": self.captions[index]}
        if self.text is not None:
            row = self.caption_index[item["caption"]]
            item["caption_embedding"] = self.text.get("embeddings", row)
            item["caption_mask"] = self.text.get("attention_mask", row)
        return item


def cache_pair_latents(dataset, vae, vae_fingerprint: str, cache: CacheSettings, device) -> ShardedTensors:
    """The latents cache of one `PairedImageMaskDataset` (built if missing; see `encode_pair_batches`)."""
    key = {"kind": "mask-dit-latents", "pairs": paired_rows_fingerprint(dataset), "vae": vae_fingerprint,
           "dtype": str(vae.dtype), "resolution": dataset.resolution, "mask_channels": dataset.mask_channels,
           "random_crop": dataset.random_crop, "random_flip": dataset.random_flip}
    if dataset.random_crop:  # the epoch-0 crop is drawn from the seed
        key["seed"] = dataset.seed
    captions = [dataset.records[i].caption for i in dataset.indices]
    if dataset.buckets is None:
        return load_or_build(cache.latent_cache_dir, "latents", key,
                             lambda: encode_pair_batches(dataset, vae, device, cache.cache_batch_size),
                             extra_fn=lambda: {"captions": captions})
    members = {}  # --enable_bucket: a cache per bucket (their latents differ in shape)
    for index, bucket in enumerate(dataset.buckets):
        members.setdefault(tuple(bucket), []).append(index)
    return BucketedLatents([(indices, load_or_build(
        cache.latent_cache_dir, "latents", dict(key, bucket=list(bucket), indices=fingerprint(indices)),
        lambda indices=indices: encode_pair_batches(dataset, vae, device, cache.cache_batch_size, indices),
        extra_fn=lambda indices=indices: {"captions": [captions[i] for i in indices]}))
        for bucket, indices in sorted(members.items())], len(dataset))


def cache_caption_embeddings(captions: list[str], tokenizer, text_encoder, cache: CacheSettings,
                             encoding: CaptionEncoding) -> ShardedTensors:
    """The caption-embedding cache of `captions` (sorted), built if missing; see `encode_caption_batches`."""
    tokens = tokenizer(captions, padding="max_length", max_length=encoding.max_caption_length, truncation=True,
                       return_tensors="pt")
    key = {"kind": "caption-embeddings", "captions": fingerprint(captions),
           "tokens": hashlib.sha256(tokens.input_ids.numpy().tobytes() + tokens.attention_mask.numpy().tobytes()).hexdigest()[:20],
           "max_length": encoding.max_caption_length, "hidden_layer": encoding.caption_hidden_layer,
           "text_encoder": module_fingerprint(text_encoder), "dtype": str(text_encoder.dtype)}
    return load_or_build(cache.latent_cache_dir, "text", key,
                         lambda: encode_caption_batches(captions, tokenizer, text_encoder, encoding.max_caption_length,
                                                        encoding.caption_hidden_layer, cache.cache_batch_size),
                         extra_fn=lambda: {"captions": captions})


def cache_paired_datasets(datasets: list, vae, tokenizer, text_encoder, cache: CacheSettings,
                          encoding: CaptionEncoding, accelerator):
    """Wrap `PairedImageMaskDataset`s (None passes through) with the caches --cache_latents /
    --cache_text_embeddings ask for; one text cache holds the captions of all of them.

    Returns (the datasets, the empty caption's (embedding [S, D], attention mask [S]) on the device
    when captions are cached and drop out, else None). Missing caches are built on the main
    process; the others wait and then read them.
    """
    if not (cache.cache_latents or cache.cache_text_embeddings):
        return datasets, None
    present = [d for d in datasets if d is not None]
    latents, text, empty_caption = [None] * len(datasets), None, None
    with builders_first(accelerator):
        if cache.cache_latents:
            vae_fingerprint = module_fingerprint(vae)
            latents = [cache_pair_latents(d, vae, vae_fingerprint, cache, accelerator.device) if d is not None else None
                       for d in datasets]
            if any(d.random_crop for d in present):
                logger.warning("--cache_latents with --random_crop: each pair keeps the crop drawn for epoch 0 (no "
                               "effect for images already square at --resolution; drop --random_crop to silence).")
        if cache.cache_text_embeddings:
            captions = {d.records[i].caption for d in present for i in d.indices}
            if encoding.caption_dropout_prob > 0:
                captions.add("")
            text = cache_caption_embeddings(sorted(captions), tokenizer, text_encoder, cache, encoding)
            if encoding.caption_dropout_prob > 0:
                row = text.manifest["captions"].index("")
                empty_caption = (text.get("embeddings", row).to(accelerator.device),
                                 text.get("attention_mask", row).to(accelerator.device))
    wrapped = [CachedPairedDataset(d, stored, text) if d is not None else None for d, stored in zip(datasets, latents)]
    return wrapped, empty_caption
