"""`--train_batch_size auto`: the largest per-device batch that fits, found with real training steps.

The probe runs forward + backward at growing batch sizes (1, 2, 4, ... until one fails, then a
binary search between the last fit and the first failure). A size fails when it raises an
out-of-memory error (CUDA) or when its measured peak memory exceeds a cap: on CPU the cap is
required (the kernel's OOM killer does not raise) and defaults to 80% of the memory available
when the probe starts; peak memory there is the process's resident-set high-water mark
(`VmHWM`, reset through /proc/self/clear_refs). The optimizer state that a probe step does not
create (AdamW's two fp32 moments) is held as a reserved buffer during the probe.

`--effective_batch_size N` then keeps N samples per optimizer step: the per-device batch is the
largest fitting one that, with gradient accumulation, gives exactly N (or the nearest above).
"""

from __future__ import annotations

import logging
import random
import re

import numpy as np
import torch

from utils.errors import UserError, is_oom_error

logger = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_SIZE = 1024


def batch_size_arg(value: str):
    """argparse type: a positive integer or 'auto'."""
    if str(value).lower() == "auto":
        return "auto"
    try:
        size = int(value)
    except ValueError as error:
        raise UserError(f"--train_batch_size {value!r}: give a positive integer or 'auto'") from error
    if size < 1:
        raise UserError(f"--train_batch_size {value}: must be >= 1")
    return size


def parse_bytes(value) -> int | None:
    """'12GB', '512MiB', '1e9' or an int -> bytes (powers of 1024 for every unit)."""
    if value is None or isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?)i?B?\s*", str(value), flags=re.IGNORECASE)
    if not match:
        raise UserError(f"{value!r}: expected a memory size such as 12GB or 512MiB")
    scale = 1024 ** "_KMGT".index(match.group(2).upper() or "_")
    return int(float(match.group(1)) * scale)


def add_auto_batch_args(parser) -> None:
    group = parser.add_argument_group("automatic batch size (batch size 'auto')")
    group.add_argument("--effective_batch_size", type=int, default=None,
                       help="With --train_batch_size auto: samples per optimizer step (all devices, accumulation included); "
                            "gradient accumulation is set to keep it. Default: the fitting batch x --gradient_accumulation_steps.")
    group.add_argument("--auto_batch_max", type=int, default=DEFAULT_MAX_BATCH_SIZE,
                       help="Largest per-device batch the probe tries.")
    group.add_argument("--auto_batch_max_memory", type=str, default=None,
                       help="Memory cap for the probe, e.g. 20GB (peak allocated on GPU, peak RSS on CPU). "
                            "Default: the device's real limit on GPU, 80%% of available memory on CPU.")


# ----------------------------------------------------------------------------------------------
# Memory measurement
# ----------------------------------------------------------------------------------------------

def _proc_status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def available_cpu_memory() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory of a region: max allocated on CUDA, the RSS high-water mark on CPU (Linux)."""

    def __init__(self, device):
        self.device = torch.device(device)

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _release_freed_memory()
            try:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
                with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
                    handle.write("5")
            except OSError:
                pass

    def peak(self) -> int | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return _proc_status_bytes("VmHWM")

    def current(self) -> int | None:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        _release_freed_memory()
        return _proc_status_bytes("VmRSS")


def _release_freed_memory() -> None:
    """Give memory that was freed but kept by glibc's allocator back to the OS, so RSS measures use."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def default_memory_cap(device) -> int | None:
    """None on GPU (the real OOM decides); on CPU, current RSS + 80% of MemAvailable."""
    device = torch.device(device)
    if device.type == "cuda":
        return None
    available, current = available_cpu_memory(), _proc_status_bytes("VmRSS")
    if available is None or current is None:
        return None
    return current + int(0.8 * available)


# ----------------------------------------------------------------------------------------------
# Search
# ----------------------------------------------------------------------------------------------

