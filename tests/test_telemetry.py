"""utils/telemetry.py: the HealthMonitor protocol, and every script's logged loss / grad_norm read back from
TensorBoard against the values the run really computed (recorded around its loss function and
`Accelerator.clip_grad_norm_`), averaged by the test itself.

The bug these catch: one shared `add()` count divided every key by the number of calls, so the
text-to-image loss and noise_std were logged at half their value (a third with accumulation 2)
and the other scripts' grad_norm was divided by the accumulation steps.
"""

import glob
import math
import os

import accelerate
import pytest
import torch

from conftest import run_main_in_process, write_captioned_folder
from utils.telemetry import HealthMonitor, batch_size_of


# ----------------------------------------------------------------------------------------------
# The protocol
# ----------------------------------------------------------------------------------------------

def test_each_key_is_averaged_over_its_own_calls():
    monitor = HealthMonitor()
    for step in range(3):  # accumulation 2: loss twice per step, grad_norm once
        monitor.add(loss=torch.tensor(1.0 + step), noise_std=torch.tensor(1.0))
        monitor.add(loss=torch.tensor(3.0 + step), noise_std=torch.tensor(1.0), grad_norm=None)
        monitor.add(grad_norm=torch.tensor(10.0 * (step + 1)))
        monitor.count_samples(4)
        monitor.count_samples(4)
        monitor.step_done()
    logs = monitor.collect()
    assert logs["loss"] == pytest.approx((2 + 3 + 4) / 3) and logs["noise_std"] == pytest.approx(1.0)
    assert logs["grad_norm"] == pytest.approx(20.0)
    assert logs["step_time_ms"] > 0 and logs["samples_per_sec"] > 0
    # collect() starts a new window
    monitor.add(loss=torch.tensor(7.0))
    monitor.step_done()
    assert monitor.collect()["loss"] == pytest.approx(7.0)


def test_samples_per_sec_counts_the_samples_really_seen(monkeypatch):
    import utils.telemetry as telemetry

    clock = iter([100.0, 102.0])  # the window lasts 2 s
    monkeypatch.setattr(telemetry.time, "perf_counter", lambda: next(clock))
    monitor = HealthMonitor()
    for _ in range(4):  # a batch of 16 asked for, a data set of 3: each step saw 3 samples
        monitor.count_samples(3)
        monitor.step_done()
    assert monitor.collect()["samples_per_sec"] == pytest.approx(4 * 3 / 2.0)


class _TwoRanks:
    """An accelerator whose all-reduce adds what a second rank holds."""

    num_processes, device = 2, torch.device("cpu")

    def __init__(self, other):
        self.other = other

    def reduce(self, tensor, reduction="sum"):
        assert reduction == "sum"
        return tensor + self.other


def test_collect_averages_over_processes_by_sums_and_counts():
    monitor = HealthMonitor()
    monitor.add(loss=torch.tensor(1.0))
    monitor.add(loss=torch.tensor(3.0))
    monitor.count_samples(2)
    monitor.step_done()
    # rank 1 saw one micro-batch of loss 8 and 5 samples: packed as [sums..., counts..., samples]
    logs = monitor.collect(_TwoRanks(torch.tensor([8.0, 1.0, 5.0])))
    assert logs["loss"] == pytest.approx((1 + 3 + 8) / 3)
    assert logs["samples_per_sec"] > 0


def test_batch_size_of_reads_shapes_only():
    assert batch_size_of({"captions": ["a", "b"], "pixel_values": torch.zeros(3, 1)}) == 2
    assert batch_size_of({"pixel_values": torch.zeros(5, 3, 2, 2)}) == 5
    with pytest.raises(ValueError, match="no tensor or list"):
        batch_size_of({"flag": True})


# ----------------------------------------------------------------------------------------------
# The scripts: logged values = the test's own means of what the run computed
# ----------------------------------------------------------------------------------------------

def read_scalars(output_dir) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {}
    for path in glob.glob(os.path.join(output_dir, "logs", "**", "events.out.tfevents.*"), recursive=True):
        events = EventAccumulator(path)
        events.Reload()
        for tag in events.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update({e.step: e.value for e in events.Scalars(tag)})
    return scalars


