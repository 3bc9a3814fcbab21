"""Data mechanics every script shares: per-sample randomness, epoch-aware datasets, the train dataloader.
"""

from __future__ import annotations

import logging
import math
import random

import numpy as np
import torch

from utils.errors import UserError

logger = logging.getLogger(__name__)
_WARNED: set = set()  # (dataset size, batch size) pairs already warned about: a script builds its loader twice


def add_data_source_args(parser, *, train_data_dir_help: str, dataset_name_help: str, aliases: dict | None = None,
                         train_data_dir_required: bool = False) -> None:
    """--train_data_dir and --dataset_name, defined once: each trainer says what its folder holds and what a dataset
    name means to it (`aliases`: other names of a flag, e.g. guide 004's `--dataset_dir`)."""
    names = lambda dest: [f"--{dest}", *(aliases or {}).get(dest, ())]  # noqa: E731
    parser.add_argument(*names("train_data_dir"), dest="train_data_dir", type=str, default=None,
                        required=train_data_dir_required, help=train_data_dir_help)
    parser.add_argument(*names("dataset_name"), dest="dataset_name", type=str, default=None, help=dataset_name_help)


def add_image_caption_args(parser, *, caption_dropout_prob: float) -> None:
    """The columns of an image-caption table, --random_flip and --caption_dropout_prob (diffusers' names; each
    trainer gives the dropout default)."""
    parser.add_argument("--image_column", type=str, default="image", help="The column of the dataset containing an image.")
    parser.add_argument("--caption_column", type=str, default="text",
                        help="The column of the dataset containing a caption or a list of captions. (A DreamBooth "
                             "run from --dataset_name reads it only when given, as diffusers' DreamBooth scripts: "
                             "otherwise every image gets --instance_prompt.)")
    parser.add_argument("--random_flip", action="store_true", help="whether to randomly flip images horizontally")
    parser.add_argument("--caption_dropout_prob", type=float, default=caption_dropout_prob,
                        help="Replace a caption by the empty prompt with this probability, so classifier-free "
                             "guidance works.")


class BadSampleError(UserError):
    """A sample that cannot be used; the message names the file or row."""


def read_caption_file(path: str) -> str:
    """A caption `.txt` as text (UTF-8, a BOM allowed); another encoding names the file and the fix."""
    raw = open(path, "rb").read()
    try:
        return raw.decode("utf-8-sig").strip()
    except UnicodeDecodeError as error:
        raise BadSampleError(f"{path}: caption file is not valid UTF-8 ({error}); re-save it as UTF-8") from error


def first_bad_json_line(path: str) -> str | None:
    """`path:line: problem` for the first line of a JSON-lines file that is not one JSON object, else None."""
    import json

    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as error:
                return f"{path}:{number}: not valid UTF-8 ({error})"
            except json.JSONDecodeError as error:
                return f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno})"
            if not isinstance(record, dict):
                return f"{path}:{number}: a JSON {type(record).__name__}, not an object {{\"file_name\": ..., ...}}"
    return None


def read_json_lines(path: str) -> list[tuple[int, dict]]:
    """(line number, object) for each non-empty line of a JSON-lines file; a bad line is a UserError naming
    `path:line` and the problem."""
    import json

    bad = first_bad_json_line(path)
    if bad:
        raise UserError(f"{bad}. Fix that line (one JSON object per line, UTF-8).")
    with open(path, encoding="utf-8") as handle:
        return [(number, json.loads(line)) for number, line in enumerate(handle, 1) if line.strip()]


