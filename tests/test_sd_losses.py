"""utils/sd/losses.py against an independent float64 NumPy recomputation of kohya's formulas, and a short run."""

import argparse
import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

import train_text_to_image
from tests.conftest import run_main_in_process, write_captioned_folder
from utils.errors import UserError
from utils.sd.losses import debiased_weights, huber_threshold, weighted_loss


def scheduler(prediction_type="epsilon"):
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                         beta_end=0.012, prediction_type=prediction_type)


def reference(pred, target, timesteps, sched, loss_type, schedule, huber_c, debiased, v_prediction=False):
    """Element loss per kohya's conditional_loss, averaged per sample, weighted, averaged (float64)."""
    abar = sched.alphas_cumprod.double().numpy()[timesteps]
    if schedule == "constant":
        c = np.full(len(timesteps), huber_c)
    elif schedule == "exponential":
        c = np.exp(math.log(huber_c) / 1000 * timesteps)
    else:
        c = (1 - huber_c) / (1 + np.sqrt((1 - abar) / abar)) ** 2 + huber_c
    c = c[:, None, None, None]
    r = pred - target
    element = {"l2": r ** 2, "l1": np.abs(r), "huber": 2 * c * (np.sqrt(r ** 2 + c ** 2) - c),
               "smooth_l1": 2 * (np.sqrt(r ** 2 + c ** 2) - c)}[loss_type]
    per_sample = element.mean(axis=(1, 2, 3))
    if debiased:
        snr = np.minimum(abar / (1 - abar), 1000)
        per_sample = per_sample * (1 / (snr + 1) if v_prediction else 1 / np.sqrt(snr))
    return per_sample.mean()


@pytest.mark.parametrize("loss_type", ["l2", "l1", "huber", "smooth_l1"])
@pytest.mark.parametrize("schedule", ["constant", "exponential", "snr"])
@pytest.mark.parametrize("debiased", [False, True])
def test_weighted_loss_matches_an_independent_recomputation(loss_type, schedule, debiased):
    rng = np.random.default_rng(0)
    pred, target = rng.normal(size=(6, 4, 8, 8)), rng.normal(size=(6, 4, 8, 8)) * 2
    timesteps = np.array([0, 1, 250, 500, 900, 999])
    sched = scheduler()
    args = argparse.Namespace(loss_type=loss_type, huber_schedule=schedule, huber_c=0.1, snr_gamma=None,
                              debiased_estimation_loss=debiased)
    ours = weighted_loss(args, torch.tensor(pred, dtype=torch.float32), torch.tensor(target, dtype=torch.float32),
                         torch.tensor(timesteps), sched).item()
    assert ours == pytest.approx(reference(pred, target, timesteps, sched, loss_type, schedule, 0.1, debiased),
                                 rel=1e-5)


def test_huber_thresholds_at_the_ends_of_the_schedules():
    sched, t = scheduler(), torch.tensor([0, 1000 - 1])
    exponential = huber_threshold("exponential", 0.1, torch.tensor([0, 1000]), sched)
    assert exponential.tolist() == pytest.approx([1.0, 0.1])
    snr = huber_threshold("snr", 0.1, t, sched)
    assert snr[0] > 0.9 and snr[1] == pytest.approx(0.1, abs=0.01)  # clean: ~1; pure noise: ~huber_c
    assert huber_threshold("constant", 0.3, t, sched).tolist() == pytest.approx([0.3, 0.3])


def test_debiased_weights_for_v_prediction():
    sched = scheduler("v_prediction")
    t = torch.tensor([0, 999])
    abar = sched.alphas_cumprod[t].double()
    snr = torch.clamp(abar / (1 - abar), max=1000)
    assert debiased_weights(sched, t).double().tolist() == pytest.approx((1 / (snr + 1)).tolist(), rel=1e-5)


def test_min_snr_path_is_unchanged_for_l2():
    """--snr_gamma alone computes what the script computed before the loss options (diffusers' formula)."""
    from diffusers.training_utils import compute_snr

    torch.manual_seed(0)
    pred, target, t = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8), torch.tensor([3, 300, 600, 990])
    sched = scheduler()
    snr = compute_snr(sched, t)
    weights = torch.stack([snr, 5.0 * torch.ones_like(t)], dim=1).min(dim=1)[0] / snr
    before = (torch.nn.functional.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3)) * weights).mean()
    args = argparse.Namespace(loss_type="l2", huber_schedule="snr", huber_c=0.1, snr_gamma=5.0,
                              debiased_estimation_loss=False)
    assert torch.equal(weighted_loss(args, pred, target, t, sched), before)


def test_text_to_image_trains_with_huber_and_debiased_loss(tiny_pipeline_dir, tmp_path):
    (tmp_path / "data").mkdir()
    data = write_captioned_folder(tmp_path / "data", count=4, size=(32, 32))
    common = ["--pretrained_model_name_or_path", tiny_pipeline_dir, "--train_data_dir", data, "--resolution", "32",
              "--train_batch_size", "2", "--max_train_steps", "2", "--report_to", "none", "--seed", "0"]
    run_main_in_process(train_text_to_image, common + ["--output_dir", str(tmp_path / "out"), "--loss_type", "huber",
                                                       "--huber_schedule", "exponential", "--debiased_estimation_loss"])
    assert (tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    with pytest.raises(UserError, match="--huber_c 0.0 must be in"):
        train_text_to_image.parse_args(common + ["--output_dir", str(tmp_path / "o2"), "--huber_c", "0"])