def record_run(monkeypatch, script, loss_name, argv, loss_module=None):
    """Run `script` in-process; return (micro-batch losses in order, pre-clip grad norms in order, scalars).
    `loss_module`: where the script's loop finds `loss_name` (default: the script itself)."""
    losses, norms = [], []
    loss_module = loss_module or script
    compute_loss = getattr(loss_module, loss_name)

    def recording_loss(*args, **kwargs):
        loss = compute_loss(*args, **kwargs)
        losses.append(loss.detach().float().item())
        return loss

    clip = accelerate.Accelerator.clip_grad_norm_

    def recording_clip(self, parameters, max_norm, norm_type=2):
        parameters = list(parameters)
        # clip_grad_norm_ returns the total norm before clipping: what grad_norm must log
        norm = clip(self, parameters, max_norm, norm_type)
        norms.append(float(norm))
        return norm

    monkeypatch.setattr(loss_module, loss_name, recording_loss)
    monkeypatch.setattr(accelerate.Accelerator, "clip_grad_norm_", recording_clip)
    run_main_in_process(script, argv)
    output_dir = argv[argv.index("--output_dir") + 1]
    return losses, norms, read_scalars(str(output_dir))


def assert_logged_means(scalars, losses, norms, accumulation, steps, loss_tag="train/loss"):
    assert len(losses) == steps * accumulation and len(norms) == steps
    for step in range(1, steps + 1):
        micro = losses[(step - 1) * accumulation: step * accumulation]
        assert scalars[loss_tag][step] == pytest.approx(sum(micro) / accumulation, rel=1e-5), f"loss at step {step}"
        assert scalars["train/grad_norm"][step] == pytest.approx(norms[step - 1], rel=1e-5), f"grad_norm at {step}"


@pytest.mark.parametrize("accumulation", [1, 2])
def test_text_to_image_logs_the_true_loss_grad_norm_and_noise_std(accumulation, tiny_pipeline_dir, tmp_path,
                                                                   monkeypatch):
    import train_text_to_image as script

    (tmp_path / "data").mkdir()
    data = write_captioned_folder(tmp_path / "data", count=4, size=(32, 32))
    steps, output_dir = 3, str(tmp_path / "out")
    argv = ["--pretrained_model_name_or_path", tiny_pipeline_dir, "--train_data_dir", data, "--resolution", "32",
            "--train_batch_size", "2", "--gradient_accumulation_steps", str(accumulation), "--max_train_steps",
            str(steps), "--logging_steps", "1", "--seed", "0", "--lr_warmup_steps", "0", "--checkpointing_steps",
            "1000", "--report_to", "tensorboard", "--output_dir", output_dir]
    import utils.sd.losses  # the SD family's loss (utils/families/sd.py calls it from there)

    losses, norms, scalars = record_run(monkeypatch, script, "diffusion_loss", argv, loss_module=utils.sd.losses)
    assert_logged_means(scalars, losses, norms, accumulation, steps)
    assert_logged_means(scalars, losses, norms, accumulation, steps, loss_tag="train_loss")  # diffusers' alias
    # noise ~ N(0, 1): its std over 2 x 4 x 4 x 4 = 128 values has a sampling sd of about 1/sqrt(2 * 128)
    for step, value in scalars["train/noise_std"].items():
        assert abs(value - 1.0) < 4 / math.sqrt(2 * 128), f"noise_std {value} at step {step}"
    for step, value in scalars["train/samples_per_sec"].items():
        assert value > 0


@pytest.mark.parametrize("accumulation", [1, 2])
def test_mask_dit_logs_the_true_loss_and_grad_norm(accumulation, tmp_path, monkeypatch):
    import train_mask_dit as script
    from utils.mask_dit.data import write_synthetic_fundus_dataset

    data = write_synthetic_fundus_dataset(str(tmp_path / "fundus"), 8, size=32, seed=0)
    steps = 3
    argv = ["--train_data_dir", data, "--output_dir", str(tmp_path / "out"), "--model_size", "tiny", "--resolution",
            "32", "--mask_channels", "2", "--train_batch_size", "2", "--gradient_accumulation_steps",
            str(accumulation), "--seed", "0", "--report_to", "tensorboard", "--max_train_steps", str(steps),
            "--logging_steps", "1", "--checkpointing_steps", "1000", "--validation_steps", "0",
            "--validation_epochs", "0", "--num_validation_images", "0", "--validation_split", "0"]
    losses, norms, scalars = record_run(monkeypatch, script, "flow_step_loss", argv)
    assert_logged_means(scalars, losses, norms, accumulation, steps)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_segmentation_logs_the_true_loss_and_grad_norm(accumulation, tmp_path, monkeypatch):
    import train_segmentation_tpu as script
    from utils.segmentation.data import write_synthetic_irstd

    data = write_synthetic_irstd(str(tmp_path / "irstd"), num_train=8, num_test=2, size=32, seed=0)
    steps = 3
    argv = ["--dataset_dir", data, "--output_dir", str(tmp_path / "out"), "--batch_size", "2", "--crop_size", "32",
            "--base_size", "32", "--warm_epoch", "0", "--seed", "0", "--report_to", "tensorboard",
            "--max_train_steps", str(steps), "--gradient_accumulation_steps", str(accumulation),
            "--logging_steps", "1", "--checkpointing_steps", "1000",
            "--max_grad_norm", "1e6"]  # (the default, 0 as in the reference, does not clip)
    losses, norms, scalars = record_run(monkeypatch, script, "multiscale_sls_loss", argv)
    assert_logged_means(scalars, losses, norms, accumulation, steps)


