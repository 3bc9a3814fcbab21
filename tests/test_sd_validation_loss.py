"""train_text_to_image.py --validation_split / val/loss / --early_stopping_* / <output_dir>/best/.

val/loss is recomputed here from the saved weights and the held-out images with code of the test's own (the
spec: each held-out sample i at timestep int(((i * 0.618... + 0.5) % 1) * T), with noise from a generator seeded
seed * 1000003 + i, on the VAE posterior mean; MSE of the epsilon target, averaged over samples)."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import train_text_to_image
from tests.conftest import run_main_in_process, write_captioned_folder
from utils.errors import UserError

GOLDEN = 0.6180339887498949


def metric_series(output_dir, key):
    """{step: value} of a logged key, from report/metrics.jsonl."""
    from utils.report import read_metrics

    return read_metrics(output_dir).get(key, {})


def unet_weights(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def recomputed_val_loss(pipeline_dir, held_out_dir, seed):
    """The held-out loss of a saved pipeline, from the spec (images are already 32x32: no resize or crop)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir, safety_checker=None)
    names = sorted(n for n in os.listdir(held_out_dir) if n.endswith(".png"))
    losses = []
    with torch.no_grad():
        for i, name in enumerate(names):
            pixels = np.asarray(Image.open(os.path.join(held_out_dir, name)).convert("RGB"), dtype=np.float32)
            pixels = torch.from_numpy(pixels / 127.5 - 1.0).permute(2, 0, 1)[None]
            latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
            caption = open(os.path.join(held_out_dir, name[:-4] + ".txt"), encoding="utf-8").read().strip()
            ids = pipe.tokenizer(caption, max_length=pipe.tokenizer.model_max_length, padding="max_length",
                                 truncation=True, return_tensors="pt").input_ids
            hidden = pipe.text_encoder(ids)[0]
            t = int(((i * GOLDEN + 0.5) % 1.0) * 1000)
            noise = torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(seed * 1000003 + i))[None]
            config = pipe.scheduler.config  # scaled_linear betas, as DDPM defines them
            assert config.beta_schedule == "scaled_linear" and config.prediction_type == "epsilon"
            betas = torch.linspace(config.beta_start ** 0.5, config.beta_end ** 0.5, 1000, dtype=torch.float64) ** 2
            alphas = torch.cumprod(1 - betas, 0)
            noisy = (alphas[t].sqrt() * latents.double() + (1 - alphas[t]).sqrt() * noise.double()).float()
            prediction = pipe.unet(noisy, torch.tensor([t]), hidden).sample
            losses.append(((prediction - noise) ** 2).mean().item())
    return float(np.mean(losses))


def train(tiny_pipeline_dir, tmp_path, out_name, *extra, steps=4):
    data, held_out = tmp_path / "data", tmp_path / "held_out"
    if not data.exists():
        data.mkdir()
        held_out.mkdir()
        write_captioned_folder(data, count=6, size=(32, 32), seed=1)
        write_captioned_folder(held_out, count=3, size=(32, 32), seed=2, caption="held out thing {i}")
    out = tmp_path / out_name
    run_main_in_process(train_text_to_image, [
        "--pretrained_model_name_or_path", tiny_pipeline_dir, "--train_data_dir", data, "--resolution", "32",
        "--center_crop", "--train_batch_size", "2", "--max_train_steps", str(steps), "--learning_rate", "3e-2",
        "--lr_warmup_steps", "0", "--validation_steps", "1", "--checkpointing_steps", "1", "--report_to", "none",
        "--seed", "3", "--output_dir", out, *extra])
    return str(out), str(held_out)


def test_held_out_noise_and_timesteps_are_per_sample():
    from utils.sd.validation import held_out_noise, held_out_timestep

    timesteps = [held_out_timestep(i, 1000) for i in range(200)]
    assert min(timesteps) >= 0 and max(timesteps) < 1000
    assert np.histogram(timesteps, bins=10, range=(0, 1000))[0].min() >= 18  # spread evenly, not clumped
    assert torch.equal(held_out_noise(5, 7, (4, 2, 2)), held_out_noise(5, 7, (4, 2, 2)))
    assert not torch.equal(held_out_noise(5, 7, (4, 2, 2)), held_out_noise(5, 8, (4, 2, 2)))
    state = torch.get_rng_state()
    held_out_noise(5, 7, (4, 2, 2))
    assert torch.equal(state, torch.get_rng_state())  # the global generator is never drawn from


