"""The step-boundary behaviour the three trainers share (issue 29's bugs from the copies): --offload_ema honoured by
every trainer, one meaning of --validation_epochs, the mask DiT scoring val/loss on the weights it saves and keeping
best/, one checkpoint when a stop lands on a checkpoint step, `checkpointing_steps: null` meaning never."""

import os

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_main_in_process, write_captioned_folder
from utils.run import epoch_validation_due


def test_validation_epochs_has_diffusers_meaning():
    """After the 1st, (N+1)-th, (2N+1)-th ... epoch (0-based epoch % N == 0), in every trainer; 0/None: never."""
    assert [e for e in range(7) if epoch_validation_due(e, 2)] == [0, 2, 4, 6]
    assert [e for e in range(4) if epoch_validation_due(e, 1)] == [0, 1, 2, 3]
    assert not any(epoch_validation_due(e, every) for e in range(4) for every in (0, None))


def mask_dit_argv(data, out, *extra):
    return ["--train_data_dir", data, "--output_dir", out, "--model_size", "tiny", "--resolution", "32",
            "--mask_channels", "2", "--train_batch_size", "4", "--seed", "0", "--report_to", "none",
            "--num_inference_steps", "1", "--num_validation_images", "0", "--logging_steps", "1", *extra]


@pytest.fixture(scope="module")
def fundus(tmp_path_factory):
    from utils.mask_dit.data import write_synthetic_fundus_dataset

    return write_synthetic_fundus_dataset(str(tmp_path_factory.mktemp("fundus")), 10, size=32, seed=0)


@pytest.fixture(scope="module")
def irstd(tmp_path_factory):
    from utils.segmentation.data import write_synthetic_irstd

    return write_synthetic_irstd(str(tmp_path_factory.mktemp("irstd") / "d"), num_train=8, num_test=2, size=32, seed=0)


def seg_argv(data, out, *extra):
    return ["--dataset_dir", data, "--output_dir", out, "--report_to", "none", "--crop_size", "32", "--base_size",
            "32", "--batch_size", "4", "--seed", "0", "--warm_epoch", "0", *extra]


def t2i_argv(pipeline, data, out, *extra):
    return ["--pretrained_model_name_or_path", pipeline, "--train_data_dir", data, "--resolution", "32",
            "--train_batch_size", "2", "--output_dir", out, "--seed", "0", "--report_to", "none",
            "--lr_warmup_steps", "0", *extra]


def tiny_run_argv(script_name, pipeline, fundus, irstd, tmp_path, *flags):
    """A few-step run of `script_name` on tiny data into tmp_path/out."""
    out = tmp_path / "out"
    if script_name == "train_text_to_image":
        return t2i_argv(pipeline, write_captioned_folder(tmp_path, count=4, size=(32, 32)), out, *flags)
    if script_name == "train_mask_dit":
        return mask_dit_argv(fundus, out, "--validation_epochs", "0", *flags)
    return seg_argv(irstd, out, *flags)


@pytest.mark.parametrize("script_name", ["train_text_to_image", "train_mask_dit", "train_segmentation_tpu"])
def test_offload_ema_is_honoured_by_every_trainer(script_name, tiny_pipeline_dir, fundus, irstd, tmp_path,
                                                  monkeypatch):
    """--offload_ema was accepted by all three trainers and passed on by one: each must hand it to place_ema and
    to every ema_step (on a CPU machine the two devices are the same, so the calls are what can be checked)."""
    import importlib

    from utils import loop

    script = importlib.import_module(script_name)
    seen = {"place": [], "step": []}
    place, step = script.place_ema, loop.ema_step
    monkeypatch.setattr(script, "place_ema", lambda ema, device, offload=False: (seen["place"].append(offload),
                                                                                 place(ema, device, offload))[1])
    monkeypatch.setattr(loop, "ema_step", lambda ema, params, device, offload=False: (seen["step"].append(offload),
                                                                                      step(ema, params, device,
                                                                                           offload))[1])
    run_main_in_process(script, tiny_run_argv(script_name, tiny_pipeline_dir, fundus, irstd, tmp_path,
                                              "--use_ema", "--offload_ema", "--max_train_steps", "2"))
    assert seen["place"] == [True] and seen["step"] == [True, True], seen