def two_process_text_to_image(tmp_path, tiny_pipeline_dir):
    (tmp_path / "data").mkdir()
    data = write_captioned_folder(tmp_path / "data", count=8, size=(32, 32))
    return "train_text_to_image.py", ["--pretrained_model_name_or_path", tiny_pipeline_dir, "--train_data_dir", data,
                                      "--resolution", "32", "--train_batch_size", "1", "--lr_warmup_steps", "0"]


def two_process_mask_dit(tmp_path, _):
    from utils.mask_dit.data import write_synthetic_fundus_dataset

    data = write_synthetic_fundus_dataset(str(tmp_path / "fundus"), 8, size=32, seed=0)
    return "train_mask_dit.py", ["--train_data_dir", data, "--model_size", "tiny", "--resolution", "32",
                                 "--mask_channels", "2", "--train_batch_size", "1", "--validation_steps", "0",
                                 "--validation_epochs", "0", "--num_validation_images", "0", "--validation_split", "0"]


def two_process_segmentation(tmp_path, _):
    from utils.segmentation.data import write_synthetic_irstd

    data = write_synthetic_irstd(str(tmp_path / "irstd"), num_train=8, num_test=2, size=32, seed=0)
    return "train_segmentation_tpu.py", ["--dataset_dir", data, "--batch_size", "1", "--crop_size", "32",
                                         "--base_size", "32", "--warm_epoch", "0"]


@pytest.mark.slow
@pytest.mark.parametrize("case", [two_process_text_to_image, two_process_mask_dit, two_process_segmentation],
                         ids=["train_text_to_image", "train_mask_dit", "train_segmentation_tpu"])
def test_two_processes_log_the_mean_over_ranks_and_micro_batches(case, tiny_pipeline_dir, tmp_path):
    """A real 2-process gloo run under `accelerate launch` (accumulation 2): the logged loss of a step is the
    mean over both ranks and both micro-batches of what each rank's monitor was given (dumped per rank by
    its debug hook), grad_norm the mean of the ranks' (equal) norms."""
    from conftest import accelerate_launch, launch_env
    from utils.telemetry import HealthMonitor

    script, argv = case(tmp_path, tiny_pipeline_dir)
    record_dir, output_dir = tmp_path / "monitor", str(tmp_path / "out")
    record_dir.mkdir()
    env = dict(launch_env(), **{HealthMonitor.RECORD_ENV: str(record_dir)})
    steps = 2
    accelerate_launch(script, argv + [
        "--gradient_accumulation_steps", "2", "--max_train_steps", str(steps), "--logging_steps", "1", "--seed", "0",
        "--checkpointing_steps", "1000", "--report_to", "tensorboard", "--output_dir", output_dir],
        num_processes=2, env=env)
    per_rank = []
    for rank in (0, 1):
        lines = [__import__("json").loads(line) for line in open(record_dir / f"rank{rank}.jsonl")]
        by_step, current = [], []
        for entry in lines:
            if "step_done" in entry:
                by_step.append(current)
                current = []
            else:
                current.append(entry)
        per_rank.append(by_step)
    scalars = read_scalars(output_dir)
    for step in range(1, steps + 1):
        losses = [e["loss"] for rank in per_rank for e in rank[step - 1] if "loss" in e]
        norms = [e["grad_norm"] for rank in per_rank for e in rank[step - 1] if "grad_norm" in e]
        assert len(losses) == 4 and len(norms) == 2  # 2 ranks x 2 micro-batches; one norm per rank and step
        assert scalars["train/loss"][step] == pytest.approx(sum(losses) / 4, rel=1e-5)
        assert scalars["train/grad_norm"][step] == pytest.approx(sum(norms) / 2, rel=1e-5)
        assert norms[0] == pytest.approx(norms[1], rel=1e-5)  # DDP: both ranks clip the same synced gradients
        assert losses[0] != losses[2]  # the ranks saw different samples