@pytest.mark.slow
def test_val_loss_matches_a_recomputation_and_best_holds_the_lowest(tiny_pipeline_dir, tmp_path):
    out, held_out = train(tiny_pipeline_dir, tmp_path, "run", "--validation_split", str(tmp_path / "held_out"))
    val = metric_series(out, "val/loss")
    assert sorted(val) == [1, 2, 3, 4]  # every --validation_steps, and at the end
    np.testing.assert_allclose(val[4], recomputed_val_loss(out, held_out, seed=3), rtol=1e-4)
    best_step = min(val, key=val.get)
    best = unet_weights(os.path.join(out, "best"))
    assert_same_weights(best, unet_weights(out if best_step == 4 else os.path.join(out, f"checkpoint-{best_step}")))
    np.testing.assert_allclose(val[best_step], recomputed_val_loss(os.path.join(out, "best"), held_out, seed=3),
                               rtol=1e-4)
    assert metric_series(out, "val/best_loss")[4] == pytest.approx(val[best_step])
    with open(os.path.join(out, "checkpoint-4", "training_state.json"), encoding="utf-8") as handle:
        assert json.load(handle)["best_validation_loss"] == pytest.approx(min(val[s] for s in (1, 2, 3)))


@pytest.mark.slow
def test_early_stopping_stops_keeps_best_and_resumes_its_count(tiny_pipeline_dir, tmp_path):
    # min_delta 1e9: only the first validation can count as better, so patience 2 stops at step 3.
    flags = ["--validation_split", "0.34", "--early_stopping_patience", "2", "--early_stopping_min_delta", "1e9"]
    out, _ = train(tiny_pipeline_dir, tmp_path, "stop", *flags, steps=8)
    assert sorted(metric_series(out, "val/loss")) == [1, 2, 3]
    assert os.path.isdir(os.path.join(out, "checkpoint-3")) and not os.path.exists(os.path.join(out, "checkpoint-4"))
    assert_same_weights(unet_weights(os.path.join(out, "best")), unet_weights(os.path.join(out, "checkpoint-1")))
    assert_same_weights(unet_weights(out), unet_weights(os.path.join(out, "checkpoint-3")))  # final = last weights

    # Resuming from checkpoint-2 (one validation without improvement so far) stops at step 3 again, with the
    # same weights: the count came back from the checkpoint (without it the run would go on to step 4).
    resumed = tmp_path / "resumed"
    shutil.copytree(os.path.join(out, "checkpoint-2"), resumed / "checkpoint-2")
    out2, _ = train(tiny_pipeline_dir, tmp_path, "resumed", *flags, "--resume_from_checkpoint", "latest", steps=8)
    assert not os.path.exists(os.path.join(out2, "checkpoint-4"))
    assert_same_weights(unet_weights(out2), unet_weights(out))


@pytest.mark.slow
def test_val_loss_is_the_same_from_the_caches(tiny_pipeline_dir, tmp_path):
    plain, _ = train(tiny_pipeline_dir, tmp_path, "plain", "--validation_split", "0.34", steps=2)
    cached, _ = train(tiny_pipeline_dir, tmp_path, "cached", "--validation_split", "0.34", "--precompute", steps=2)
    a, b = metric_series(plain, "val/loss"), metric_series(cached, "val/loss")
    assert sorted(a) == sorted(b) == [1, 2]
    np.testing.assert_allclose([b[1], b[2]], [a[1], a[2]], rtol=1e-5)


