"""XLA (TPU) helpers: a fix for accelerate's XLA loader wrapper, and torch_xla's compilation counters.

torch_xla is imported inside the functions: scripts import this module on machines without it.
"""

from __future__ import annotations

import json
import logging
import os

logger = logging.getLogger(__name__)


def patch_accelerate_xla_loader() -> None:
    """Give accelerate's XLA loader wrapper the `.dataset`/`.dataloader` that its own save_state,
    load_state, set_epoch and skip_first_batches read (torch_xla's MpDeviceLoader keeps `_loader`)."""
    from accelerate.data_loader import MpDeviceLoaderWrapper

    for name, getter in (("dataloader", lambda self: self._loader), ("dataset", lambda self: self._loader.dataset)):
        if not hasattr(MpDeviceLoaderWrapper, name):
            setattr(MpDeviceLoaderWrapper, name, property(getter))


def xla_compilation_count() -> int:
    """Graphs XLA compiled so far in this process (constant once every shape has been seen)."""
    import torch_xla.debug.metrics as xla_metrics

    data = xla_metrics.metric_data("CompileTime")
    return int(data[0]) if data else 0


def log_xla_metrics(on_xla: bool, output_dir: str, accelerator) -> None:
    """On XLA, save torch_xla's compile/execute counters (output_dir/xla_metrics.json) to spot recompilation."""
    if not on_xla or not accelerator.is_main_process:
        return
    import torch_xla.debug.metrics as xla_metrics

    summary = {"distributed_type": str(accelerator.distributed_type), "num_processes": accelerator.num_processes}
    for name in ("CompileTime", "ExecuteTime"):
        data = xla_metrics.metric_data(name)
        summary[name] = {"count": int(data[0]) if data else 0}
    summary["counters"] = {name: xla_metrics.counter_value(name) for name in xla_metrics.counter_names()}
    with open(os.path.join(output_dir, "xla_metrics.json"), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2)
    logger.info(f"XLA: {summary['CompileTime']['count']} compilations, {summary['ExecuteTime']['count']} executions")
