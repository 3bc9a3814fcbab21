"""utils/optim.py, utils/metrics.py, utils/latents.py: the shared optimizer builder, schedule and conventions."""

import math

import pytest
import torch

from utils.latents import decode_latents, encode_latents, scale_latents, vae_scale_and_shift
from utils.metrics import psnr
from utils.optim import create_optimizer, warmup_cosine


def test_warmup_cosine_warms_up_decays_to_the_floor_and_holds_it():
    factor = warmup_cosine(warmup_steps=4, total_steps=14, min_ratio=0.1)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(4) == pytest.approx(1.0) and factor(9) == pytest.approx(0.1 + 0.9 * 0.5)
    assert factor(14) == pytest.approx(0.1) and factor(100) == pytest.approx(0.1)
    assert warmup_cosine(2, 10, 0.1, cosine=False)(7) == 1.0


@pytest.mark.parametrize("name, cls", [("adamw", torch.optim.AdamW), ("adagrad", torch.optim.Adagrad)])
def test_create_optimizer_builds_fused_torch_optimizers_on_cpu(name, cls):
    parameter = torch.nn.Parameter(torch.ones(3))
    optimizer = create_optimizer(name, [parameter], "cpu", lr=0.1, weight_decay=0.01)
    assert type(optimizer) is cls and optimizer.defaults["fused"] and optimizer.defaults["lr"] == 0.1
    if name == "adagrad":  # Adagrad keeps its own eps default (1e-10), AdamW gets ours
        assert optimizer.defaults["eps"] == 1e-10
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        create_optimizer("sgd", [parameter], "cpu")


def test_psnr_in_both_ranges_matches_the_formula():
    target = torch.zeros(2, 3, 4, 4)
    prediction = target + torch.tensor([0.1, 0.2]).view(2, 1, 1, 1)
    expected = [10 * math.log10(1 / 0.01), 10 * math.log10(1 / 0.04)]
    assert psnr(prediction, target).tolist() == pytest.approx(expected, rel=1e-5)
    # [-1, 1]: peak-to-peak 2, and a prediction beyond the range is clamped first
    assert psnr(prediction * 2 - 1, target * 2 - 1, value_range=(-1.0, 1.0)).tolist() == pytest.approx(expected, rel=1e-5)
    assert psnr(torch.full((1, 1, 2, 2), 3.0), torch.ones(1, 1, 2, 2), (-1.0, 1.0)).item() == pytest.approx(10 * math.log10(4 / 1e-10))


def test_latents_use_scale_and_shift_both_ways(tiny_pipeline_dir):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_pipeline_dir, subfolder="vae")
    vae.register_to_config(scaling_factor=0.5, shift_factor=0.25)
    assert vae_scale_and_shift(vae) == (0.5, 0.25) and vae_scale_and_shift(vae.config) == (0.5, 0.25)
    raw = torch.randn(1, 4, 4, 4)
    assert torch.equal(scale_latents(raw, vae.config), (raw - 0.25) * 0.5)
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    mode = vae.encode(images).latent_dist.mode()
    assert torch.equal(encode_latents(vae, images, sample=False), (mode - 0.25) * 0.5)
    generator = torch.Generator().manual_seed(0)
    sample = vae.encode(images).latent_dist.sample(torch.Generator().manual_seed(0))
    assert torch.equal(encode_latents(vae, images, generator), (sample - 0.25) * 0.5)
    latents = scale_latents(mode, vae.config)
    assert torch.equal(decode_latents(vae, latents), vae.decode(latents / 0.5 + 0.25).sample.float())