class SkipsBadSamples:
    """For datasets: with `skip_bad_samples`, a sample whose files fail to decode (a truncated file whose
    header the pre-flight scan could read) is replaced by the next good one and counted (`num_skipped`);
    without, its BadSampleError (naming the file) stops the run."""

    skip_bad_samples = False
    num_skipped = 0
    source_name = "dataset"

    def interchangeable(self, index: int, other: int) -> bool:
        """Whether sample `other` may stand in for `index` in a batch (e.g. the same aspect-ratio bucket)."""
        return True

    def first_good(self, index: int, load):
        for attempt in range(len(self)):
            current = (index + attempt) % len(self)
            if not self.interchangeable(index, current):
                continue
            try:
                return load(current)
            except BadSampleError as error:
                if not self.skip_bad_samples:
                    raise
                self.num_skipped += 1
                logger.warning(f"Skipping bad sample ({error}); {self.num_skipped} skipped so far")
        raise BadSampleError(f"{self.source_name}: every sample is unreadable")


def sample_rng(seed: int | None, epoch: int, index: int) -> random.Random:
    """The random source for one sample's augmentation: a pure function of (seed, epoch, index)."""
    return random.Random(hash(((seed or 0), epoch, index)) & 0xFFFFFFFFFFFF)


class EpochDataset(torch.utils.data.Dataset):
    """A dataset whose augmentation depends on the epoch (`sample_rng(seed, epoch, index)`).

    The epoch lives in a shared-memory tensor, so persistent DataLoader workers, which hold copies of
    the dataset made when they started, see every `set_epoch` the main process makes. The loop calls
    `set_epoch` before iterating, and workers take the epoch's first indices only after that.
    """

    @property
    def epoch(self) -> int:
        return int(self._epoch_cell())

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch_cell().fill_(int(value))

    def _epoch_cell(self) -> torch.Tensor:
        cell = self.__dict__.get("_shared_epoch")
        if cell is None:  # made by the first assignment, in __init__ (main process), before workers exist
            cell = self.__dict__["_shared_epoch"] = torch.zeros((), dtype=torch.int64).share_memory_()
        return cell

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


def make_train_dataloader(dataset, batch_size: int, num_workers: int, collate_fn=None, shuffle: bool = True,
                          drop_last: bool = False, buckets: list | None = None, seed: int | None = None):
    """The training DataLoader with throughput settings: pinned host memory when a GPU is there;
    with workers, deeper prefetching and persistent workers (not restarted every epoch; the
    datasets keep the epoch in shared memory, see `EpochDataset`). A dataset with a `prior` list (DreamBooth's
    class rows) gets instance/class halves per batch (`PairedBatchSampler`), one with `buckets` one bucket a batch."""
    size = len(dataset) if hasattr(dataset, "__len__") else None
    if size is not None and isinstance(batch_size, int) and batch_size > size and (size, batch_size) not in _WARNED:
        _WARNED.add((size, batch_size))
        logger.warning(f"The batch size {batch_size} (per process) is larger than the dataset ({size} samples): every "
                       f"step trains on a batch of {size}" + (", and drop_last leaves no batch at all" if drop_last else "")
                       + ". Lower --train_batch_size, or add data.")
    kwargs = dict(pin_memory=torch.cuda.is_available())
    if num_workers > 0:
        kwargs.update(prefetch_factor=4, persistent_workers=True)
    # A generator of its own: creating a DataLoader iterator draws a base seed, from torch's global
    # RNG otherwise. An uninterrupted run draws it at the epoch start, before a mid-epoch
    # checkpoint; a run resumed from that checkpoint would draw it after restoring the RNG and
    # then sample different noise (no longer bitwise identical). The order comes from
    # accelerate's seedable sampler, which reseeds this generator every epoch.
    base = getattr(dataset, "base", dataset)  # (a cached dataset wraps the one that holds the epoch)
    sampler = None
    if getattr(base, "prior", None) is not None and any(base.prior):  # DreamBooth prior preservation
        sampler = PairedBatchSampler(base.prior, batch_size, seed, dataset=base)
    elif buckets is not None:  # --enable_bucket: every batch from one aspect-ratio bucket (utils.buckets)
        from utils.buckets import BucketBatchSampler

        sampler = BucketBatchSampler(buckets, batch_size, seed, dataset=base)
    if sampler is not None:
        return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn,
                                           num_workers=num_workers, generator=torch.Generator(), **kwargs)
    return torch.utils.data.DataLoader(dataset, shuffle=shuffle, collate_fn=collate_fn, batch_size=batch_size,
                                       num_workers=num_workers, drop_last=drop_last, generator=torch.Generator(), **kwargs)


