"""Image-quality metrics shared by the scripts (domain metrics live in utils/<domain>/metrics.py)."""

from __future__ import annotations

import torch


def psnr(prediction: torch.Tensor, target: torch.Tensor, value_range: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """PSNR in dB per image, [B] for [B, C, H, W] tensors whose values lie in `value_range`: [0, 1] for
    images, (-1, 1) for VAE reconstructions (peak-to-peak 2). The prediction is clamped to the range."""
    low, high = value_range
    mse = (prediction.float().clamp(low, high) - target.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10((high - low) ** 2 / mse)
