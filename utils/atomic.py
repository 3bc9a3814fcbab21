"""Atomic writes, the one implementation every writer uses: a file or a folder is written under a temporary name
next to its place and renamed into it only when complete, so a kill at any moment leaves the old version or
the new one, never a mixture (checkpoints, caches, the run record, reports, LoRA and single-file weights, the
VAE stage)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str, suffix: str = ""):
    """`with atomic_file(p) as temp:` write the file `temp` (it ends with `suffix`, for writers that pick the format
    by extension); on success it replaces `p` at once (fsynced); on an error `p` is untouched and `temp` removed."""
    temp = f"{path}.tmp{suffix}"
    try:
        yield temp
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temp)
        raise
    os.replace(temp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_json_atomic(path: str, data: dict) -> None:
    with atomic_file(path) as temp, open(temp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)


def replace_directory(temp: str, final: str, trash_name: str | None = None) -> None:
    """Publish the finished folder `temp` as `final` by renames only: a kill at any moment leaves either
    the old `final` or the new one, never a mixture (the old one is moved aside to `trash_name`, default
    `.old-<name>`, first, then deleted)."""
    parent, name = os.path.split(os.path.abspath(final))
    if os.path.exists(final):
        old = os.path.join(parent, trash_name or f".old-{name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(temp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(temp, final)
    _fsync_dir(parent)


@contextlib.contextmanager
def atomic_directory(directory: str, trash_name: str | None = None, unique_temp: bool = False):
    """`with atomic_directory(d) as temp:` write everything into `temp`; on success it becomes `d` at once
    (`replace_directory`). On an error `d` is untouched and the partial `temp` is removed. `unique_temp`: a temp
    name of its own, for writers that may race on one `d` (caches on storage several machines share)."""
    import uuid

    parent, name = os.path.split(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    temp = os.path.join(parent, f".tmp-{name}" + (f"-{uuid.uuid4().hex[:8]}" if unique_temp else ""))
    shutil.rmtree(temp, ignore_errors=True)
    os.makedirs(temp)
    try:
        yield temp
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    replace_directory(temp, directory, trash_name)
