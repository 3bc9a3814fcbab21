"""--optimizer / --optimizer_args (utils.optim.create_optimizer, one builder for all three scripts): every
optimizer trains and resumes bit for bit; schedule-free AdamW evaluates and saves its averaged weights."""

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import train_mask_dit
import train_segmentation_tpu
import train_text_to_image
from tests.conftest import run_main_in_process, write_captioned_folder
from tests.test_reliability import assert_same, load_torch_file
from utils.errors import MissingPackageError, UserError
from utils.optim import OPTIMIZERS, create_optimizer, evaluation_weights, is_schedule_free, parse_optimizer_args


def test_optimizer_args_are_python_literals_and_bad_items_name_themselves():
    assert parse_optimizer_args(["d_coef=2", "betas=(0.9, 0.99)", "safeguard_warmup=True", "mode=fast"]) == {
        "d_coef": 2, "betas": (0.9, 0.99), "safeguard_warmup": True, "mode": "fast"}
    with pytest.raises(UserError, match="--optimizer_args 'd_coef'"):
        parse_optimizer_args(["d_coef"])
    with pytest.raises(UserError, match="--optimizer prodigy --optimizer_args"):
        create_optimizer("prodigy", torch.nn.Linear(2, 2).parameters(), "cpu", lr=1.0, extra={"no_such_key": 1})


def test_a_missing_package_is_named_with_its_pip_command(monkeypatch):
    import importlib

    real = importlib.import_module
    def import_module(name, *args):
        if name == "prodigyopt":
            raise ImportError(name)
        return real(name, *args)
    monkeypatch.setattr(importlib, "import_module", import_module)
    with pytest.raises(MissingPackageError, match="pip install prodigyopt"):
        create_optimizer("prodigy", torch.nn.Linear(2, 2).parameters(), "cpu", lr=1.0)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_each_optimizer_lowers_a_simple_loss(name):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    inputs, targets = torch.randn(64, 8), torch.randn(64, 1)
    lr = {"prodigy": 1.0, "adagrad": 0.1, "lion": 3e-3}.get(name, 1e-2)
    optimizer = create_optimizer(name, model.parameters(), "cpu", lr=lr)
    first = None
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        first = first if first is not None else loss.item()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with evaluation_weights(optimizer):
        final = torch.nn.functional.mse_loss(model(inputs), targets).item()
    assert final < first, (name, first, final)


def test_schedule_free_evaluates_averaged_weights_and_restores_training_ones_exactly():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    optimizer = create_optimizer("schedulefree_adamw", model.parameters(), "cpu", lr=1e-2)
    assert is_schedule_free(optimizer) and optimizer.param_groups[0]["train_mode"]
    for _ in range(5):
        model(torch.randn(3, 4)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    training = [p.detach().clone() for p in model.parameters()]
    with evaluation_weights(optimizer):
        averaged = [p.detach().clone() for p in model.parameters()]
        assert not optimizer.param_groups[0]["train_mode"]
    assert optimizer.param_groups[0]["train_mode"]
    assert any(not torch.equal(a, t) for a, t in zip(averaged, training))  # eval mode holds other weights
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), training))  # and training ones come back bitwise


def test_use_8bit_adam_is_an_alias_that_conflicts_with_another_optimizer(tmp_path):
    common = ["--model_preset", "tiny", "--train_data_dir", str(tmp_path), "--output_dir", str(tmp_path / "o")]
    assert train_text_to_image.parse_args(common + ["--use_8bit_adam"]).optimizer == "adamw8bit"
    with pytest.raises(UserError, match="--use_8bit_adam means --optimizer adamw8bit"):
        train_text_to_image.parse_args(common + ["--use_8bit_adam", "--optimizer", "lion"])


