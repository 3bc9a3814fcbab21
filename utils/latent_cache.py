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
index) as in `utils.data.TextImageDataset`. With random crops (no `--center_crop`) the crop
is drawn once (epoch 0) and kept for every epoch: a documented difference that only matters
for images that are not already square at `--resolution`.

train_mask_dit.py uses the same flags and storage for `PairedImageMaskDataset`s (section "Mask
DiT" below): the mask is cached with the latents (cropped like the image, flipped at load), and
the caption embeddings come with their attention mask from `encode_captions`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import uuid

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from utils.data import BadSampleError, crop_origin, load_image, pick_caption, pil_to_tensor, resize_short_side, sample_rng

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CACHE_VERSION = 2


def add_cache_args(parser) -> None:
    group = parser.add_argument_group("caching")
    group.add_argument("--cache_latents", action="store_true",
                       help="Encode the images with the frozen VAE once, store the latents on disk (reused across runs) "
                            "and train from them; the VAE then leaves the training device.")
    group.add_argument("--cache_text_embeddings", action="store_true",
                       help="Encode the captions with the frozen text encoder once and train from the stored embeddings.")
    group.add_argument("--precompute", action="store_true", help="Alias for --cache_latents --cache_text_embeddings.")
    group.add_argument("--latent_cache_dir", type=str, default=None,
                       help="Where cached latents/embeddings live (default: <output_dir>/latent_cache). "
                            "Share one folder between runs to reuse caches; stale ones are never reused.")
    group.add_argument("--cache_batch_size", type=int, default=32, help="Batch size for encoding the cache.")


def resolve_cache_args(args, train_text_encoder: bool = False, has_vae: bool = True, has_text_encoder: bool = True) -> None:
    """Apply --precompute (both caches, where the model has that encoder) and check the combinations;
    call after parsing."""
    if args.cache_latents and not has_vae:
        raise ValueError("--cache_latents needs a VAE (--vae_model_name_or_path): a pixel-space model has no latents "
                         "to cache. --cache_text_embeddings works without one.")
    if args.cache_text_embeddings and not has_text_encoder:
        raise ValueError("--cache_text_embeddings needs a text encoder (--text_encoder_name_or_path).")
    if args.precompute:
        args.cache_latents = has_vae
        args.cache_text_embeddings = has_text_encoder
    if args.cache_text_embeddings and train_text_encoder:
        raise ValueError("--cache_text_embeddings (or --precompute) needs a frozen text encoder; "
                         "drop --train_text_encoder or use --cache_latents alone.")
    if args.latent_cache_dir is None:
        args.latent_cache_dir = os.path.join(args.output_dir, "latent_cache")


# ----------------------------------------------------------------------------------------------
# Fingerprints
# ----------------------------------------------------------------------------------------------

def fingerprint(parts) -> str:
    """A short stable hash of JSON-serialisable parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:20]


@torch.no_grad()
def module_fingerprint(module: torch.nn.Module) -> str:
    """Hash of a module's weights (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().contiguous().cpu()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:20]


def image_reference(value) -> list:
    """What identifies one image: (path, size, mtime) for files, a content hash for bytes."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return ["bytes", hashlib.sha256(value["bytes"]).hexdigest()]
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return ["bytes", hashlib.sha256(value).hexdigest()]
    if isinstance(value, str):
        try:
            stat = os.stat(value)
            return ["file", os.path.abspath(value), stat.st_size, stat.st_mtime_ns]
        except OSError:
            return ["missing", os.path.abspath(value)]
    if hasattr(value, "tobytes"):  # an in-memory PIL image
        return ["pixels", value.mode, value.size, hashlib.sha256(value.tobytes()).hexdigest()]
    return ["value", repr(value)]


def rows_fingerprint(rows, image_column: str, caption_column: str, chunk: int = 1024) -> str:
    """Hash of every row's image reference and caption(s), read in chunks of columns."""
    digest = hashlib.sha256()
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        for image, caption in zip(part[image_column], part[caption_column]):
            digest.update(json.dumps([image_reference(image), caption], default=str).encode("utf-8"))
    return digest.hexdigest()[:20]


# ----------------------------------------------------------------------------------------------
# Sharded storage
# ----------------------------------------------------------------------------------------------

def write_cache(directory: str, batches, key: dict, extra: dict | None = None, shard_size: int = 4096) -> None:
    """Write batches (dicts of tensors [B, ...]) as safetensors shards, then the manifest, atomically."""
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    temp = os.path.join(parent, f".tmp-{os.path.basename(directory)}-{uuid.uuid4().hex[:8]}")
    os.makedirs(temp)
    shards, pending, pending_rows, total = [], [], 0, 0

    def flush():
        nonlocal pending, pending_rows
        if not pending_rows:
            return
        tensors = {name: torch.cat([b[name] for b in pending]).contiguous() for name in pending[0]}
        name = f"shard-{len(shards):05d}.safetensors"
        save_file(tensors, os.path.join(temp, name))
        shards.append({"file": name, "rows": pending_rows})
        pending, pending_rows = [], 0

    try:
        for batch in batches:
            batch = {name: tensor.detach().cpu() for name, tensor in batch.items()}
            pending.append(batch)
            rows = len(next(iter(batch.values())))
            pending_rows += rows
            total += rows
            if pending_rows >= shard_size:
                flush()
        flush()
        manifest = {"version": CACHE_VERSION, "key": key, "rows": total, "shards": shards, **(extra or {})}
        with open(os.path.join(temp, MANIFEST), "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=2, default=str)
        if os.path.isdir(directory):  # an incomplete leftover (no manifest): replace it
            shutil.rmtree(directory)
        os.replace(temp, directory)
    finally:
        if os.path.isdir(temp):
            shutil.rmtree(temp, ignore_errors=True)


def read_manifest(directory: str) -> dict | None:
    """The manifest of a complete cache folder, or None."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        manifest = json.load(handle)
    return manifest if manifest.get("version") == CACHE_VERSION else None


class ShardedTensors:
    """Row access to a cache folder's tensors; shards are memory-mapped lazily (safe in workers)."""

    def __init__(self, directory: str):
        manifest = read_manifest(directory)
        if manifest is None:
            raise FileNotFoundError(f"{directory}: not a complete cache (no {MANIFEST}); delete it to rebuild")
        self.directory, self.manifest = directory, manifest
        self.starts, start = [], 0
        for shard in manifest["shards"]:
            self.starts.append(start)
            start += shard["rows"]
        self.rows = start
        self._handles = {}

    def __getstate__(self):
        return {**self.__dict__, "_handles": {}}

    def __len__(self) -> int:
        return self.rows

    def _locate(self, index: int) -> tuple[int, int]:
        shard = max(i for i, start in enumerate(self.starts) if start <= index)
        return shard, index - self.starts[shard]

    def get(self, name: str, index: int) -> torch.Tensor:
        shard, row = self._locate(index)
        if shard not in self._handles:
            path = os.path.join(self.directory, self.manifest["shards"][shard]["file"])
            self._handles[shard] = safe_open(path, framework="pt")
        return self._handles[shard].get_slice(name)[row:row + 1][0]

    def column(self, name: str) -> torch.Tensor:
        """The whole column [rows, ...] (small columns: flags, sizes)."""
        parts = []
        for shard in self.manifest["shards"]:
            with safe_open(os.path.join(self.directory, shard["file"]), framework="pt") as handle:
                parts.append(handle.get_tensor(name))
        return torch.cat(parts)


def load_or_build(root: str, kind: str, key: dict, build_batches, extra_fn=None) -> ShardedTensors:
    """The cache for `key` under `root`: reused when complete, else built from `build_batches()`.

    build_batches: a function returning an iterable of dicts of tensors [B, ...].
    extra_fn: called after building, returns extra manifest entries (e.g. captions).
    """
    directory = os.path.join(root, f"{kind}-{fingerprint(key)}")
    manifest = read_manifest(directory)
    if manifest is not None and manifest["key"] == json.loads(json.dumps(key, default=str)):
        logger.info(f"Reusing cached {kind} from {directory} ({manifest['rows']} rows)")
        return ShardedTensors(directory)
    logger.info(f"Building the {kind} cache in {directory}")
    batches = build_batches()
    write_cache(directory, batches, key, extra=extra_fn() if extra_fn else None)
    return ShardedTensors(directory)


# ----------------------------------------------------------------------------------------------
# Text-to-image: what TextImageDataset would draw, replayed from stored values
# ----------------------------------------------------------------------------------------------

def draw_augmentation(caption_value, rng, caption_dropout_prob: float, resized_size: tuple[int, int], resolution: int,
                      center_crop: bool, random_flip: bool, where: str):
    """(caption, (top, left), flip) with the random draws of `TextImageDataset.load` in the same order.

    The order (caption choice, caption dropout, crop, flip) must match `TextImageDataset.load` and
    `ImageTransform.__call__`; tests/test_latent_cache.py checks the loss sequences are equal.
    """
    caption = pick_caption(caption_value, rng, where)
    if caption_dropout_prob > 0 and rng.random() < caption_dropout_prob:
        caption = ""
    top, left = crop_origin(resized_size, resolution, center_crop, rng)
    flip = random_flip and rng.random() < 0.5
    return caption, (top, left), flip


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


def _is_channels_last(tensor: torch.Tensor) -> bool:
    """The VAE's output layout (channels_last from oneDNN on CPU) decides how `randn_like` fills the
    noise; the caches keep it so cached training draws the very same noise."""
    return tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous()


def encode_latent_batches(dataset, vae, device, batch_size: int):
    """Yield {"mean", "std" [B, C, h, w] (+ "mean_flipped", "std_flipped"), "size" [B, 2], "valid" [B]}."""
    transform = dataset.transform
    rows = dataset.rows
    for start in range(0, len(rows), batch_size):
        pixels, sizes, valid = [], [], []
        for index in range(start, min(start + batch_size, len(rows))):
            row = rows[index]
            where = f"{dataset.source_name} row {index}"
            try:
                image = load_image(row[dataset.image_column], name=where if not isinstance(row[dataset.image_column], str)
                                   else row[dataset.image_column])
                image = resize_short_side(image, transform.resolution, transform.interpolation)
                _, (top, left), _ = draw_augmentation(row[dataset.caption_column], sample_rng(dataset.seed, 0, index),
                                                      dataset.caption_dropout_prob, image.size, transform.resolution,
                                                      transform.center_crop, transform.random_flip, where)
                crop = image.crop((left, top, left + transform.resolution, top + transform.resolution))
                pixels.append(pil_to_tensor(crop))
                sizes.append(image.size)
                valid.append(True)
            except BadSampleError as error:
                if not dataset.skip_bad_samples:
                    raise
                logger.warning(f"Not caching bad sample ({error})")
                pixels.append(torch.zeros(3, transform.resolution, transform.resolution))
                sizes.append((transform.resolution, transform.resolution))
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
        channels_last = _is_channels_last(dist.parameters)
        batch.update(size=torch.tensor(sizes, dtype=torch.int64), valid=torch.tensor(valid, dtype=torch.bool),
                     channels_last=torch.full((len(pixels),), channels_last, dtype=torch.bool))
        yield batch


def encode_text_batches(captions: list[str], tokenize, text_encoder, device, batch_size: int):
    """Yield {"embeddings": [B, L, D]} for `captions` in order."""
    for start in range(0, len(captions), batch_size):
        input_ids = torch.stack([tokenize(c) for c in captions[start:start + batch_size]]).to(device)
        with torch.no_grad():
            yield {"embeddings": text_encoder(input_ids, return_dict=False)[0]}


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
        self.channels_last = bool(latents.column("channels_last").any()) if latents is not None else False
        self.num_skipped = 0

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def _embedding(self, caption: str) -> torch.Tensor:
        return self.text.get("embeddings", self.caption_index[caption])

    def __getitem__(self, index: int) -> dict:
        base = self.base
        if self.latents is None:  # images as usual, embeddings from the cache
            item = dict(base[index])
            item["encoder_hidden_states"] = self._embedding(item["caption"])
            del item["input_ids"]
            return item
        for attempt in range(len(base)):
            current = (index + attempt) % len(base)
            if not self.valid[current]:
                self.num_skipped += 1
                continue
            where = f"{base.source_name} row {current}"
            caption, _, flip = draw_augmentation(base.rows[current][base.caption_column], sample_rng(base.seed, base.epoch, current),
                                                 base.caption_dropout_prob, tuple(self.sizes[current]), base.transform.resolution,
                                                 base.transform.center_crop, base.transform.random_flip, where)
            suffix = "_flipped" if flip else ""
            item = {"latent_mean": self.latents.get("mean" + suffix, current),
                    "latent_std": self.latents.get("std" + suffix, current), "caption": caption,
                    "latent_channels_last": self.channels_last}
            if self.text is not None:
                item["encoder_hidden_states"] = self._embedding(caption)
            else:
                item["input_ids"] = base.tokenize(caption)
            return item
        raise BadSampleError(f"{base.source_name}: every sample is unreadable")


def collate_cached(examples: list[dict]) -> dict:
    """Stack every tensor field; captions become a list, flags are taken from the first item."""
    batch = {key: torch.stack([e[key] for e in examples]) if torch.is_tensor(value) else value
             for key, value in examples[0].items() if key != "caption"}
    batch["captions"] = [e["caption"] for e in examples]
    return batch


def sample_cached_latents(batch: dict, vae_config, generator: torch.Generator | None = None) -> torch.Tensor:
    """Scaled latents [B, C, h, w] drawn from the cached distribution, like `latent_dist.sample(generator)`.

    Same dtype, shape and random-number use as the uncached path, hence the same values.
    """
    mean, std = batch["latent_mean"], batch["latent_std"]
    if batch.get("latent_channels_last"):
        mean, std = mean.contiguous(memory_format=torch.channels_last), std.contiguous(memory_format=torch.channels_last)
    noise_device = generator.device if generator is not None else mean.device  # as diffusers' randn_tensor
    latents = mean + std * torch.randn(mean.shape, generator=generator, device=noise_device, dtype=mean.dtype).to(mean.device)
    shift = getattr(vae_config, "shift_factor", None) or 0.0
    return (latents - shift) * vae_config.scaling_factor


def cache_text_image_dataset(dataset, vae, text_encoder, args, accelerator):
    """Wrap a `TextImageDataset` with the caches that --cache_latents/--cache_text_embeddings ask for.

    Builds missing caches on the main process (others wait and then read them). Returns the
    dataset unchanged when no caching is asked for.
    """
    if not (args.cache_latents or args.cache_text_embeddings):
        return dataset
    device = accelerator.device
    latents = text = None
    with accelerator.main_process_first():
        if args.cache_latents:
            transform = dataset.transform
            key = {"kind": "sd-latents", "rows": rows_fingerprint(dataset.rows, dataset.image_column, dataset.caption_column),
                   "vae": module_fingerprint(vae), "dtype": str(vae.dtype), "resolution": transform.resolution,
                   "interpolation": transform.interpolation, "center_crop": transform.center_crop,
                   "random_flip": transform.random_flip}
            if not transform.center_crop:  # the epoch-0 crop depends on the random draws before it
                key.update(seed=dataset.seed, caption_dropout_prob=dataset.caption_dropout_prob)
            latents = load_or_build(args.latent_cache_dir, "latents", key,
                                    lambda: encode_latent_batches(dataset, vae, device, args.cache_batch_size))
            if not transform.center_crop:
                logger.warning("--cache_latents with random crops: each image keeps the crop drawn for epoch 0 "
                               "(no effect for images already square at --resolution; use --center_crop to silence).")
        if args.cache_text_embeddings:
            captions = all_captions(dataset.rows, dataset.caption_column, dataset.caption_dropout_prob)
            input_ids = torch.stack([dataset.tokenize(c) for c in captions]) if captions else torch.zeros(0)
            key = {"kind": "clip-text", "captions": fingerprint(captions),
                   "input_ids": hashlib.sha256(input_ids.numpy().tobytes()).hexdigest()[:20],
                   "text_encoder": module_fingerprint(text_encoder), "dtype": str(text_encoder.dtype)}
            text = load_or_build(args.latent_cache_dir, "text", key,
                                 lambda: encode_text_batches(captions, dataset.tokenize, text_encoder, device, args.cache_batch_size),
                                 extra_fn=lambda: {"captions": captions})
    return CachedTextImageDataset(dataset, latents, text)


def offload_cached_encoders(models: dict, args) -> None:
    """Move the encoders the caches replace off the training device (validation moves them back)."""
    if args.cache_latents and models.get("vae") is not None:
        models["vae"].to("cpu")
    if args.cache_text_embeddings and models.get("text_encoder") is not None:
        models["text_encoder"].to("cpu")


@contextlib.contextmanager
def cached_encoders_on(device, models: dict, args):
    """The encoders the caches replaced on `device` for the block (e.g. sampling), then off it again."""
    for name, cached in (("vae", args.cache_latents), ("text_encoder", args.cache_text_embeddings)):
        if cached and models.get(name) is not None:
            models[name].to(device)
    try:
        yield
    finally:
        offload_cached_encoders(models, args)


# ----------------------------------------------------------------------------------------------
# Mask DiT: `utils.paired_data.PairedImageMaskDataset`, replayed from stored values
# ----------------------------------------------------------------------------------------------

def _record_reference(record) -> list:
    return [record.name, image_reference(record.image), image_reference(record.mask), record.caption]


def paired_rows_fingerprint(dataset) -> str:
    """Hash of the dataset's pairs in order: image and mask files (path, size, mtime; or pixels) and captions."""
    digest = hashlib.sha256()
    for index in dataset.indices:
        digest.update(json.dumps(_record_reference(dataset.records[index]), default=str).encode("utf-8"))
    return digest.hexdigest()[:20]


def _resized_size(image_size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """The (width, height) `PairedImageMaskDataset` resizes an image of `image_size` to."""
    width, height = image_size
    scale = resolution / min(width, height)
    return max(resolution, round(width * scale)), max(resolution, round(height * scale))


def draw_pair_flip(dataset, index: int, resized_size: tuple[int, int], epoch: int) -> bool:
    """Whether `PairedImageMaskDataset` flips item `index` in `epoch`: its draws (crop, then flip) replayed."""
    rng = sample_rng(dataset.seed, epoch, index)
    crop_origin(resized_size, dataset.resolution, not dataset.random_crop, rng)
    return dataset.random_flip and rng.random() < 0.5


def encode_pair_batches(dataset, vae, device, batch_size: int):
    """Yield {"mean", "std" [B, C, h, w] (+ "mean_flipped", "std_flipped"), "mask" uint8 [B, K, R, R],
    "size" [B, 2], "channels_last" [B]} for the epoch-0 crops of a `PairedImageMaskDataset`."""
    from PIL import Image

    from utils.paired_data import PairedImageMaskDataset

    # The same pairs without the flip: the crop is drawn before the flip, so it is the epoch-0 crop.
    unflipped = PairedImageMaskDataset(dataset.records, dataset.resolution, dataset.mask_channels, dataset.random_crop,
                                       False, dataset.indices, dataset.seed)
    for start in range(0, len(dataset), batch_size):
        items = [unflipped[index] for index in range(start, min(start + batch_size, len(dataset)))]
        sizes = []
        for index in range(start, start + len(items)):
            image = dataset.records[dataset.indices[index]].image
            if isinstance(image, str):
                with Image.open(image) as opened:  # the header only
                    image_size = opened.size
            else:
                image_size = image.size
            sizes.append(_resized_size(image_size, dataset.resolution))
        pixel_values = torch.stack([item["pixel_values"] for item in items])
        if dataset.random_flip:
            pixel_values = torch.cat([pixel_values, pixel_values.flip(-1)])
        with torch.no_grad():
            dist = vae.encode(pixel_values.to(device, vae.dtype)).latent_dist
        half = len(items)
        batch = {"mean": dist.mean[:half], "std": dist.std[:half]}
        if dataset.random_flip:
            batch.update(mean_flipped=dist.mean[half:], std_flipped=dist.std[half:])
        channels_last = _is_channels_last(dist.parameters)
        batch.update(mask=torch.stack([item["mask"] for item in items]).to(torch.uint8),
                     size=torch.tensor(sizes, dtype=torch.int64),
                     channels_last=torch.full((half,), channels_last, dtype=torch.bool))
        yield batch


def encode_caption_batches(captions: list[str], tokenizer, text_encoder, max_length: int, hidden_layer: int, batch_size: int):
    """Yield {"embeddings": [B, S, D], "attention_mask": [B, S]} from `encode_captions`, for `captions` in order."""
    from utils.mask_dit_sampling import encode_captions

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
            flip = draw_pair_flip(self.base, index, tuple(self.sizes[index]), self.base.epoch)
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


def cache_pair_latents(dataset, vae, vae_fingerprint: str, args, device) -> ShardedTensors:
    """The latents cache of one `PairedImageMaskDataset` (built if missing; see `encode_pair_batches`)."""
    key = {"kind": "mask-dit-latents", "pairs": paired_rows_fingerprint(dataset), "vae": vae_fingerprint,
           "dtype": str(vae.dtype), "resolution": dataset.resolution, "mask_channels": dataset.mask_channels,
           "random_crop": dataset.random_crop, "random_flip": dataset.random_flip}
    if dataset.random_crop:  # the epoch-0 crop is drawn from the seed
        key["seed"] = dataset.seed
    captions = [dataset.records[i].caption for i in dataset.indices]
    return load_or_build(args.latent_cache_dir, "latents", key,
                         lambda: encode_pair_batches(dataset, vae, device, args.cache_batch_size),
                         extra_fn=lambda: {"captions": captions})


def cache_caption_embeddings(captions: list[str], tokenizer, text_encoder, args) -> ShardedTensors:
    """The caption-embedding cache of `captions` (sorted), built if missing; see `encode_caption_batches`."""
    tokens = tokenizer(captions, padding="max_length", max_length=args.max_caption_length, truncation=True,
                       return_tensors="pt")
    key = {"kind": "caption-embeddings", "captions": fingerprint(captions),
           "tokens": hashlib.sha256(tokens.input_ids.numpy().tobytes() + tokens.attention_mask.numpy().tobytes()).hexdigest()[:20],
           "max_length": args.max_caption_length, "hidden_layer": args.caption_hidden_layer,
           "text_encoder": module_fingerprint(text_encoder), "dtype": str(text_encoder.dtype)}
    return load_or_build(args.latent_cache_dir, "text", key,
                         lambda: encode_caption_batches(captions, tokenizer, text_encoder, args.max_caption_length,
                                                        args.caption_hidden_layer, args.cache_batch_size),
                         extra_fn=lambda: {"captions": captions})


def cache_paired_datasets(datasets: list, vae, tokenizer, text_encoder, args, accelerator):
    """Wrap `PairedImageMaskDataset`s (None passes through) with the caches --cache_latents /
    --cache_text_embeddings ask for; one text cache holds the captions of all of them.

    Returns (the datasets, the empty caption's (embedding [S, D], attention mask [S]) on the device
    when captions are cached and drop out, else None). Missing caches are built on the main
    process; the others wait and then read them.
    """
    if not (args.cache_latents or args.cache_text_embeddings):
        return datasets, None
    present = [d for d in datasets if d is not None]
    latents, text, empty_caption = [None] * len(datasets), None, None
    with accelerator.main_process_first():
        if args.cache_latents:
            vae_fingerprint = module_fingerprint(vae)
            latents = [cache_pair_latents(d, vae, vae_fingerprint, args, accelerator.device) if d is not None else None
                       for d in datasets]
            if any(d.random_crop for d in present):
                logger.warning("--cache_latents with --random_crop: each pair keeps the crop drawn for epoch 0 (no "
                               "effect for images already square at --resolution; drop --random_crop to silence).")
        if args.cache_text_embeddings:
            captions = {d.records[i].caption for d in present for i in d.indices}
            if args.caption_dropout_prob > 0:
                captions.add("")
            text = cache_caption_embeddings(sorted(captions), tokenizer, text_encoder, args)
            if args.caption_dropout_prob > 0:
                row = text.manifest["captions"].index("")
                empty_caption = (text.get("embeddings", row).to(accelerator.device),
                                 text.get("attention_mask", row).to(accelerator.device))
    wrapped = [CachedPairedDataset(d, cache, text) if d is not None else None for d, cache in zip(datasets, latents)]
    return wrapped, empty_caption