def test_mask_dit_validates_after_the_same_epochs_as_text_to_image(fundus, tmp_path, monkeypatch):
    import train_mask_dit
    from utils.evaluation import Evaluation

    steps = []
    original = Evaluation.__call__

    def record(self, step, final=False):
        steps.append(step)
        return original(self, step, final)
    monkeypatch.setattr(Evaluation, "__call__", record)
    # 9 training pairs (10 - 1 held out) in batches of 4: 3 steps an epoch, 4 epochs.
    run_main_in_process(train_mask_dit, mask_dit_argv(fundus, tmp_path / "out", "--max_train_steps", "12",
                                                      "--validation_epochs", "2", "--validation_steps", "0",
                                                      "--checkpointing_steps", "100"))
    assert steps == [3, 9]  # after epochs 0 and 2 (0-based), as train_text_to_image.validation_due


def test_mask_dit_scores_the_ema_weights_and_keeps_the_best(fundus, tmp_path):
    import train_mask_dit
    from utils.report import read_metrics

    out = tmp_path / "out"
    run_main_in_process(train_mask_dit, mask_dit_argv(fundus, out, "--max_train_steps", "4", "--use_ema",
                                                      "--ema_decay", "0.5", "--validation_steps", "1",
                                                      "--validation_epochs", "0", "--checkpointing_steps", "1",
                                                      "--report_to", "tensorboard"))
    losses = read_metrics(str(out))["val/loss"]
    best_step = min(losses, key=losses.get)
    best = load_file(out / "best" / "transformer" / "diffusion_pytorch_model.safetensors")
    ema = load_file(out / f"checkpoint-{best_step}" / "transformer_ema" / "diffusion_pytorch_model.safetensors")
    assert best.keys() == ema.keys() and all(torch.equal(best[k], ema[k]) for k in best)


@pytest.mark.parametrize("script_name", ["train_text_to_image", "train_mask_dit", "train_segmentation_tpu"])
def test_a_stop_on_a_checkpoint_step_writes_one_checkpoint(script_name, tiny_pipeline_dir, fundus, irstd, tmp_path,
                                                           monkeypatch):
    import importlib

    from utils import checkpointing, loop
    from utils.stopping import StopSignal

    script = importlib.import_module(script_name)
    saved = []
    save = checkpointing.save_checkpoint

    def counting_save(accelerator, output_dir, step, *args, **kwargs):
        saved.append(step)
        return save(accelerator, output_dir, step, *args, **kwargs)
    monkeypatch.setattr(loop, "save_checkpoint", counting_save)
    monkeypatch.setattr(StopSignal, "should_stop", lambda self, accelerator: True)  # a stop request at step 1
    run_main_in_process(script, tiny_run_argv(script_name, tiny_pipeline_dir, fundus, irstd, tmp_path,
                                              "--max_train_steps", "4", "--checkpointing_steps", "1"))
    assert saved == [1]


@pytest.mark.parametrize("script_name", ["train_text_to_image", "train_segmentation_tpu"])
def test_checkpointing_steps_null_in_yaml_means_never(script_name, tiny_pipeline_dir, irstd, tmp_path):
    """`checkpointing_steps: null` passed the config check, then text-to-image died after step 1 with a TypeError
    and saved nothing; it now means "no step checkpoints", and the final model is saved."""
    import importlib

    script = importlib.import_module(script_name)
    config = tmp_path / "run.yaml"
    config.write_text("checkpointing_steps: null\n")
    out = tmp_path / "out"
    argv = {"train_text_to_image": lambda: t2i_argv(tiny_pipeline_dir, write_captioned_folder(tmp_path, count=4,
                                                                                              size=(32, 32)), out),
            "train_segmentation_tpu": lambda: seg_argv(irstd, out)}[script_name]()
    run_main_in_process(script, ["--config", str(config), *argv, "--max_train_steps", "3"])
    assert not any(name.startswith("checkpoint-") for name in os.listdir(out))
    final = "unet" if script_name == "train_text_to_image" else "last"
    assert os.path.isdir(out / final)
