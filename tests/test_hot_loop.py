"""No host reads in the hot loop: between two optimizer steps that are not logging (or
checkpoint/validation) steps, the training loops never read a tensor's value on the host.

On a GPU each such read (`.item()`, `bool(t)`, `.tolist()`, `float(t)`, `.cpu()`, ...) waits for the
device to finish; on this CPU machine there is nothing to wait for, so the test counts the reads
themselves. One read per step is the protocol's: the non-finite guard's counters, polled at every step
boundary (on CUDA it reads the step before from a non-blocking copy, so the queue never drains;
tests/test_reliability.py tests that scheme). Every other read between logging steps fails. Reads made while loading data (inside torch.utils.data) are not counted: they touch
host tensors only (on a GPU the loader runs before the batch is moved to the device).
"""

import os
import traceback

import pytest
import torch
from conftest import run_main_in_process, write_captioned_folder

READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")
DATA_LOADING = os.path.join("torch", "utils", "data")


def _guard_poll_read() -> str:
    """'telemetry.py:<line>' of the one host read in NonFiniteGuard.poll."""
    import inspect

    from utils.telemetry import NonFiniteGuard

    lines, first = inspect.getsourcelines(NonFiniteGuard.poll)
    (offset,) = [i for i, line in enumerate(lines) if ".tolist()" in line]
    return f"telemetry.py:{first + offset}"


GUARD_POLL = _guard_poll_read()


class ReadCounter:
    def __init__(self):
        self.count, self.where = 0, []

    def install(self, monkeypatch):
        for name in READS:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, __original=original, __name=name, **kwargs):
                stack = traceback.extract_stack(limit=40)
                if not any(DATA_LOADING in frame.filename for frame in stack):
                    self.count += 1
                    self.where.append((__name, next((f"{os.path.basename(f.filename)}:{f.lineno}" for f in reversed(stack[:-1])
                                                     if "site-packages" not in f.filename), "?")))
                return __original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


def reads_per_step(script, argv, monkeypatch):
    """Run the script in-process; the number of host reads between consecutive optimizer steps."""
    from utils import run

    counter, marks = ReadCounter(), []

    def counting_progress_bar(accelerator, total, initial=0):
        bar = run.progress_bar(accelerator, total, initial)
        update = bar.update

        def update_and_mark(n=1):
            marks.append((counter.count, len(counter.where)))
            return update(n)

        bar.update = update_and_mark
        return bar

    monkeypatch.setattr(script, "progress_bar", counting_progress_bar)
    counter.install(monkeypatch)
    run_main_in_process(script, argv)
    steps = [(b[0] - a[0], counter.where[a[1]:b[1]]) for a, b in zip(marks, marks[1:])]
    return steps  # steps[i]: reads between the end of step i + 1 and the end of step i + 2


def assert_quiet_between_logging_steps(steps, logging_steps):
    """steps[i]: reads after the end of step s = i + 1 up to the end of step s + 1. A logging step L
    reads in its update (the non-finite counters) and after it (the metrics): the intervals ending
    and starting at L may read; every other one must not."""
    for index, (count, where) in enumerate(steps):
        step = index + 1
        if step % logging_steps == 0 or (step + 1) % logging_steps == 0:
            continue
        others = [read for read in where if read[1] != GUARD_POLL]
        assert count - len(others) == 1, f"the guard should be read once between steps {step} and {step + 1}: {where}"
        assert not others, f"{len(others)} host read(s) between the ends of steps {step} and {step + 1}: {others}"
    assert sum(1 for index in range(len(steps)) if (index + 1) % logging_steps and (index + 2) % logging_steps) >= 4
    assert any(count for count, _ in steps), "the logging steps should read the metrics"


@pytest.mark.parametrize("cached", [False, True], ids=["images", "precompute"])
def test_text_to_image_loop_reads_nothing_between_logging_steps(tiny_pipeline_dir, tmp_path, monkeypatch, cached):
    import train_text_to_image as script

    (tmp_path / "data").mkdir()
    data = write_captioned_folder(tmp_path / "data")
    argv = ["--pretrained_model_name_or_path", tiny_pipeline_dir, "--train_data_dir", data, "--resolution", "32",
            "--train_batch_size", "2", "--max_train_steps", "9", "--logging_steps", "4", "--use_ema",
            "--checkpointing_steps", "1000", "--output_dir", str(tmp_path / "out"), "--seed", "0", "--report_to", "none",
            "--random_flip", "--snr_gamma", "5"] + (["--precompute"] if cached else [])
    assert_quiet_between_logging_steps(reads_per_step(script, argv, monkeypatch), 4)


def test_mask_dit_loop_reads_nothing_between_logging_steps(tmp_path, monkeypatch):
    import train_mask_dit as script
    from utils.mask_dit.data import write_synthetic_fundus_dataset

    data = write_synthetic_fundus_dataset(str(tmp_path / "fundus"), 8, size=32, seed=0)
    argv = ["--train_data_dir", data, "--output_dir", str(tmp_path / "out"), "--model_size", "tiny", "--resolution", "32",
            "--mask_channels", "2", "--train_batch_size", "2", "--seed", "0", "--report_to", "none", "--max_train_steps", "9",
            "--logging_steps", "4", "--checkpointing_steps", "1000", "--validation_steps", "0", "--validation_epochs", "0",
            "--num_validation_images", "0", "--use_ema", "--random_flip"]
    assert_quiet_between_logging_steps(reads_per_step(script, argv, monkeypatch), 4)


def test_segmentation_loop_reads_nothing_between_logging_steps(tmp_path, monkeypatch):
    import train_segmentation_tpu as script
    from utils.segmentation.data import write_synthetic_irstd

    data = write_synthetic_irstd(str(tmp_path / "irstd"), num_train=20, num_test=2, size=32, seed=0)
    argv = ["--dataset_dir", data, "--output_dir", str(tmp_path / "out"), "--batch_size", "2", "--crop_size", "32",
            "--base_size", "32", "--warm_epoch", "0", "--seed", "0", "--report_to", "none", "--max_train_steps", "9",
            "--logging_steps", "4", "--checkpointing_steps", "1000", "--eval_epochs", "1000", "--use_ema"]
    assert_quiet_between_logging_steps(reads_per_step(script, argv, monkeypatch), 4)
