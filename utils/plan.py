"""The numbers a run derives from its flags (per-device batch, accumulation, steps, epochs, learning rate), worked
out once into a `TrainingPlan`. Nothing writes them back into `args`: the flags stay what the user gave
(`--train_batch_size auto`, `--max_train_steps` unset), the plan says what the run does, and training_args.json
records both."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from utils.auto_batch import batch_size_arg
from utils.run import steps_per_epoch


def add_plan_args(parser, *, batch_size: int, epochs: int, learning_rate: float, aliases: dict | None = None) -> None:
    """--train_batch_size, --num_train_epochs, --max_train_steps and --learning_rate, the flags a TrainingPlan is
    made from, defined once for every trainer: each passes its defaults, and `aliases` other names of a flag
    (guide 004's `--batch_size`, `--epochs`, `--lr` for segmentation)."""
    names = lambda dest: [f"--{dest}", *(aliases or {}).get(dest, ())]  # noqa: E731
    group = parser.add_argument_group("training length")
    group.add_argument(*names("train_batch_size"), dest="train_batch_size", type=batch_size_arg, default=batch_size,
                       help="Batch size (per device) for the training dataloader, or 'auto': the largest that fits "
                            "(see --effective_batch_size).")
    group.add_argument(*names("num_train_epochs"), dest="num_train_epochs", type=int, default=epochs,
                       help="Training epochs (--max_train_steps overrides).")
    group.add_argument("--max_train_steps", type=int, default=None,
                       help="Total number of training steps to perform.  If provided, overrides num_train_epochs.")
    group.add_argument(*names("learning_rate"), dest="learning_rate", type=float, default=learning_rate,
                       help="Initial learning rate (after the potential warmup period) to use.")


@dataclass(frozen=True)
class TrainingPlan:
    batch_size: int  # per device: --train_batch_size, or what `auto` found
    gradient_accumulation_steps: int  # the flag, or what --effective_batch_size needs with `auto`
    num_processes: int
    updates_per_epoch: int  # optimizer steps in one epoch of one process's batches
    max_train_steps: int  # --max_train_steps, else --num_train_epochs x updates_per_epoch
    num_epochs: int  # epochs the loop runs to reach max_train_steps
    learning_rate: float  # --learning_rate, times the total batch with --scale_lr

    @property
    def total_batch_size(self) -> int:
        """Samples per optimizer step over all processes."""
        return self.batch_size * self.gradient_accumulation_steps * self.num_processes

    def as_dict(self) -> dict:
        return {**asdict(self), "total_batch_size": self.total_batch_size}

    def describe(self, num_examples: int, first_step: int = 0) -> str:
        return (f"examples={num_examples} epochs={self.num_epochs} batch/device={self.batch_size} "
                f"total batch={self.total_batch_size} accumulation={self.gradient_accumulation_steps} "
                f"steps={self.max_train_steps} (from {first_step})")


def plan_training(batch_size: int, gradient_accumulation_steps: int, num_processes: int, batches_per_process: int,
                  max_train_steps: int | None, num_train_epochs: int, learning_rate: float,
                  scale_lr: bool = False) -> TrainingPlan:
    """The plan from the resolved batch (see utils.auto_batch) and the number of batches each process sees in an
    epoch (`len(dataloader)` per process)."""
    updates_per_epoch = steps_per_epoch(batches_per_process, gradient_accumulation_steps)
    steps = max_train_steps if max_train_steps is not None else num_train_epochs * updates_per_epoch
    scale = gradient_accumulation_steps * batch_size * num_processes if scale_lr else 1
    return TrainingPlan(batch_size, gradient_accumulation_steps, num_processes, updates_per_epoch, steps,
                        math.ceil(steps / updates_per_epoch), learning_rate * scale)