class _RandomState:
    """Saves and restores every RNG a probe step draws from, so probing does not change training."""

    def __enter__(self):
        self.states = (torch.get_rng_state(), random.getstate(), np.random.get_state(),
                       torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
        return self

    def __exit__(self, *exc):
        torch.set_rng_state(self.states[0])
        random.setstate(self.states[1])
        np.random.set_state(self.states[2])
        if self.states[3] is not None:
            torch.cuda.set_rng_state_all(self.states[3])
        return False


def fits(try_step, batch_size: int, meter: PeakMemory | None, max_memory_bytes: int | None) -> bool:
    """Run one probe step; False on an out-of-memory error or a measured peak above the cap."""
    if meter is not None:
        meter.reset()
    try:
        try_step(batch_size)
    except (RuntimeError, torch.OutOfMemoryError) as error:
        if not is_oom_error(error):
            raise
        ok = False
    else:
        peak = meter.peak() if meter is not None else None
        ok = max_memory_bytes is None or peak is None or peak <= max_memory_bytes
        logger.info(f"auto batch: {batch_size} -> peak {peak / 2**20 if peak else float('nan'):.0f} MiB"
                    f"{'' if ok else ' (over the cap)'}")
    if meter is not None and meter.device.type == "cuda":
        torch.cuda.empty_cache()
    return ok


def find_max_batch_size(try_step, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, max_memory_bytes: int | None = None,
                        device="cpu", reserve_bytes: int = 0, measure: bool = True) -> int:
    """The largest batch size b <= max_batch_size for which `try_step(b)` fits.

    try_step(b): one real training step's forward and backward at batch size b (it must free
    what it allocates). Raises RuntimeError when even batch size 1 does not fit.
    reserve_bytes: memory held during the probe for what the step does not allocate (optimizer state).
    """
    device = torch.device(device)
    meter = PeakMemory(device) if measure else None
    reserve = torch.zeros(max(reserve_bytes, 0), dtype=torch.uint8, device=device) if reserve_bytes > 0 else None
    try:
        with _RandomState():
            good, bad = 0, None
            size = 1
            while size <= max_batch_size:
                if not fits(try_step, size, meter, max_memory_bytes):
                    bad = size
                    break
                good = size
                if size == max_batch_size:
                    break
                size = min(size * 2, max_batch_size)
            if good == 0:
                raise RuntimeError("--train_batch_size auto: even a batch of 1 does not fit in memory"
                                   + (f" (cap {max_memory_bytes / 2**30:.1f} GiB)" if max_memory_bytes else "")
                                   + ". Try --gradient_checkpointing, --mixed_precision bf16 or a lower --resolution.")
            while bad is not None and bad - good > 1:
                middle = (good + bad) // 2
                if fits(try_step, middle, meter, max_memory_bytes):
                    good = middle
                else:
                    bad = middle
    finally:
        del reserve
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return good


def plan_accumulation(max_batch_size: int, effective_batch_size: int, num_processes: int = 1) -> tuple[int, int]:
    """(per-device batch <= max_batch_size, accumulation steps) giving `effective_batch_size` samples per update.

    Fewest accumulation steps first; among those within 2x of the minimum, an exact split is
    preferred; otherwise the minimum accumulation with the batch rounded up (a few extra samples).
    """
    per_step = max(1, effective_batch_size // num_processes)
    fewest = max(1, -(-per_step // max_batch_size))
    for accumulation in range(fewest, 2 * fewest + 1):
        if per_step % accumulation == 0 and per_step // accumulation <= max_batch_size:
            return per_step // accumulation, accumulation
    return -(-per_step // fewest), fewest


def optimizer_state_bytes(parameters) -> int:
    """AdamW's two fp32 moments for the trainable parameters, in bytes."""
    return sum(2 * 4 * p.numel() for p in parameters if p.requires_grad)


def resolve_auto_batch_size(args, accelerator, try_step, trainable_parameters, dataset_size: int) -> tuple[int, int]:
    """(per-device batch, gradient accumulation) for the run: the flags' when --train_batch_size is a number, else
    the largest batch that fits (and the accumulation that keeps --effective_batch_size); logs the choice. The
    accelerator's accumulation is set to match; `args` is not changed (utils/plan.py holds what the run uses)."""
    if args.train_batch_size != "auto":
        return args.train_batch_size, args.gradient_accumulation_steps
    if accelerator.device.type not in ("cuda", "cpu"):
        raise UserError(f"--train_batch_size auto probes CUDA or CPU memory; on {accelerator.device.type} give a number.")
    cap = parse_bytes(args.auto_batch_max_memory) if args.auto_batch_max_memory else default_memory_cap(accelerator.device)
    largest = min(args.auto_batch_max, max(1, dataset_size))
    fit = find_max_batch_size(try_step, largest, cap, accelerator.device,
                              reserve_bytes=optimizer_state_bytes(trainable_parameters))
    batch_size, accumulation = fit, args.gradient_accumulation_steps
    if args.effective_batch_size:
        batch_size, accumulation = plan_accumulation(fit, args.effective_batch_size, accelerator.num_processes)
        accelerator.gradient_accumulation_steps = accumulation
    logger.info(f"--train_batch_size auto: {fit} fits; using batch {batch_size} x accumulation "
                f"{accumulation} x {accelerator.num_processes} process(es)")
    return batch_size, accumulation


def make_probe_step(accelerator, loss_fn, example: dict, collate_fn, modules):
    """try_step for `find_max_batch_size`: one forward/backward of `loss_fn` on `example` repeated b times.

    loss_fn(batch) -> scalar loss (the script's real loss); modules: the trained ones (their
    gradients are dropped after each probe).
    """
    def step(batch_size: int) -> None:
        batch = collate_fn([example] * batch_size)
        batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with accelerator.autocast():
            loss = loss_fn(batch)
        loss.backward()
        for module in modules:
            module.zero_grad(set_to_none=True)
    return step


def resolve_auto_batch_size_for(args, accelerator, loss_fn, dataset, collate_fn, modules) -> tuple[int, int]:
    """`resolve_auto_batch_size` with a probe built from the dataset's first item; moves `modules` to the device.

    The modules' buffers (BatchNorm running statistics) are put back after the probe, so a run with
    'auto' trains from the same state as one given the chosen number.
    """
    if args.train_batch_size != "auto":
        return args.train_batch_size, args.gradient_accumulation_steps
    for module in modules:
        module.to(accelerator.device)
    saved = [{name: buffer.clone() for name, buffer in module.named_buffers()} for module in modules]
    parameters = [p for module in modules for p in module.parameters()]
    chosen = resolve_auto_batch_size(args, accelerator, make_probe_step(accelerator, loss_fn, dataset[0], collate_fn,
                                                                        modules), parameters, len(dataset))
    with torch.no_grad():
        for module, buffers in zip(modules, saved):
            for name, buffer in module.named_buffers():
                buffer.copy_(buffers[name])
    return chosen
