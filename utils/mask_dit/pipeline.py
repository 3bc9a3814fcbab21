"""The mask DiT pipeline: encoders (VAE, caption encoder), pipeline folder I/O, sampling from a mask,
and the comparison tiles of validation grids.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from utils.errors import UserError
from utils.latents import decode_latents
from utils.mask_dit.flow_matching import guided_velocity, sample_ode
from utils.mask_dit.nextdit import (MASK_DIT_CONFIG_NAME, MaskNextDiT2DModel,  # noqa: F401  (re-exported)
                                    is_mask_dit_dir)
from utils.text_encoders import load_text_encoder


def caption_width(text_encoder) -> int:
    config = text_encoder.config
    return getattr(config, "hidden_size", None) or getattr(config, "d_model")


@torch.no_grad()
def encode_captions(tokenizer, text_encoder, captions: list[str], max_length: int, hidden_layer: int = -1):
    """Caption tokens [B, S, D] and their attention mask [B, S] (1 = token).

    hidden_layer -1 is the encoder's last hidden state; other values index `hidden_states`
    (Lumina-Next reads Gemma's -2).
    """
    device = next(text_encoder.parameters()).device
    tokens = tokenizer(
        list(captions), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    )
    input_ids, attention_mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
    outputs = text_encoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=hidden_layer != -1)
    hidden = outputs.last_hidden_state if hidden_layer == -1 else outputs.hidden_states[hidden_layer]
    return hidden, attention_mask


def load_vae(path: str):
    from diffusers import AutoencoderKL

    subfolder = "vae" if os.path.isfile(os.path.join(path, "vae", "config.json")) else None
    vae = AutoencoderKL.from_pretrained(path, subfolder=subfolder)
    vae.requires_grad_(False).eval()
    return vae


@dataclass
class MaskDiTPipeline:
    """Everything generation needs; `settings` is the content of mask_dit_config.json."""

    transformer: MaskNextDiT2DModel
    vae: object | None = None
    tokenizer: object | None = None
    text_encoder: object | None = None
    settings: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def downsample(self) -> int:
        """Pixels per model-grid cell (the VAE's factor in latent space, 1 in pixel space)."""
        return int(self.settings.get("vae_downsample", 1)) if self.vae is not None else 1


def save_mask_dit_pipeline(output_dir: str, pipeline: MaskDiTPipeline) -> None:
    """Write the folder layout described in the module docstring."""
    os.makedirs(output_dir, exist_ok=True)
    pipeline.transformer.save_pretrained(os.path.join(output_dir, "transformer"), safe_serialization=True)
    if pipeline.vae is not None:
        pipeline.vae.save_pretrained(os.path.join(output_dir, "vae"))
    if pipeline.text_encoder is not None:
        pipeline.tokenizer.save_pretrained(os.path.join(output_dir, "tokenizer"))
        pipeline.text_encoder.save_pretrained(os.path.join(output_dir, "text_encoder"))
    settings = {"_class_name": "MaskDiTPipeline", **pipeline.settings}
    with open(os.path.join(output_dir, MASK_DIT_CONFIG_NAME), "w", encoding="utf-8") as handle:
        json.dump(settings, handle, indent=2, sort_keys=True)


def load_mask_dit_pipeline(model_dir: str, device: str | torch.device | None = None,
                           dtype: torch.dtype | None = None) -> MaskDiTPipeline:
    """Load a folder written by train_mask_dit.py (see `is_mask_dit_dir`)."""
    if not is_mask_dit_dir(model_dir):
        raise UserError(f"{model_dir} is not a mask DiT folder (no {MASK_DIT_CONFIG_NAME} or transformer/ of our class)")
    settings_file = os.path.join(model_dir, MASK_DIT_CONFIG_NAME)
    settings = {}
    if os.path.isfile(settings_file):
        with open(settings_file, encoding="utf-8") as handle:
            settings = json.load(handle)
    transformer = MaskNextDiT2DModel.from_pretrained(os.path.join(model_dir, "transformer"))
    vae = load_vae(os.path.join(model_dir, "vae")) if os.path.isdir(os.path.join(model_dir, "vae")) else None
    tokenizer = text_encoder = None
    if os.path.isdir(os.path.join(model_dir, "text_encoder")):
        tokenizer, text_encoder = load_text_encoder(model_dir)
    settings.setdefault("resolution", transformer.config.sample_size * (settings.get("vae_downsample", 1) if vae else 1))
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for module in (transformer, vae, text_encoder):
        if module is not None:
            module.to(device=device, dtype=dtype) if dtype is not None else module.to(device)
            module.eval()
    return MaskDiTPipeline(transformer, vae, tokenizer, text_encoder, settings)


@torch.no_grad()
def generate_from_mask(
    pipeline: MaskDiTPipeline,
    mask: torch.Tensor,
    prompt: list[str] | str | None = None,
    steps: int = 30,
    guidance_scale: float = 4.0,
    mask_guidance_scale: float = 1.0,
    seed: int | None = 0,
    sampler: str = "euler",
    time_shift: float | None = None,
    height: int | None = None,
    width: int | None = None,
) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1] that follow `mask`.

    mask: [B, mask_channels, h, w] in [0, 1] (any size; resized to the model grid).
    prompt: captions (one per mask, or one string for all) for a caption model; None = "".
    guidance_scale: caption CFG scale; mask_guidance_scale: mask CFG scale (1 = plain conditional).
    H, W: `height` / `width`, default the training resolution (multiples of patch_size x VAE factor).
    seed: initial noise drawn on the CPU from this seed (the same images on any device).
    """
    transformer = pipeline.transformer
    config = transformer.config
    device, dtype = pipeline.device, next(transformer.parameters()).dtype
    batch = mask.shape[0]
    height = height or int(pipeline.settings.get("resolution", mask.shape[-2]))
    width = width or int(pipeline.settings.get("resolution", mask.shape[-1]))
    grid = config.patch_size * pipeline.downsample
    if height % grid or width % grid:
        raise UserError(f"height/width {height}x{width} must be multiples of {grid} (patch size x VAE factor)")
    grid_h, grid_w = height // pipeline.downsample, width // pipeline.downsample
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    # The ODE state and the times stay float32 (bf16 would quantise t); only the model runs in `dtype`.
    noise = torch.randn(batch, config.in_channels, grid_h, grid_w, generator=generator).to(device)
    mask_input = transformer.prepare_mask(mask.to(device), noise.to(dtype))
    null_mask = transformer.prepare_mask(None, noise.to(dtype))

    caption = caption_mask = null_caption = null_caption_mask = None
    use_caption = pipeline.text_encoder is not None
    if use_caption:
        prompts = [prompt] * batch if isinstance(prompt, str) else list(prompt or [""] * batch)
        if len(prompts) != batch:
            raise UserError(f"{len(prompts)} prompts for {batch} masks; give one prompt per mask or a single string")
        max_length = int(pipeline.settings.get("max_caption_length", 77))
        layer = int(pipeline.settings.get("caption_hidden_layer", -1))
        caption, caption_mask = encode_captions(pipeline.tokenizer, pipeline.text_encoder, prompts, max_length, layer)
        null_caption, null_caption_mask = encode_captions(
            pipeline.tokenizer, pipeline.text_encoder, [""] * batch, max_length, layer
        )
        caption, null_caption = caption.to(dtype), null_caption.to(dtype)
    use_caption_cfg = use_caption and prompt is not None and guidance_scale != 1.0
    use_mask_cfg = mask_guidance_scale != 1.0

    def velocity(x, t):
        # One batched forward for all guidance branches: [full | mask-only | unconditional].
        masks, captions, caption_masks = [mask_input], [caption], [caption_mask]
        if use_caption_cfg:
            masks.append(mask_input), captions.append(null_caption), caption_masks.append(null_caption_mask)
        if use_mask_cfg:
            masks.append(null_mask), captions.append(null_caption), caption_masks.append(null_caption_mask)
        branches = len(masks)
        out = transformer(
            x.to(dtype).repeat(branches, 1, 1, 1), t.repeat(branches), torch.cat(masks),
            torch.cat(captions) if use_caption else None,
            torch.cat(caption_masks) if use_caption else None,
            mask_is_prepared=True,
        ).float().chunk(branches)
        full = out[0]
        mask_only = out[1] if use_caption_cfg else full
        if not use_mask_cfg:
            return guided_velocity(mask_only, mask_only, full if use_caption_cfg else None, 1.0, guidance_scale)
        return guided_velocity(out[-1], mask_only, full if use_caption_cfg else None, mask_guidance_scale, guidance_scale)

    shift = time_shift if time_shift is not None else float(pipeline.settings.get("time_shift", 1.0))
    sample = sample_ode(velocity, noise, steps, sampler, shift)
    images = decode_latents(pipeline.vae, sample) if pipeline.vae is not None else sample.float()
    return ((images + 1) / 2).clamp(0, 1)


MASK_COLORS = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.85, 0.2], [0.3, 0.8, 1.0], [1.0, 0.3, 0.3], [0.4, 1.0, 0.4]])


def mask_to_rgb(mask: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] in [0, 1] -> [B, 3, H, W]: channel k drawn in colour k (white, yellow, blue, ...)."""
    colors = MASK_COLORS[torch.arange(mask.shape[1]) % len(MASK_COLORS)].to(mask.device)
    rgb = torch.zeros(mask.shape[0], 3, *mask.shape[-2:], device=mask.device)
    for channel in range(mask.shape[1]):
        rgb = torch.maximum(rgb, mask[:, channel : channel + 1].float() * colors[channel].view(1, 3, 1, 1))
    return rgb


def comparison_tiles(mask: torch.Tensor, ground_truth: torch.Tensor | None, samples: torch.Tensor) -> list[Image.Image]:
    """Row-major tiles (mask | ground truth | sample) for `utils.images.make_grid(tiles, columns=3)`.

    mask [B, C, H, W] in [0, 1]; ground_truth / samples [B, 3, H, W] in [0, 1] (ground truth may be None).
    """
    size = samples.shape[-2:]
    mask_rgb = F.interpolate(mask_to_rgb(mask.float()), size=size, mode="nearest")
    tiles = []
    for index in range(samples.shape[0]):
        row = [mask_rgb[index]] + ([ground_truth[index]] if ground_truth is not None else []) + [samples[index]]
        for tile in row:
            array = (tile.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
            tiles.append(Image.fromarray(array))
    return tiles
