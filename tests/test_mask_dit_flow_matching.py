"""utils/mask_dit/flow_matching.py: timestep sampling, interpolation, weights, time shift, ODE samplers, CFG."""

import math

import pytest
import torch

from utils.mask_dit.flow_matching import (flow_matching_loss, guided_velocity, interpolate, loss_weights, sample_ode,
                                          sample_timesteps, shift_time, time_grid)


@pytest.mark.parametrize("scheme", ["uniform", "logit_normal", "mode"])
def test_timesteps_are_in_unit_interval_and_seeded(scheme):
    a = sample_timesteps(4096, scheme, generator=torch.Generator().manual_seed(0))
    b = sample_timesteps(4096, scheme, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    assert abs(a.mean().item() - 0.5) < 0.03  # all three are symmetric around 0.5 by default


def test_logit_normal_mean_moves_mass_towards_noise():
    # SD3's logit_mean > 0 puts more samples at high sigma, i.e. low t (closer to noise) in our convention.
    t = sample_timesteps(8192, "logit_normal", logit_mean=1.0, generator=torch.Generator().manual_seed(0))
    assert t.mean() < 0.35


def test_mode_sampling_with_zero_scale_is_uniform_and_scale_concentrates():
    u = sample_timesteps(8192, "mode", mode_scale=0.0, generator=torch.Generator().manual_seed(0))
    assert abs(u.std().item() - math.sqrt(1 / 12)) < 0.01
    peaked = sample_timesteps(8192, "mode", mode_scale=1.29, generator=torch.Generator().manual_seed(0))
    assert peaked.std() < u.std()


def test_unknown_scheme_names_the_flag():
    with pytest.raises(ValueError, match="--timestep_sampling"):
        sample_timesteps(2, "cosine")


def test_interpolate_endpoints_and_target():
    x, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    x_t, target = interpolate(x, noise, torch.tensor([1.0, 0.0, 0.25]))
    assert torch.equal(x_t[0], x[0]) and torch.equal(x_t[1], noise[1])
    torch.testing.assert_close(x_t[2], 0.25 * x[2] + 0.75 * noise[2])
    torch.testing.assert_close(target, x - noise)


def test_loss_weights():
    t = torch.tensor([0.0, 0.5, 0.9, 1.0])
    assert torch.equal(loss_weights(t, "uniform"), torch.ones(4))
    sigma_sqrt = loss_weights(t, "sigma_sqrt", max_weight=50.0)
    torch.testing.assert_close(sigma_sqrt[:3], torch.tensor([1.0, 4.0, 50.0]))  # 0.1^-2 = 100 clipped to 50
    cosmap = loss_weights(t, "cosmap")
    torch.testing.assert_close(cosmap[1], torch.tensor(4 / math.pi))  # peak at sigma = 0.5
    with pytest.raises(ValueError, match="--loss_weighting"):
        loss_weights(t, "snr")


def test_flow_matching_loss_is_weighted_mse():
    prediction, target = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    assert flow_matching_loss(prediction, target, torch.tensor([1.0, 3.0])).item() == pytest.approx(2.0)


def test_shift_time_matches_sd3_sigma_shift():
    t = torch.linspace(0, 1, 11)
    shift = 3.0
    sigma = 1 - t
    sd3 = shift * sigma / (1 + (shift - 1) * sigma)
    torch.testing.assert_close(shift_time(t, shift), 1 - sd3)
    torch.testing.assert_close(shift_time(t, 1.0), t)
    grid = time_grid(10, shift)
    assert grid[0] == 0 and grid[-1] == 1 and (grid.diff() > 0).all()
    assert grid[5] < 0.5  # shift > 1 spends more steps near noise


@pytest.mark.parametrize("sampler", ["euler", "midpoint"])
def test_samplers_transport_noise_to_a_known_data_point(sampler):
    # With one data point x*, the exact flow-matching velocity is (x* - x) / (1 - t); any first-order
    # scheme on this straight path lands exactly on x*.
    data = torch.randn(2, 3, 4, 4)

    def velocity(x, t):
        return (data - x) / (1 - t).clamp_min(1e-6).view(-1, 1, 1, 1)

    out = sample_ode(velocity, torch.randn(2, 3, 4, 4), num_steps=5, sampler=sampler, shift=2.0)
    torch.testing.assert_close(out, data, atol=1e-4, rtol=1e-4)


def test_midpoint_is_second_order():
    # dx/dt = x from x(0) = 1 gives e at t = 1.
    def velocity(x, t):
        return x

    start = torch.ones(1)
    euler = sample_ode(velocity, start, num_steps=10, sampler="euler")
    midpoint = sample_ode(velocity, start, num_steps=10, sampler="midpoint")
    assert abs(midpoint.item() - math.e) < 0.01 < abs(euler.item() - math.e)


def test_guided_velocity():
    uncond, mask_only, full = torch.tensor(1.0), torch.tensor(2.0), torch.tensor(4.0)
    assert guided_velocity(uncond, mask_only, None, 3.0) == 1 + 3 * (2 - 1)
    assert guided_velocity(uncond, mask_only, full, 1.5, 2.0) == 1 + 1.5 * 1 + 2.0 * 2
    assert guided_velocity(uncond, mask_only, full, 1.0, 1.0) == full  # no guidance: the full conditional
