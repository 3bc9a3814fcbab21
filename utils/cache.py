"""The generic on-disk tensor cache: fingerprints, sharded safetensors with an atomic manifest,
and the --cache_latents/--cache_text_embeddings/--precompute flags.

What is stored and replayed for each domain lives with the domain: `utils.sd.cache` (text-image)
and `utils.mask_dit.cache` (image-mask pairs).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass, fields

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from utils.atomic import atomic_directory
from utils.errors import UserError, UserFileNotFoundError
from utils.latents import scale_latents

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


def resolve_cache_args(args, train_text_encoder: bool = False, has_vae: bool = True,
                       has_text_encoder: bool = True) -> dict:
    """Check the cache flags' combinations and return what they come to, for the script's parse_args to apply:
    --precompute means both caches (where the model has that encoder); the cache folder defaults to
    <output_dir>/latent_cache."""
    if args.cache_latents and not has_vae:
        raise UserError("--cache_latents needs a VAE (--vae_model_name_or_path): a pixel-space model has no latents "
                        "to cache. --cache_text_embeddings works without one.")
    if args.cache_text_embeddings and not has_text_encoder:
        raise UserError("--cache_text_embeddings needs a text encoder (--text_encoder_name_or_path).")
    latents = has_vae if args.precompute else args.cache_latents
    text_embeddings = has_text_encoder if args.precompute else args.cache_text_embeddings
    if text_embeddings and train_text_encoder:
        raise UserError("--cache_text_embeddings (or --precompute) needs a frozen text encoder; "
                        "drop --train_text_encoder or use --cache_latents alone.")
    return {"cache_latents": latents, "cache_text_embeddings": text_embeddings,
            "latent_cache_dir": args.latent_cache_dir or os.path.join(args.output_dir, "latent_cache")}


@dataclass(frozen=True)
class CacheSettings:
    """The cache flags as `resolve_cache_args` left them, typed: what the caches and the encoder offload read
    (`from_args`: the flags of the same names)."""

    cache_latents: bool
    cache_text_embeddings: bool
    latent_cache_dir: str | None
    cache_batch_size: int

    @classmethod
    def from_args(cls, args) -> "CacheSettings":
        return cls(**{field.name: getattr(args, field.name) for field in fields(cls)})


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


def write_cache(directory: str, batches, key: dict, extra: dict | None = None, shard_size: int = 4096) -> None:
    """Write batches (dicts of tensors [B, ...]) as safetensors shards, then the manifest, atomically."""
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

    with atomic_directory(directory, unique_temp=True) as temp:  # (an incomplete leftover without manifest: replaced)
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
            raise UserFileNotFoundError(f"{directory}: not a complete cache (no {MANIFEST}); delete it to rebuild")
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

    def has(self, name: str) -> bool:
        if not self.manifest["shards"]:
            return False
        with safe_open(os.path.join(self.directory, self.manifest["shards"][0]["file"]), framework="pt") as handle:
            return name in handle.keys()

    def column(self, name: str) -> torch.Tensor:
        """The whole column [rows, ...] (small columns: flags, sizes)."""
        parts = []
        for shard in self.manifest["shards"]:
            with safe_open(os.path.join(self.directory, shard["file"]), framework="pt") as handle:
                parts.append(handle.get_tensor(name))
        return torch.cat(parts)


class BucketedLatents:
    """One latent cache per aspect-ratio bucket (their latents differ in shape), read as one: `get(name, index)`
    and `column(name)` by dataset index, like `ShardedTensors`."""

    def __init__(self, parts: list[tuple[list[int], ShardedTensors]], rows: int):
        self.parts, self.rows = parts, rows
        self.where = {index: (part, row) for part, (indices, _) in enumerate(parts) for row, index in enumerate(indices)}

    def get(self, name: str, index: int) -> torch.Tensor:
        part, row = self.where[index]
        return self.parts[part][1].get(name, row)

    def column(self, name: str) -> torch.Tensor:
        values = [None] * self.rows
        for indices, tensors in self.parts:
            for index, value in zip(indices, tensors.column(name)):
                values[index] = value
        return torch.stack(values)

    def has(self, name: str) -> bool:
        return self.parts[0][1].has(name)

    @property
    def manifest(self) -> dict:
        """The parts' per-row manifest lists (e.g. "captions") put back in dataset order."""
        merged = {}
        for indices, tensors in self.parts:
            for key, values in tensors.manifest.items():
                if isinstance(values, list) and len(values) == len(indices) and key != "shards":
                    merged.setdefault(key, [None] * self.rows)
                    for index, value in zip(indices, values):
                        merged[key][index] = value
        return merged


@contextlib.contextmanager
def builders_first(accelerator):
    """Order the processes around building a cache: the global main process first, then the first process
    of every other node (machine), then the rest, which only read.

    Inside, `load_or_build` builds what it does not find: on storage all nodes share, only the main
    process builds (everyone else then finds it); on node-local storage (--latent_cache_dir on a local
    disk) each node builds it once. No two processes ever write one cache folder at the same time.
    (Every barrier here is global, so every process passes the same two.)"""
    with accelerator.main_process_first():
        with accelerator.local_main_process_first():
            yield


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


def is_channels_last(tensor: torch.Tensor) -> bool:
    """The VAE's output layout (channels_last from oneDNN on CPU) decides how `randn_like` fills the
    noise; the caches keep it so cached training draws the very same noise."""
    return tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous()


def offload_cached_encoders(models: dict, cache: CacheSettings) -> None:
    """Move the encoders the caches replace off the training device (validation moves them back)."""
    if cache.cache_latents and models.get("vae") is not None:
        models["vae"].to("cpu")
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if cache.cache_text_embeddings and models.get(name) is not None:
            models[name].to("cpu")


@contextlib.contextmanager
def cached_encoders_on(device, models: dict, cache: CacheSettings):
    """The encoders the caches replaced on `device` for the block (e.g. sampling), then off it again."""
    for name, cached in (("vae", cache.cache_latents), ("text_encoder", cache.cache_text_embeddings),
                         ("text_encoder_2", cache.cache_text_embeddings),
                         ("text_encoder_3", cache.cache_text_embeddings)):
        if cached and models.get(name) is not None:
            models[name].to(device)
    try:
        yield
    finally:
        offload_cached_encoders(models, cache)


def collate_cached(examples: list[dict]) -> dict:
    """Stack every tensor field; captions become a list, flags are taken from the first item."""
    batch = {key: torch.stack([e[key] for e in examples]) if torch.is_tensor(value) else value
             for key, value in examples[0].items() if key not in ("caption", "name")}
    batch["captions"] = [e["caption"] for e in examples]
    if "latent_channels_last_single" in batch:  # the layout vae.encode gives a batch of this size
        single = batch.pop("latent_channels_last_single")
        if len(examples) == 1:
            batch["latent_channels_last"] = single
    if "name" in examples[0]:
        batch["names"] = [e["name"] for e in examples]
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
    return scale_latents(latents, vae_config)