def test_bad_validation_flags_are_refused(tiny_pipeline_dir, tmp_path):
    data = write_captioned_folder(tmp_path, count=2, size=(32, 32))
    base = ["--pretrained_model_name_or_path", tiny_pipeline_dir, "--train_data_dir", data,
            "--output_dir", str(tmp_path / "o")]
    with pytest.raises(UserError, match="--early_stopping_patience needs --validation_split"):
        train_text_to_image.parse_args(base + ["--early_stopping_patience", "2"])
    with pytest.raises(SystemExit):  # argparse: not a fraction in (0, 1)
        train_text_to_image.parse_args(base + ["--validation_split", "1.5"])
    args = train_text_to_image.parse_args(base + ["--validation_split", str(tmp_path / "missing")])
    from utils.sd.data import load_text_image_dataset, split_held_out

    with pytest.raises(UserError, match="--validation_split .*missing: no such folder or file"):
        split_held_out(args, load_text_image_dataset(args))


def test_val_loss_is_the_same_for_any_process_count_and_batch_size(tiny_pipeline_dir, tmp_path):
    """held_out_loss on 2 ranks (the all-reduce simulated by adding the ranks' sums) = on 1 rank, batch 1 = 3."""
    import types

    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from utils.families.sd import StableDiffusion
    from utils.sd.data import TextImageSettings, build_held_out_dataset, collate_text_image, load_text_image_dataset
    from utils.sd.validation import held_out_loss

    data = write_captioned_folder(tmp_path, count=5, size=(32, 32), seed=4)
    args = train_text_to_image.parse_args(["--pretrained_model_name_or_path", tiny_pipeline_dir, "--train_data_dir",
                                           data, "--resolution", "32", "--validation_split", data, "--output_dir",
                                           str(tmp_path / "o")])
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    models = dict(unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder,
                  noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config))
    held_out = build_held_out_dataset(TextImageSettings.from_args(args), load_text_image_dataset(args), pipe.tokenizer)

    def loss(rank, processes, batch_size, sums):
        def reduce(tensor, reduction):
            sums.append(tensor.item())
            return tensor
        accelerator = types.SimpleNamespace(distributed_type="NO", process_index=rank, num_processes=processes,
                                            device=torch.device("cpu"), unwrap_model=lambda m: m, reduce=reduce,
                                            autocast=lambda: torch.autocast("cpu", enabled=False))
        return held_out_loss(StableDiffusion(), accelerator, models, held_out, collate_text_image, batch_size, seed=3)

    one_rank = loss(0, 1, 3, [])
    assert one_rank == pytest.approx(loss(0, 1, 1, []), rel=1e-6)
    sums = []
    for rank in (0, 1):  # each rank's (total, count), as the all-reduce would receive them
        loss(rank, 2, 2, sums)
    (total0, count0), (total1, count1) = sums[:2], sums[2:]
    assert count0 + count1 == 5 and (count0, count1) == (3, 2)
    assert (total0 + total1) / (count0 + count1) == pytest.approx(one_rank, rel=1e-6)


def test_validation_images_are_drawn_without_autograd(monkeypatch):
    """log_validation samples under torch.no_grad (it once lost the decorator to a helper inserted above it)."""
    import types

    from utils.sd import validation

    seen = []

    class Stop(Exception):
        pass

    from utils.families.base import Family as Base

    class Family(Base):  # (the interface's defaults, one pipeline that records and stops)
        denoiser = "unet"

        def pipeline(self, components, scheduler=None):
            seen.append(torch.is_grad_enabled())
            raise Stop
    unet = torch.nn.Linear(2, 2)
    models = {"unet": unet, "vae": None, "text_encoder": None, "tokenizer": None,
              "noise_scheduler": types.SimpleNamespace(config={"num_train_timesteps": 1000})}
    from utils.cache import CacheSettings

    settings = validation.ValidationSettings(("a cat",), None, 1, "DPMSolverMultistepScheduler", 2, 7.5, 32, 0, ".", 4,
                                             CacheSettings(False, False, None, 4))
    accelerator = types.SimpleNamespace(unwrap_model=lambda m: m)
    with pytest.raises(Stop):
        validation.log_validation(settings, Family(), accelerator, models, None, 1)
    assert seen == [False]
