"""Stop requests: SIGTERM/SIGINT become a flag the loops check at step boundaries.
"""

from __future__ import annotations

import logging
import signal
import time

import torch

logger = logging.getLogger(__name__)


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop checks at every step boundary (save, then exit).

    One stop request may arrive as several SIGTERMs: a preemption that signals the whole
    process group (Colab, SLURM, spot VMs) reaches the trainer directly *and* through
    `accelerate launch`, which since accelerate 1.16 forwards SIGTERM to its child and SIGKILLs
    it `launcher_grace_s` (5 s) later. So a SIGTERM within `repeat_window_s` of the first one is
    the same request; a second SIGINT (Ctrl-C twice), or any signal after the window, restores
    the default handler and force-quits. With several processes the ranks agree through one
    small all-reduce at every step boundary (benchmarks/bench_stop.py measures its cost and the
    stop latency), so at most the step in progress when the signal came runs before the save:
    `steps_after_request` counts them and `announce` reports it.
    """

    launcher_grace_s = 5.0  # accelerate>=1.16 `_terminate_process_tree`: SIGTERM, then SIGKILL after 5 s

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT), repeat_window_s: float = 60.0):
        self.repeat_window_s = float(repeat_window_s)
        self._calls = 0  # step boundaries seen
        self._requested_at_call = None
        self.requested = False
        self.signal_name = None
        self._requested_at = None
        self._said = False  # whether the request was logged (at a step boundary, not in the handler)
        self._previous = {}
        for sig in signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. notebook_launcher workers)
                pass

    def _handle(self, signum, frame):
        now = time.monotonic()
        if self.requested:
            if signum == signal.SIGTERM and now - self._requested_at <= self.repeat_window_s:
                return  # the same stop request, delivered again (process group + launcher)
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt
        self.requested = True
        self._requested_at = now
        self._requested_at_call = self._calls
        self.signal_name = signal.Signals(signum).name
        # (No logging here: a handler runs between two bytecodes of the main thread, which may be inside a write to
        # the same stderr; a nested write there is refused, and the line was lost once in a loaded CI run. The
        # step boundary says it, below.)

    def should_stop(self, accelerator) -> bool:
        """Call once per optimizer step on every rank: True on all ranks when any rank was signalled."""
        self._calls += 1
        if self.requested and not self._said:
            self._said = True
            logger.warning(f"{self.signal_name} received: saving a checkpoint at this step boundary, then exiting.")
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)

    @property
    def steps_after_request(self) -> int | None:
        """Optimizer steps that ended after the signal came (the one in progress then included); None on a rank
        that was not signalled itself."""
        return None if self._requested_at_call is None else self._calls - self._requested_at_call

    def announce(self, accelerator, step: int, output_dir: str, what: str = "training") -> None:
        """After the stop checkpoint: say where the run stopped and how to continue it."""
        after = "" if self.steps_after_request is None else f" ({self.steps_after_request} step(s) after the signal)"
        where = "" if what == "training" else f" of {what}"
        accelerator.print(f"Stopped by {self.signal_name or 'a signal'} at step {step}{where}{after}. Resume with: "
                          f"--resume_from_checkpoint latest --output_dir {output_dir}")



class EarlyStopping:
    """The bookkeeping behind --early_stopping_patience / --early_stopping_min_delta: the best score so far and how
    many validations in a row failed to beat it by more than `min_delta` (lower is better, e.g. val/loss, unless
    `higher_is_better`, e.g. mIoU). `state` goes into every checkpoint (its keys are the training-state names:
    `best_key` and validations_without_improvement) so a resumed run continues the count."""

    def __init__(self, patience: int | None, min_delta: float = 0.0, resumed_state: dict | None = None,
                 best_key: str = "best_validation_loss", higher_is_better: bool = False):
        self.patience, self.min_delta = patience, float(min_delta)
        self.best_key, self.sign = best_key, -1.0 if higher_is_better else 1.0
        self.state = {best_key: None, "validations_without_improvement": 0}
        self.state.update({k: v for k, v in (resumed_state or {}).items() if k in self.state})

    def update(self, score: float) -> bool:
        """Record one validation's score; True when it is the best so far (by more than min_delta)."""
        best = self.state[self.best_key]
        if best is None or self.sign * score < self.sign * best - self.min_delta:
            self.state.update({self.best_key: float(score), "validations_without_improvement": 0})
            return True
        self.state["validations_without_improvement"] += 1
        return False

    @property
    def should_stop(self) -> bool:
        return bool(self.patience and self.state["validations_without_improvement"] >= self.patience)

    def announce(self) -> None:
        logger.info(f"Early stopping: no better validation score in {self.patience} validations "
                    f"(best {self.state[self.best_key]:.6g}).")
