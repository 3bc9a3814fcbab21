"""How many CPU threads a trainer uses when `accelerate launch` chose for it.

Without an accelerate config file (a fresh machine), `accelerate launch` sets `OMP_NUM_THREADS=1`
for the process it starts (accelerate 1.16 `_validate_launch_command`: `--num_cpu_threads_per_process`
falls back to the environment's value or 1), so a CPU trainer ran on one core of two (measured:
the kanji demo's UNet stage at 2.78 instead of ~5 steps/s). The launcher's choice and a user's
`--num_cpu_threads_per_process 1` look the same from inside, so the rule is: launched by accelerate,
on the CPU, with exactly one thread, a trainer takes the cores its process may use divided by the
processes on this machine, and says so in one line. `TRAIN_CPU_THREADS=N` pins the count.
"""

from __future__ import annotations

import logging
import os

import torch

from utils.errors import UserError, launched_by_accelerate

logger = logging.getLogger(__name__)

PIN_VARIABLE = "TRAIN_CPU_THREADS"


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. a container's or taskset's limit)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def choose_cpu_threads(device_type: str, local_processes: int, env=os.environ) -> tuple[int | None, str | None]:
    """The thread count to set (None: keep torch's) and the one line that says why (None: say nothing)."""
    if device_type != "cpu":
        return None, None
    if env.get(PIN_VARIABLE):
        try:
            pinned = int(env[PIN_VARIABLE])
        except ValueError:
            pinned = 0
        if pinned < 1:
            raise UserError(f"{PIN_VARIABLE}={env[PIN_VARIABLE]!r}: give a whole number of threads >= 1.")
        return pinned, None
    if not launched_by_accelerate(env) or env.get("OMP_NUM_THREADS") != "1":
        return None, None
    threads = max(1, available_cores() // max(1, local_processes))
    if threads <= 1:
        return None, None
    return threads, (f"CPU threads: {threads} ({available_cores()} cores / {local_processes} process(es) here); "
                     "`accelerate launch` without a config gives each process OMP_NUM_THREADS=1. "
                     f"Pin another count with {PIN_VARIABLE}=N.")


def use_available_cpu_threads(accelerator) -> int:
    """Apply `choose_cpu_threads` to this process; returns the thread count torch now uses."""
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    threads, message = choose_cpu_threads(accelerator.device.type, local_processes)
    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    if message and accelerator.is_local_main_process:
        logger.info(message)
    return torch.get_num_threads()
