"""VAE latents in model space, one convention for every script: `(latents - shift_factor) * scaling_factor`.

SD 1.x/2.x VAEs have no shift (0); SD3/Flux-style VAEs do. Used by the text-to-image loss, its
latent cache, the mask DiT and the kanji demo's evaluation.
"""

from __future__ import annotations

import torch


def vae_scale_and_shift(vae_config) -> tuple[float, float]:
    """(scaling_factor, shift_factor) of a VAE config (or of a VAE)."""
    config = getattr(vae_config, "config", vae_config)
    return float(config.scaling_factor), float(getattr(config, "shift_factor", None) or 0.0)


def vae_scale_factor(vae_config) -> int:
    """How much the VAE downsamples each side: 2 per down block after the first."""
    return 2 ** (len(getattr(vae_config, "config", vae_config).block_out_channels) - 1)


def scale_latents(latents: torch.Tensor, vae_config) -> torch.Tensor:
    """Raw VAE latents -> model-space latents."""
    scale, shift = vae_scale_and_shift(vae_config)
    return (latents - shift) * scale


def encode_latents(vae, pixel_values: torch.Tensor, generator: torch.Generator | None = None,
                   sample: bool = True) -> torch.Tensor:
    """Images [B, 3, H, W] in [-1, 1] -> model-space latents [B, C, H/f, W/f]: a sample of the latent
    distribution (drawn with `generator`), or its mode with sample=False."""
    distribution = vae.encode(pixel_values.to(vae.dtype)).latent_dist
    return scale_latents(distribution.sample(generator) if sample else distribution.mode(), vae.config)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Model-space latents -> images [B, 3, H, W] (float32, the VAE's range [-1, 1])."""
    scale, shift = vae_scale_and_shift(vae.config)
    return vae.decode((latents / scale + shift).to(vae.dtype)).sample.float()