def assert_same_files(first, second, names):
    """Weights and optimizer state only, not test_reliability.assert_checkpoints_identical's RNG states: the
    uninterrupted run validates between checkpoint-2 and step 3 and the mask DiT's sampling draws from the global
    RNG there, so its random_states differ while the trained weights (per-step seeded noise) do not."""
    for name in names:
        a, b = load_file(os.path.join(first, name)), load_file(os.path.join(second, name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key} differs after resume"
    states = [load_torch_file(os.path.join(d, "optimizer.bin")) for d in (first, second)]
    assert_same(*states, "optimizer.bin")  # contents, not bytes: the zip's layout may differ for equal contents


def straight_and_resumed(script, args, tmp_path, steps=3, resume_from=2):
    """`steps` steps in one run, and `resume_from` + a resumed run from that checkpoint alone."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_main_in_process(script, args(straight, steps))
    os.makedirs(resumed)
    shutil.copytree(straight / f"checkpoint-{resume_from}", resumed / f"checkpoint-{resume_from}")
    run_main_in_process(script, args(resumed, steps) + ["--resume_from_checkpoint", "latest"])
    return straight, resumed


LR = {"prodigy": "1.0", "adagrad": "1e-2", "lion": "1e-4", "schedulefree_adamw": "2e-3"}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_text_to_image_trains_and_resumes_bitwise_with_each_optimizer(name, tiny_pipeline_dir, tmp_path):
    """3 steps == 2 steps + resume, bit for bit (weights, optimizer state); a validation at step 2 (after
    checkpoint-2) runs only in the straight run, so schedule-free's eval/train switch must leave no trace."""
    os.makedirs(tmp_path / "data")
    data = write_captioned_folder(tmp_path / "data", count=4, size=(32, 32))

    def args(out, steps):
        return ["--pretrained_model_name_or_path", tiny_pipeline_dir, "--train_data_dir", data, "--resolution", "32",
                "--train_batch_size", "2", "--max_train_steps", str(steps), "--checkpointing_steps", "1",
                "--output_dir", str(out), "--seed", "0", "--report_to", "none", "--lr_warmup_steps", "0",
                "--lr_scheduler", "constant", "--learning_rate", LR.get(name, "1e-4"), "--optimizer", name,
                "--validation_prompts", "a thing", "--validation_steps", "2", "--validation_inference_steps", "1",
                "--num_validation_images", "1", "--skip_preflight"]

    straight, resumed = straight_and_resumed(train_text_to_image, args, tmp_path)
    assert_same_files(straight / "checkpoint-3", resumed / "checkpoint-3", ["unet/diffusion_pytorch_model.safetensors"])
    final = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(straight / final), load_file(resumed / final)
    assert all(torch.equal(a[k], b[k]) for k in a)
    before = load_file(os.path.join(tiny_pipeline_dir, final))
    assert any(not torch.equal(a[k], before[k]) for k in a), "the optimizer changed nothing"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_mask_dit_and_segmentation_resume_bitwise_with_each_optimizer(name, tmp_path):
    from utils.mask_dit.data import write_synthetic_fundus_dataset
    from utils.segmentation.data import write_synthetic_irstd

    lr = LR.get(name, "1e-4")
    fundus = write_synthetic_fundus_dataset(str(tmp_path / "fundus"), 8, size=32, seed=0)

    def mask_dit_args(out, steps):
        return ["--train_data_dir", fundus, "--output_dir", str(out), "--model_size", "tiny", "--resolution", "32",
                "--mask_channels", "2", "--train_batch_size", "4", "--seed", "0", "--report_to", "none",
                "--num_inference_steps", "1", "--num_validation_images", "1", "--max_train_steps", str(steps),
                "--checkpointing_steps", "1", "--validation_steps", "2", "--learning_rate", lr, "--lr_warmup_steps",
                "0", "--optimizer", name]

    straight, resumed = straight_and_resumed(train_mask_dit, mask_dit_args, tmp_path / "mask_dit")
    assert_same_files(straight / "checkpoint-3", resumed / "checkpoint-3",
                      ["transformer/diffusion_pytorch_model.safetensors"])

    irstd = write_synthetic_irstd(str(tmp_path / "irstd"), num_train=8, num_test=4, size=32, seed=0)

    def segmentation_args(out, steps):  # 2 steps an epoch: evaluation after step 2, after checkpoint-2
        return ["--dataset_dir", irstd, "--output_dir", str(out), "--batch_size", "4", "--crop_size", "32",
                "--base_size", "32", "--warm_epoch", "0", "--seed", "0", "--report_to", "none", "--max_train_steps",
                str(steps), "--checkpointing_steps", "1", "--lr", lr, "--optimizer", name]

    straight, resumed = straight_and_resumed(train_segmentation_tpu, segmentation_args, tmp_path / "segmentation")
    assert_same_files(straight / "checkpoint-3", resumed / "checkpoint-3", ["mshnet/model.safetensors"])
