"""The evaluation protocol every trainer calls: one place that decides which weights are scored, how often, what
"best" means and how best/ is written.

    evaluation = Evaluation(accelerator, args.output_dir, score, "val/loss", save_best, ema=ema,
                            parameters=model.parameters, optimizer=optimizer, stopping=EarlyStopping(...))
    stop = evaluation(step)   # every rank, at most once per step: True when --early_stopping_patience says stop
    evaluation.improved       # the score at that step was the best so far (then best/ holds those weights)

The weights scored are the ones that would be saved: the EMA's with --use_ema, schedule-free's averaged ones
(`utils.optim.evaluation_weights`), swapped in on every rank so the ranks stay equal. The best score and the
early-stopping count are `state` (saved in checkpoints, restored on resume). best/ is replaced atomically.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable

from utils.atomic import atomic_directory
from utils.ema import ema_weights
from utils.optim import evaluation_weights
from utils.stopping import EarlyStopping


def add_evaluation_args(parser, *, validation_epochs: int | None, num_validation_images: int | None,
                        epochs_help: str = "Validate every N epochs (0: never by epoch).",
                        images_help: str = "Validation images.") -> None:
    """When to evaluate and when to stop early, defined once for the trainers that validate (each passes its
    defaults; None: the script resolves it, as text-to-image does per diffusers script)."""
    parser.add_argument("--validation_steps", type=int, default=None, help="Also run validation every X optimizer steps.")
    parser.add_argument("--validation_epochs", type=int, default=validation_epochs, help=epochs_help)
    parser.add_argument("--num_validation_images", type=int, default=num_validation_images, help=images_help)
    parser.add_argument("--early_stopping_patience", type=int, default=None,
                        help="Stop after this many validations without a better held-out score (needs held-out data).")
    parser.add_argument("--early_stopping_min_delta", type=float, default=0.0,
                        help="How much better the held-out score must be to count as better.")


class Evaluation:
    """`score(step) -> {name: value}` runs on every rank under the weights to evaluate; `key` names the value that
    ranks runs (lower is better unless `stopping` says otherwise); `save_best(directory, metrics)` writes the model
    into a fresh folder (main process); `report(step, metrics, improved, final)` logs and draws what the trainer
    shows, still under the evaluated weights (every rank)."""

    def __init__(self, accelerator, output_dir: str, score: Callable[[int], dict], key: str,
                 save_best: Callable[[str, dict], None] | None = None, ema=None,
                 parameters: Callable[[], Iterable] | None = None, optimizer=None,
                 stopping: EarlyStopping | None = None,
                 report: Callable[[int, dict, bool, bool], None] | None = None):
        self.accelerator, self.output_dir, self.score, self.key = accelerator, output_dir, score, key
        self.save_best, self.report = save_best, report
        self.ema, self.parameters, self.optimizer = ema, parameters, optimizer
        self.stopping = stopping if stopping is not None else EarlyStopping(None)
        self.state = self.stopping.state
        self.last_step, self.improved = None, False

    @property
    def best_dir(self) -> str:
        return os.path.join(self.output_dir, "best")

    def __call__(self, step: int, final: bool = False) -> bool:
        """Score the weights to evaluate at `step` (a second call at the same step does nothing); best/ is written
        when they score best so far. `final`: the end of training, score only (the trainer saves the final
        weights, and best/ too when `improved`). True when early stopping says stop."""
        if self.last_step == step:
            return False
        self.last_step = step
        with evaluation_weights(self.optimizer), ema_weights(self.ema, self.parameters() if self.ema else ()):
            metrics = self.score(step)
            value = metrics.get(self.key)
            self.improved = value is not None and self.stopping.update(value)
            if self.improved and not final:
                self.write_best(metrics)
            if self.report is not None:
                self.report(step, metrics, self.improved, final)
        self.accelerator.wait_for_everyone()
        if self.stopping.should_stop and not final:
            self.stopping.announce()
        return self.stopping.should_stop

    def write_best(self, metrics: dict) -> None:
        """The current weights into best/, atomically (main process; the others return at once)."""
        if self.save_best is not None and self.accelerator.is_main_process:
            with atomic_directory(self.best_dir) as temp:
                self.save_best(temp, metrics)
