"""Flow matching in the Lumina convention: timestep sampling, loss weights, ODE samplers, CFG.

Convention (Lumina-Next / the original NextDiT repo): t in [0, 1], t = 0 is pure noise and
t = 1 is data,

    x_t = t * x + (1 - t) * noise,        velocity target v = x - noise,

and sampling integrates dx/dt = v(x_t, t) from t = 0 (noise) to t = 1. SD3 / diffusers use the
mirrored "sigma" = 1 - t (sigma = 1 is noise); the formulas below taken from SD3 are converted.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from utils.errors import UserError

TIMESTEP_SAMPLING = ("uniform", "logit_normal", "mode")
LOSS_WEIGHTING = ("uniform", "sigma_sqrt", "cosmap")
SAMPLERS = ("euler", "midpoint")


def sample_timesteps(
    batch_size: int,
    scheme: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    device=None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Training timesteps t [batch_size] in [0, 1] (1 = data).

    uniform: t ~ U(0, 1).
    logit_normal: sigma = sigmoid(N(logit_mean, logit_std)), t = 1 - sigma (SD3, Esser et al. 2024, eq. 19).
    mode: SD3's "mode sampling with heavy tails" (Esser et al. 2024, eq. 20; the same formula as
        diffusers.training_utils.compute_density_for_timestep_sampling):
        sigma = 1 - u - mode_scale * (cos(pi * u / 2) ** 2 - 1 + u), u ~ U(0, 1); t = 1 - sigma.
    """
    if scheme == "uniform":
        return torch.rand(batch_size, device=device, generator=generator)
    if scheme == "logit_normal":
        normal = torch.randn(batch_size, device=device, generator=generator) * logit_std + logit_mean
        return 1.0 - torch.sigmoid(normal)
    if scheme == "mode":
        u = torch.rand(batch_size, device=device, generator=generator)
        sigma = 1.0 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1.0 + u)
        return (1.0 - sigma).clamp(0.0, 1.0)
    raise UserError(f"--timestep_sampling {scheme!r} is not one of {TIMESTEP_SAMPLING}")


def interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The noisy input x_t = t x + (1 - t) noise and the velocity target x - noise; t [B] broadcast over [B, ...]."""
    t = t.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    return t * x + (1.0 - t) * noise, x - noise


def loss_weights(t: torch.Tensor, scheme: str = "uniform", max_weight: float = 100.0) -> torch.Tensor:
    """Per-sample loss weights [B] for t [B] (1 = data), with sigma = 1 - t.

    uniform: 1 (the guide's "flow_matching, weighting: uniform").
    sigma_sqrt: sigma ** -2, clipped at `max_weight` (SD3's `sigma_sqrt` in diffusers' training_utils).
    cosmap: 2 / (pi * (1 - 2 sigma + 2 sigma^2)) (SD3 paper, section 3.1 "CosMap").
    """
    sigma = (1.0 - t).float()
    if scheme == "uniform":
        return torch.ones_like(sigma)
    if scheme == "sigma_sqrt":
        return sigma.clamp_min(1e-6).pow(-2.0).clamp_max(max_weight)
    if scheme == "cosmap":
        return 2.0 / (math.pi * (1.0 - 2.0 * sigma + 2.0 * sigma**2))
    raise UserError(f"--loss_weighting {scheme!r} is not one of {LOSS_WEIGHTING}")


def flow_matching_loss(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted MSE: mean over samples of weight * mean over pixels of (prediction - target)^2."""
    per_sample = (prediction.float() - target.float()).pow(2).flatten(1).mean(1)
    return (weights * per_sample).mean()


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Resolution time shift: shift > 1 spends more of the schedule near noise.

    SD3's sigma' = shift * sigma / (1 + (shift - 1) * sigma) written for t = 1 - sigma, which is
    Lumina-Next's `t / (t + shift - shift * t)`.
    """
    return t / (t + shift - shift * t)


def time_grid(num_steps: int, shift: float = 1.0, device=None) -> torch.Tensor:
    """num_steps + 1 times from 0 (noise) to 1 (data), shifted."""
    grid = torch.linspace(0.0, 1.0, num_steps + 1, device=device)
    return shift_time(grid, shift) if shift != 1.0 else grid


@torch.no_grad()
def sample_ode(
    velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    num_steps: int = 30,
    sampler: str = "euler",
    shift: float = 1.0,
) -> torch.Tensor:
    """Integrate dx/dt = velocity_fn(x, t) from t = 0 (x = noise) to t = 1; returns x at t = 1.

    velocity_fn gets x [B, ...] and t [B]. Euler costs one call per step, midpoint two
    (second order: the velocity at the step's midpoint).
    """
    if sampler not in SAMPLERS:
        raise UserError(f"sampler {sampler!r} is not one of {SAMPLERS}")
    times = time_grid(num_steps, shift, device=noise.device)
    x = noise
    batch = noise.shape[0]
    for t_now, t_next in zip(times[:-1], times[1:]):
        step = t_next - t_now
        v = velocity_fn(x, t_now.expand(batch))
        if sampler == "midpoint":
            x_mid = x + 0.5 * step * v
            v = velocity_fn(x_mid, (t_now + 0.5 * step).expand(batch))
        x = x + step * v
    return x


def guided_velocity(
    v_uncond: torch.Tensor,
    v_mask: torch.Tensor | None = None,
    v_full: torch.Tensor | None = None,
    mask_guidance_scale: float = 1.0,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """Classifier-free guidance for two conditions (mask, caption), as in InstructPix2Pix:

        v = v_uncond + s_mask * (v_mask - v_uncond) + s_caption * (v_full - v_mask)

    v_uncond: no mask, no caption; v_mask: mask only; v_full: mask and caption (None when there is
    no caption). With only a mask: v = v_uncond + s_mask * (v_mask - v_uncond).
    """
    if v_mask is None:
        return v_uncond
    v = v_uncond + mask_guidance_scale * (v_mask - v_uncond)
    if v_full is not None:
        v = v + guidance_scale * (v_full - v_mask)
    return v
