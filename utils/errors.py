"""Errors a user can act on: the out-of-memory hint.
"""

from __future__ import annotations

import contextlib

import torch

OOM_HINT = (
    "Out of memory. Try, in this order: a smaller --train_batch_size with a larger "
    "--gradient_accumulation_steps (same effective batch), --gradient_checkpointing, --use_8bit_adam, "
    "--mixed_precision bf16 (or fp16 on older GPUs), or a lower --resolution."
)


def is_oom_error(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


@contextlib.contextmanager
def oom_hint():
    """Re-raise an out-of-memory error inside the block as one that says what to try (OOM_HINT)."""
    try:
        yield
    except (RuntimeError, torch.OutOfMemoryError) as error:
        if is_oom_error(error):
            raise RuntimeError(OOM_HINT) from error
        raise
