"""Training-health telemetry: the global norm, `HealthMonitor` (per-step values kept on the
device between logging steps) and `NonFiniteGuard` (skip non-finite updates, abort after too many).
"""

from __future__ import annotations

import logging
import time

import torch

logger = logging.getLogger(__name__)


def global_norm(tensors) -> torch.Tensor:
    """L2 norm over an iterable of tensors, as a 0-d tensor on their device (no host sync)."""
    tensors = [t.detach() for t in tensors if t is not None]
    if not tensors:
        return torch.tensor(0.0)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in tensors]))


class HealthMonitor:
    """Accumulates per-step health values on the device and turns them into logs every N steps.

    Values are kept as tensors between logging steps so the hot loop never waits on the host.
    """

    def __init__(self, samples_per_step: int):
        self.samples_per_step = samples_per_step
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0
        self._last_time = time.perf_counter()
        self._steps_since = 0

    def add(self, **values) -> None:
        for key, value in values.items():
            if value is None:
                continue
            value = value.detach().float() if torch.is_tensor(value) else torch.tensor(float(value))
            self._sums[key] = self._sums[key] + value if key in self._sums else value
        self._count += 1

    def step_done(self) -> None:
        self._steps_since += 1

    def collect(self) -> dict[str, float]:
        """Means since the last call, plus step_time_ms and samples_per_sec. One host sync."""
        now = time.perf_counter()
        elapsed = now - self._last_time
        logs = {key: (value / max(self._count, 1)).item() for key, value in self._sums.items()}
        if self._steps_since:
            logs["step_time_ms"] = 1000.0 * elapsed / self._steps_since
            logs["samples_per_sec"] = self.samples_per_step * self._steps_since / max(elapsed, 1e-9)
        self._sums, self._count, self._steps_since, self._last_time = {}, 0, 0, now
        return logs


class NonFiniteGuard:
    """Skips updates whose loss or gradients are not finite; aborts after too many in a row.

    The verdict stays on the device: `apply_update` hands it to optimizers that can skip a step
    themselves (torch's fused Adam, AdamW, SGD and Adagrad read a `found_inf` tensor, the mechanism
    `torch.amp.GradScaler` uses), and the counters are read on the host only every `check_every`
    optimizer steps (the scripts pass --logging_steps) and when `total_skipped` is read (checkpoints).
    So a run with no bad steps never waits on the device for this. Optimizers without that hook
    (bitsandbytes' 8-bit AdamW, foreach/for-loop kernels) are checked on the host every step.
    """

    def __init__(self, max_consecutive: int, check_every: int = 1):
        self.max_consecutive = max_consecutive
        self.check_every = max(1, int(check_every))
        self.consecutive = 0
        self._total = 0
        self._counts = None  # on the device: [bad steps in a row now, bad steps in total, longest run since the last poll]
        self._recorded = 0
        self._polled_at = 0  # self._recorded when the counters were last read

    @staticmethod
    def nonfinite(loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """A 0-d float tensor on the loss's device: 1.0 when the loss or the gradient norm is inf/NaN."""
        finite = torch.isfinite(loss.detach()).all() & torch.isfinite(grad_norm.detach().to(loss.device)).all()
        return (~finite).float()

    def _count(self, flag: torch.Tensor) -> None:
        if self._counts is None:
            self._counts = torch.zeros(3, device=flag.device)
        run = (self._counts[0] + 1) * flag
        self._counts = torch.stack([run, self._counts[1] + flag, torch.maximum(self._counts[2], run)])
        self._recorded += 1

    def record(self, flag: torch.Tensor) -> None:
        """Count one optimizer step's verdict on the device; poll every `check_every` steps."""
        self._count(flag)
        if self._recorded % self.check_every == 0:
            self.poll()

    def poll(self) -> None:
        """Read the counters (one host sync; none when nothing was recorded since the last read):
        warn about new skips, raise after too many in a row."""
        if self._recorded == self._polled_at:
            return
        self._polled_at = self._recorded
        in_a_row, total, longest = (int(v) for v in self._counts.tolist())
        self._counts[2] = in_a_row  # the longest run since this poll starts from the current one
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
        self.poll()
        return self._total

    def check(self, loss: torch.Tensor, parameters, grad_norm: torch.Tensor | None = None) -> bool:
        """Host-side verdict for optimizers that cannot skip on the device: True when the step may be
        applied. One host sync. grad_norm: the norm clipping already computed (saves a pass)."""
        if grad_norm is None or not torch.is_tensor(grad_norm):
            grads = [p.grad for p in parameters if p.grad is not None]
            grad_norm = global_norm(grads) if grads else torch.zeros((), device=loss.device)
        self._count(self.nonfinite(loss, grad_norm))
        self.poll()
        return self.consecutive == 0
