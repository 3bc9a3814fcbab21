"""Errors a user can act on, and how every script reports them.

`UserError` is the class of problems the user can fix: a bad flag, bad data, a damaged or
mismatched checkpoint, a missing package. Every script's entry point (`run_script`) prints one
`error: ...` block for them, naming the flag/file/row and the fix, and exits with
`EXIT_USER_ERROR` (2, argparse's code for usage errors) without a traceback; `TRAIN_DEBUG=1`
shows the traceback too. Anything else is an internal error and keeps its traceback (exit 1).
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import time

import torch

EXIT_USER_ERROR = 2
DEBUG_ENV = "TRAIN_DEBUG"

OOM_HINT = (
    "Out of memory. Try, in this order: a smaller {batch_flag} with a larger "
    "--gradient_accumulation_steps (same effective batch), --gradient_checkpointing, --use_8bit_adam, "
    "--mixed_precision bf16 (or fp16 on older GPUs), or a lower --resolution."
)


class UserError(ValueError):
    """A problem the user can fix (flag, data, checkpoint, package); the message names it and the fix.

    A ValueError, so code that caught the ValueErrors these used to be keeps working."""


class UserFileNotFoundError(UserError, FileNotFoundError):
    """A file or folder named by a flag or a dataset does not exist."""


class MissingPackageError(UserError, ImportError):
    """An optional package a flag needs is not installed; the message says what to install."""


def is_oom_error(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


@contextlib.contextmanager
def oom_hint(batch_flag: str = "--train_batch_size"):
    """Re-raise an out-of-memory error inside the block as one that says what to try (OOM_HINT), naming the
    script's own batch-size flag."""
    try:
        yield
    except (RuntimeError, torch.OutOfMemoryError) as error:
        if is_oom_error(error):
            raise RuntimeError(OOM_HINT.format(batch_flag=batch_flag)) from error
        raise


def format_user_error(error: BaseException) -> str:
    """The one block a user error prints: `error: <message>`, later lines of the message indented.
    Not wrapped: paths and flags stay whole, for copying and grepping."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return "\n".join(("error: " if index == 0 else "       ") + line for index, line in enumerate(lines))


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)


def report_user_error(error: BaseException, stream=None, suffix: str = "") -> None:
    """Print `error` (+ `suffix`) as one block on stderr (other ranks of a multi-process run: one line, tagged)."""
    stream = stream or sys.stderr
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        import traceback

        traceback.print_exception(error, file=stream)
    if _rank() == 0:
        print(format_user_error(str(error).strip() + suffix if str(error).strip() else error), file=stream, flush=True)
    else:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"error (rank {_rank()}): {first}", file=stream, flush=True)


def environment_error(error: OSError) -> UserError | None:
    """A write refused by the machine (read-only folder or file, disk full) as a UserError saying what to do;
    None for other OSErrors (they keep their traceback)."""
    import errno

    where = error.filename or "a file in --output_dir"
    if isinstance(error, PermissionError) or error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return UserError(f"Cannot write {where}: {error.strerror or error}. Make that folder (and the files in it) "
                         "writable by this user, or choose another --output_dir. Existing checkpoints are unchanged.")
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(f"No space left on the device while writing {where}. Existing checkpoints were not changed (a "
                         "checkpoint is written to a temporary folder and renamed only when complete). Free space, "
                         "or lower --checkpoints_total_limit, then resume with --resume_from_checkpoint latest.")
    return None


def launched_by_accelerate(env=os.environ) -> bool:
    """True in a process `accelerate launch` started (it sets ACCELERATE_DYNAMO_BACKEND for every one)."""
    return "ACCELERATE_DYNAMO_BACKEND" in env


def _launcher_hint() -> str:
    """Under `accelerate launch`, the launcher prints its own traceback after a failed trainer unless -q."""
    return ("\n(Under `accelerate launch` its own traceback follows this message and the exit code is 1: "
            "`accelerate launch -q ...` shows this message alone.)" if launched_by_accelerate() else "")


# Called (no arguments) when a run is refused with a UserError, e.g. to remove the output folder the refused run
# created and left empty; registered by the code that made the thing.
ON_REFUSAL: list = []


def _after_refusal() -> None:
    while ON_REFUSAL:
        try:
            ON_REFUSAL.pop()()
        except Exception:  # tidying up must never hide the error message
            pass


# How long a refused rank of a multi-process run waits for the others to report (_wait_for_the_other_ranks).
RANK_REPORT_WAIT_S = 30.0


def _wait_for_the_other_ranks() -> None:
    """A refused run with joined processes: wait, at most RANK_REPORT_WAIT_S, until every rank has reported its error.
    The launcher stops all processes as soon as one exits, so a rank refused first cut off rank 0's block when
    rank 0 was slower (seen in a loaded CI run). A rank whose error the others never reach gives up after the wait."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    try:
        barrier = dist.barrier(async_op=True)
    except Exception:  # a broken process group: nothing to wait for
        return
    deadline = time.monotonic() + RANK_REPORT_WAIT_S
    while not barrier.is_completed():
        if time.monotonic() > deadline:  # exit without the process group's teardown, which would wait for the barrier
            sys.stderr.flush()
            os._exit(EXIT_USER_ERROR)
        time.sleep(0.02)


def run_script(main, *args, **kwargs):
    """A script's entry point: `main(*args)`; a UserError (or a write the machine refused: read-only, disk full)
    becomes one `error:` block and exit code 2."""
    ON_REFUSAL.clear()
    try:
        return main(*args, **kwargs)
    except UserError as error:
        _refuse(error)
    except OSError as error:
        explained = environment_error(error)
        if explained is None:
            raise
        explained.__traceback__ = error.__traceback__
        _refuse(explained)


def _refuse(error: UserError):
    report_user_error(error, suffix=_launcher_hint())
    _after_refusal()
    _wait_for_the_other_ranks()
    raise SystemExit(EXIT_USER_ERROR) from None


def user_entry_point(main, parse_args=None):
    """`if __name__ == "__main__": user_entry_point(main, parse_args)` (or `user_entry_point(main)` where main parses
    its own arguments): arguments parsed and checked, then the run; user errors from either print one block (exit 2),
    internal errors keep their traceback."""
    # The scripts turn the cyclic GC off while they import (`if __name__ == "__main__": gc.disable()`): the imports
    # make about 900k objects (torch, diffusers, transformers) that live as long as the process, and the GC scanned
    # them in 8 full collections, 1.2 s of a 5.6 s import (measured with gc.callbacks on the fixed-cost command of
    # docs/PERFORMANCE.md). Frozen, later collections skip them; then the GC runs as usual for the run itself.
    gc.freeze()
    gc.enable()
    return run_script(lambda: main(parse_args()) if parse_args is not None else main())
