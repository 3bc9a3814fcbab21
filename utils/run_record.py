"""The run record: `output_dir/run_info.json` says exactly what a run was, so any result can be traced.

It holds the resolved arguments (after the YAML merge and the defaults; secrets redacted), the
project's git commit and whether the tree was dirty, the Python / torch / CUDA / diffusers /
transformers / accelerate / peft versions, the devices, mixed precision, world size, seed, a
fingerprint of the training data, start and end times, the steps done and the final metrics. A
resume appends to `resumes` instead of starting a new record. Every checkpoint carries a copy
(`checkpoint-N/run_info.json`, written before the checkpoint is published).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from importlib import metadata

import torch

from utils.atomic import write_json_atomic
from utils.hub import redact_args
from utils.report import last_values, try_write_report

RUN_INFO = "run_info.json"
_PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "peft", "safetensors", "datasets", "torch_xla")
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def git_state(repo: str = _REPO_ROOT) -> dict:
    """{"commit": sha or None, "dirty": bool or None} of the project's own checkout."""
    def git(*argv):
        return subprocess.run(["git", "-C", repo, *argv], capture_output=True, text=True, timeout=10)

    try:
        commit = git("rev-parse", "HEAD")
        if commit.returncode:
            return {"commit": None, "dirty": None}
        status = git("status", "--porcelain", "--untracked-files=no")
        return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def environment(accelerator) -> dict:
    versions = {"python": platform.python_version()}
    for package in _PACKAGES:
        try:
            versions[package] = metadata.version(package.replace("_", "-"))
        except metadata.PackageNotFoundError:
            continue
    versions["cuda"] = torch.version.cuda
    devices = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
               if torch.cuda.is_available() else [])
    return {"versions": versions, "device": str(accelerator.device), "cuda_devices": devices,
            "distributed_type": str(accelerator.distributed_type), "world_size": accelerator.num_processes,
            "mixed_precision": accelerator.mixed_precision, "host": platform.node(),
            "cpu_threads": torch.get_num_threads()}


class RunRecord:
    """`output_dir/run_info.json` and the training report (`utils.report`), written by the main process only.

    Made once the resume point is known (a resume appends to `resumes`); `save_checkpoint(...,
    **record.checkpoint_hooks(step))` puts the record as of that step into the checkpoint before it is
    published and redraws the report after (so the optional report never delays or endangers a
    checkpoint, e.g. the one a SIGTERM asks for); `finish(step)` after the final weights are saved.
    """

    def __init__(self, args, accelerator, script: str, data_fingerprint: str | None = None, position=None, plan=None):
        self.accelerator, self.script = accelerator, script
        self.path = os.path.join(args.output_dir, RUN_INFO)
        self.info = {"script": script, "args": redact_args(args), "plan": plan.as_dict() if plan else None,
                     "git": git_state(),
                     **environment(accelerator), "seed": getattr(args, "seed", None),
                     "data_fingerprint": data_fingerprint, "started": _now(), "finished": None,
                     "steps_done": 0, "final_metrics": None, "resumes": []}
        resumed_from, step = (position.path, position.global_step) if position is not None else (None, 0)
        if resumed_from and os.path.isfile(self.path):
            with open(self.path, encoding="utf-8") as handle:
                previous = json.load(handle)
            resume = {key: self.info[key] for key in ("started", "git", "versions", "world_size", "args", "plan")}
            self.info = {**previous, "resumes": previous.get("resumes", []) + [
                {**resume, "from_checkpoint": resumed_from, "step": step}], "finished": None}
        elif resumed_from:
            self.info["resumes"].append({"started": self.info["started"], "from_checkpoint": resumed_from, "step": step})
        self.info["steps_done"] = step
        self._write(self.path)

    def note(self, key: str, value) -> None:
        """Add a fact about the run (e.g. its aspect-ratio buckets) to the record."""
        self.info[key] = value
        self._write(self.path)

    def save_into(self, directory: str, step: int) -> None:
        """The record as of `step` into a checkpoint folder being written, and output_dir's copy."""
        self.info["steps_done"] = step
        self._write(os.path.join(directory, RUN_INFO))
        self._write(self.path)

    def checkpoint_hooks(self, step: int, report: bool = True) -> dict:
        """`save_checkpoint` keyword arguments: the record into the checkpoint, the report after publishing
        (`report=False` for the checkpoint a stop request asks for: only what a resume needs before exiting)."""
        hooks = {"before_publish": lambda directory: self.save_into(directory, step)}
        if report:
            hooks["after_publish"] = lambda: try_write_report(self.accelerator, self.script)
        return hooks

    def finish(self, steps_done: int) -> None:
        """After the final save: end time, steps, the last logged value of every metric, the final report."""
        final_metrics = last_values(self.accelerator.project_dir) if self.accelerator.is_main_process else None
        self.info.update(finished=_now(), steps_done=steps_done, final_metrics=final_metrics)
        self._write(self.path)
        try_write_report(self.accelerator, self.script)

    def _write(self, path: str) -> None:
        if self.accelerator.is_main_process:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_json_atomic(path, self.info)