class PairedBatchSampler:
    """Batches of two halves: `batch_size` indices with `second[i]` False, then as many with it True (DreamBooth's
    instance and class images, as diffusers' DreamBooth dataset pairs them). An epoch is max(#first, #second)
    pairs, each side cycled through a (seed, epoch) shuffle, the same in every process; the loss splits each
    batch in its two halves."""

    batch_size = None  # accelerate: batches are units (each process takes whole batches)
    drop_last = False

    def __init__(self, second: list[bool], batch_size: int, seed: int | None, dataset=None):
        self.instances = [i for i, p in enumerate(second) if not p]
        self.classes = [i for i, p in enumerate(second) if p]
        self.per_batch, self.seed, self.dataset, self._epoch = int(batch_size), seed or 0, dataset, 0

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    @property
    def epoch(self) -> int:
        return int(getattr(self.dataset, "epoch", self._epoch)) if self.dataset is not None else self._epoch

    def _cycle(self, indices: list[int], count: int, rng: random.Random) -> list[int]:
        order = []
        while len(order) < count:
            shuffled = list(indices)
            rng.shuffle(shuffled)
            order += shuffled
        return order[:count]

    def batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(hash((self.seed, epoch, -11)) & 0xFFFFFFFFFFFF)  # ints only: the same in every process
        pairs = max(len(self.instances), len(self.classes))
        instances, classes = self._cycle(self.instances, pairs, rng), self._cycle(self.classes, pairs, rng)
        return [instances[s:s + self.per_batch] + classes[s:s + self.per_batch] for s in range(0, pairs, self.per_batch)]

    def __iter__(self):
        return iter(self.batches(self.epoch))

    def __len__(self) -> int:
        return math.ceil(max(len(self.instances), len(self.classes)) / self.per_batch)


def epoch_batches(accelerator, dataloader, dataset, epoch: int, position=None):
    """The batches of `epoch`: dataset and sampler moved to the epoch (the per-sample randomness and the
    shuffle depend on it), and on the resumed epoch without the batches already trained on
    (`position`: a `utils.checkpointing.ResumePosition`)."""
    if hasattr(dataloader, "set_epoch"):
        dataloader.set_epoch(epoch)
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    if position is None or epoch != position.first_epoch or not position.batches_to_skip:
        return dataloader
    batches = accelerator.skip_first_batches(dataloader, position.batches_to_skip)
    if hasattr(batches, "set_epoch"):
        batches.set_epoch(epoch)
    return batches


GOLDEN_RATIO_CONJUGATE = 0.6180339887498949


def held_out_position(index):
    """Held-out sample `index`'s fixed place in [0, 1): a low-discrepancy (golden-ratio) spread, so any number of
    samples covers the range evenly. The one rule behind every trainer's val/loss timesteps (text-to-image scales
    it to [0, T) integer steps, the mask DiT uses it as its flow time). `index`: an int or a tensor of them."""
    return (index * GOLDEN_RATIO_CONJUGATE + 0.5) % 1.0


def split_train_validation(num_items: int, validation_fraction: float, seed: int | None) -> tuple[list[int], list[int]]:
    """Seeded (train indices, held-out indices); at least one held-out item when validation_fraction > 0.
    The held-out set of train_mask_dit.py and of train_text_to_image.py --validation_split."""
    order = np.random.default_rng((seed if seed is not None else 0) + 1).permutation(num_items).tolist()
    held_out = max(1, round(validation_fraction * num_items)) if validation_fraction > 0 else 0
    if held_out >= num_items:
        raise UserError(f"--validation_split {validation_fraction} leaves no training data ({num_items} samples)")
    return sorted(order[held_out:]), sorted(order[:held_out])
