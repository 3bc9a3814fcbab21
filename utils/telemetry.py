"""Training-health telemetry: the global norm, `HealthMonitor` (per-step values kept on the
device between logging steps) and `NonFiniteGuard` (skip non-finite updates, abort after too many).
"""

from __future__ import annotations

import json
import logging
import os
import time

import torch

from utils.report import log_metrics

logger = logging.getLogger(__name__)


def global_norm(tensors) -> torch.Tensor:
    """L2 norm over an iterable of tensors, as a 0-d tensor on their device (no host sync)."""
    tensors = [t.detach() for t in tensors if t is not None]
    if not tensors:
        return torch.tensor(0.0)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in tensors]))


def batch_size_of(batch: dict) -> int:
    """Samples in a batch dict, from its first tensor's (or list's) length: host metadata, no device sync."""
    for value in batch.values():
        if torch.is_tensor(value) and value.dim() > 0:
            return int(value.shape[0])
        if isinstance(value, (list, tuple)):
            return len(value)
    raise ValueError(f"no tensor or list in the batch (keys {sorted(batch)})")


class HealthMonitor:
    """Training-health values kept on the device between logging steps, turned into logs every N steps.

    The protocol, the same in every loop:
      * `add(key=value, ...)` for each micro-batch (None is skipped): every key keeps its own sum and
        count, so a key added once per micro-batch (loss) and one added once per optimizer step
        (grad_norm) both come out as plain means, however the calls interleave;
      * `count_samples(n)` for each micro-batch, with the samples it really held;
      * `step_done()` once per optimizer step;
      * `collect(accelerator)` on every process at a logging step: the means over the window *and*
        over all processes (one all-reduce of sums and counts), step_time_ms, samples_per_sec from
        the samples really seen by all processes, and on CUDA the window's peak allocated/reserved
        memory. The only host sync; nothing is read between logging steps.
    """

    RECORD_ENV = "TRAIN_DEBUG_MONITOR_DIR"  # tests: every value given to add(), per rank (costs a host read each)

    def __init__(self):
        record_dir = os.environ.get(self.RECORD_ENV)
        self._record_path = (os.path.join(record_dir, f"rank{os.environ.get('RANK', '0')}.jsonl")
                             if record_dir else None)
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self._samples = 0
        self._steps_since = 0
        self._last_time = time.perf_counter()

    def add(self, **values) -> None:
        for key, value in values.items():
            if value is None:
                continue
            value = value.detach().float().reshape(()) if torch.is_tensor(value) else torch.tensor(float(value))
            self._sums[key] = self._sums[key] + value.to(self._sums[key].device) if key in self._sums else value
            self._counts[key] = self._counts.get(key, 0) + 1
            if self._record_path is not None:
                self._record({key: value.item()})

    def _record(self, entry: dict) -> None:
        if self._record_path is not None:
            with open(self._record_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(entry) + "\n")

    def count_samples(self, num_samples: int) -> None:
        self._samples += int(num_samples)

    def step_done(self) -> None:
        self._steps_since += 1
        self._record({"step_done": True})

    def collect(self, accelerator=None) -> dict[str, float]:
        """Means since the last call over all processes, plus step_time_ms, samples_per_sec and peak memory."""
        now = time.perf_counter()
        elapsed = max(now - self._last_time, 1e-9)
        keys = sorted(self._sums)
        device = accelerator.device if accelerator is not None else (
            self._sums[keys[0]].device if keys else torch.device("cpu"))
        sums = [self._sums[key].to(device) for key in keys]
        counts = torch.tensor([float(self._counts[key]) for key in keys] + [float(self._samples)], device=device)
        packed = torch.cat([torch.stack(sums), counts]) if sums else counts
        if accelerator is not None and accelerator.num_processes > 1:
            packed = accelerator.reduce(packed, reduction="sum")
        values = packed.tolist()
        total_sums, total_counts, total_samples = values[:len(keys)], values[len(keys):-1], values[-1]
        logs = {key: total / max(count, 1.0) for key, total, count in zip(keys, total_sums, total_counts)}
        if self._steps_since:
            logs["step_time_ms"] = 1000.0 * elapsed / self._steps_since
            logs["samples_per_sec"] = total_samples / elapsed
        if torch.device(device).type == "cuda":
            logs["gpu_peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            logs["gpu_peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        self._sums, self._counts, self._samples, self._steps_since, self._last_time = {}, {}, 0, 0, now
        return logs


class NonFiniteGuard:
    """Skips updates whose loss or gradients are not finite; aborts after too many in a row.

    The verdict stays on the device: `apply_update` hands it to optimizers that can skip a step
    themselves (torch's fused Adam, AdamW, SGD and Adagrad read a `found_inf` tensor, the mechanism
    `torch.amp.GradScaler` uses) and `record`s it in counters on the device. The step boundary
    (utils/loop.py) `poll`s them after every optimizer step, so `--max_nonfinite_steps 3` aborts at
    the 3rd bad step in a row (it used to be read every --logging_steps: 9 bad steps before the abort).
    On CUDA the poll reads the counters of the step before (`lagged`): `record` starts their copy into
    pinned host memory without waiting, and by the next boundary that copy is done while the newer
    step's kernels are still queued, so the device never drains for it; the abort then comes one
    step late at most. Elsewhere (CPU, where there is no queue to drain) the poll reads the current
    counters. Optimizers without that hook (bitsandbytes' 8-bit AdamW, foreach/for-loop kernels)
    are checked on the host in `check`, every step, before the update.
    """

    def __init__(self, max_consecutive: int, lagged: bool | None = None):
        self.max_consecutive = max_consecutive
        self.lagged = lagged  # None: decided by the device of the first verdict (CUDA: lagged)
        self.consecutive = 0
        self._total = 0
        self._counts = None  # on the device: [bad steps in a row now, bad steps in total, longest run since the last poll]
        self._recorded = 0
        self._polled_at = 0  # self._recorded when the counters were last read
        self._mirrors = []  # lagged: (records counted, host copy, copy-done event or None), the newest two

    @staticmethod
    def nonfinite(loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """A 0-d float tensor on the loss's device: 1.0 when the loss or the gradient norm is inf/NaN."""
        finite = torch.isfinite(loss.detach()).all() & torch.isfinite(grad_norm.detach().to(loss.device)).all()
        return (~finite).float()

    def _count(self, flag: torch.Tensor) -> None:
        if self._counts is None:
            self._counts = torch.zeros(3, device=flag.device)
            if self.lagged is None:
                self.lagged = flag.device.type == "cuda"
        run = (self._counts[0] + 1) * flag
        self._counts = torch.stack([run, self._counts[1] + flag, torch.maximum(self._counts[2], run)])
        self._recorded += 1
        if self.lagged:
            self._mirror()

    def _mirror(self) -> None:
        """Start copying the counters to the host (no wait on CUDA); keep the newest two copies."""
        if self._counts.device.type == "cuda":
            host = torch.empty(3, pin_memory=True)
            host.copy_(self._counts, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        else:
            host, done = self._counts.clone(), None
        self._mirrors = self._mirrors[-1:] + [(self._recorded, host, done)]

    def record(self, flag: torch.Tensor) -> None:
        """Count one optimizer step's verdict on the device (no host read: `poll` reads)."""
        self._count(flag)

    def poll(self, current: bool = False) -> None:
        """Read the counters (no read when nothing was recorded since the last one): warn about new skips,
        raise after too many in a row. Lagged, the previous step's copy is read unless `current` (a full
        host sync: checkpoints and logged totals use it)."""
        if self._counts is None:
            return
        if self.lagged and not current and len(self._mirrors) == 2:
            recorded, host, done = self._mirrors[0]
            if done is not None:
                done.synchronize()  # the step before: finished, or nearly, while the newer one runs
        elif self.lagged and not current:
            return  # one record so far: nothing from a step before it
        else:
            recorded, host = self._recorded, self._counts
        if recorded <= self._polled_at:
            return
        self._polled_at = recorded
        in_a_row, total, longest = (int(v) for v in host.tolist())
        # The longest run after this read starts from the run now on the device (no read: lagged, it may be a step
        # newer than `in_a_row`; a newer copy may still hold an older long run, but that run was real).
        self._counts[2] = self._counts[0]
        new, self._total, self.consecutive = total - self._total, total, in_a_row
        if new:
            logger.warning(f"Non-finite loss or gradient: {new} update(s) skipped since the last check "
                           f"({in_a_row} in a row now, {total} total).")
        if new and longest >= self.max_consecutive:  # (new: a read after the abort does not raise again)
            raise FloatingPointError(
                f"{longest} consecutive steps had a non-finite loss or gradient (--max_nonfinite_steps "
                f"{self.max_consecutive}). Try a lower --learning_rate, --max_grad_norm 1.0, bf16 instead of fp16, "
                "or check the data for corrupt samples."
            )

    @property
    def total_skipped(self) -> int:
        self.poll(current=True)
        return self._total

    def check(self, loss: torch.Tensor, parameters, grad_norm: torch.Tensor | None = None) -> bool:
        """Host-side verdict for optimizers that cannot skip on the device: True when the step may be
        applied. One host sync. grad_norm: the norm clipping already computed (saves a pass)."""
        if grad_norm is None or not torch.is_tensor(grad_norm):
            grads = [p.grad for p in parameters if p.grad is not None]
            grad_norm = global_norm(grads) if grads else torch.zeros((), device=loss.device)
        self._count(self.nonfinite(loss, grad_norm))
        self.poll(current=True)  # this step's verdict decides this step's update, lagged or not
        return self.consecutive == 0


def log_training_health(accelerator, monitor: HealthMonitor, progress, step: int, lr: float,
                        guard: NonFiniteGuard | None = None, extra: dict | None = None, echo: bool = False) -> dict:
    """One logging step, the same keys in every trainer: the means since the last one (`monitor`: loss, grad_norm,
    step_time_ms, samples_per_sec, memory and the trainer's own), `lr`, `skipped_nonfinite_steps` (with a guard)
    and `extra`, as `train/<name>` (plus diffusers' `train_loss`) to the trackers; loss and lr on the progress bar;
    a log line with `echo`. Returns the values (without the prefix)."""
    logs = {**monitor.collect(accelerator), "lr": lr, **(extra or {})}
    if guard is not None:
        logs["skipped_nonfinite_steps"] = guard.total_skipped
    tracked = {f"train/{k}": v for k, v in logs.items()}
    if "loss" in logs:
        tracked["train_loss"] = logs["loss"]  # diffusers' key, for dashboards made with its script
    log_metrics(accelerator, tracked, step)
    progress.set_postfix(loss=f"{logs.get('loss', float('nan')):.4f}", lr=f"{lr:.2e}")
    if echo:
        logger.info(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in logs.items()))
    return logs
