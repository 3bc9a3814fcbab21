"""The step-boundary protocol: what every trainer does after each optimizer step and at the end of training.

Forward, backward and the update stay in each script's loop (as in accelerate's `nlp_example.py`); the rest
of the orchestration is written once here, so the three trainers cannot drift apart again (the copies had
already: an `--offload_ema` honoured by one trainer of three, two meanings of `--validation_epochs`, a double
checkpoint when a stop request landed on a checkpoint step):

    boundary = StepBoundary(accelerator, position.global_step, max_train_steps, checkpointing, ...)
    for epoch in range(first_epoch, num_epochs):
        for batch in epoch_batches(...):
            ...forward, backward, apply_update...
            if accelerator.sync_gradients and boundary.step_done():
                break
        if boundary.epoch_done(validate_epoch):
            break
    boundary.finish(save_final)

After each optimizer step, in this order: the non-finite guard's read (it aborts after --max_nonfinite_steps bad
steps in a row), the EMA update (offloaded or not), the progress bar, health logging
(every --logging_steps; text-to-image also at the last step, as diffusers' script), a step validation (before
the checkpoint, so the checkpoint holds its outcome, e.g. the early-stopping count), the stop flag (all ranks
agree at every step: at most the step in progress runs after a SIGTERM), one checkpoint when one is due for any
reason (the interval, an early stop, a stop request: the last holds only what a resume needs), then the step
limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from utils.checkpointing import save_checkpoint
from utils.ema import ema_step
from utils.run import end_training, is_due
from utils.stopping import StopSignal


@dataclass
class Checkpointing:
    """Where and how often checkpoints are written, and what training state goes into them."""

    output_dir: str
    every_steps: int | None
    total_limit: int | None
    training_state: Callable[[], dict]  # the trainer's own state at this moment (epoch, early-stopping count, ...)
    record: object = None  # a utils.run_record.RunRecord: the run record into each checkpoint, the report after
    write: Callable[[int, bool], None] | None = None  # (step, report): a checkpoint of its own kind (the VAE stage's)


class StepBoundary:
    """Call `step_done()` once per optimizer step, `epoch_done(...)` at the end of each epoch and `finish(...)`
    after the loop. `step` is the number of optimizer steps done; `stopped` says a stop request ended the run
    (then `finish` saves nothing more: the stop checkpoint is the run's last word)."""

    def __init__(self, accelerator, global_step: int, max_steps: int, checkpointing: Checkpointing, progress,
                 monitor=None, logging_steps: int = 10, log_health: Callable[[int], None] | None = None,
                 health_at_last_step: bool = False,
                 ema=None, ema_parameters: Callable[[], Iterable] | None = None, offload_ema: bool = False,
                 validate_step: Callable[[int], bool] | None = None, guard=None):
        self.accelerator, self.step, self.max_steps = accelerator, global_step, max_steps
        self.checkpointing, self.progress, self.monitor = checkpointing, progress, monitor
        self.logging_steps, self.log_health, self.health_at_last_step = logging_steps, log_health, health_at_last_step
        self.ema, self.ema_parameters, self.offload_ema = ema, ema_parameters, offload_ema
        self.validate_step, self.guard = validate_step, guard
        self.stop = StopSignal()
        self.stopped = self.early_stopped = False
        self._checkpointed_at = None

    def checkpoint(self, report: bool = True) -> None:
        """A checkpoint of the current step (at most one per step; `report=False`: no report redrawn after it)."""
        if self._checkpointed_at == self.step:
            return
        self._checkpointed_at = self.step
        c = self.checkpointing
        if c.write is not None:
            c.write(self.step, report)
            return
        hooks = c.record.checkpoint_hooks(self.step, report) if c.record is not None else {}
        save_checkpoint(self.accelerator, c.output_dir, self.step, c.total_limit, c.training_state(), **hooks)

    def step_done(self) -> bool:
        """After an optimizer step (every rank): the boundary's work in the protocol's order. True when the loop
        must end (the step limit, an early stop or a stop request)."""
        if self.guard is not None:  # a utils.telemetry.NonFiniteGuard: raises after --max_nonfinite_steps in a row
            self.guard.poll()
        if self.ema is not None:
            ema_step(self.ema, self.ema_parameters(), self.accelerator.device, self.offload_ema)
        self.step += 1
        self.progress.update(1)
        if self.monitor is not None:
            self.monitor.step_done()
        last = self.health_at_last_step and self.step == self.max_steps
        if self.log_health is not None and (is_due(self.step, self.logging_steps) or last):
            self.log_health(self.step)
        early_stop = bool(self.validate_step is not None and self.validate_step(self.step))
        stopping = self.stop.should_stop(self.accelerator)  # every rank, every step
        if is_due(self.step, self.checkpointing.every_steps) or early_stop or stopping:
            self.checkpoint(report=not stopping)
        if stopping:
            self.stop.announce(self.accelerator, self.step, self.checkpointing.output_dir)
            self.stopped = True
        self.early_stopped = self.early_stopped or early_stop
        return self.stopped or early_stop or self.step >= self.max_steps

    def epoch_done(self, validate_epoch: Callable[[], bool] | None = None, checkpoint: bool = False) -> bool:
        """At the end of an epoch's loop (also when `step_done` ended it): the epoch's validation (skipped after
        an early stop or a stop request; True from it is an early stop) and an epoch checkpoint (`checkpoint`,
        or after an early stop). True when training must end."""
        if self.stopped:
            return True
        if not self.early_stopped and validate_epoch is not None and validate_epoch():
            self.early_stopped = True
            self.checkpoint()
        if checkpoint:
            self.checkpoint()
        return self.early_stopped or self.step >= self.max_steps

    def finish(self, save_final: Callable[[], None]) -> None:
        """The end of training: the final weights first (`save_final` saves them, then does its optional extras),
        then the run record and report, then the trackers and process group. After a stop request only the
        latter: the stop checkpoint holds the run."""
        self.progress.close()
        if not self.stopped:
            save_final()
            if self.checkpointing.record is not None:
                self.checkpointing.record.finish(self.step)
        end_training(self.accelerator)
