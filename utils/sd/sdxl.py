"""Stable Diffusion XL in train_text_to_image.py (which model is SDXL: utils/sd/model_kind.py): the prompt embeddings of
its two text encoders, and the added time ids (original size, crop top-left, target size), as diffusers'
`StableDiffusionXLPipeline` and `examples/text_to_image/train_text_to_image*_sdxl.py` compute them."""

from __future__ import annotations

import torch

from utils.latents import vae_scale_factor


def encode_prompt(text_encoders, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [B, 2, L] (one row per tokenizer, on the encoders' device) -> (prompt_embeds [B, L, D1 + D2]: both encoders' penultimate
    hidden states, pooled_prompt_embeds [B, P]: the second encoder's projected output), as SDXL's pipeline does.
    `attention_mask` [B, 2, L]: --text_encoder_use_attention_mask (None: none, as SDXL's pipeline)."""
    hidden, pooled = [], None
    for index, text_encoder in enumerate(text_encoders):
        mask = attention_mask[:, index] if attention_mask is not None else None
        output = text_encoder(input_ids[:, index], attention_mask=mask, output_hidden_states=True)
        pooled = output[0]
        hidden.append(output.hidden_states[-2])
    return torch.cat(hidden, dim=-1), pooled


def add_time_ids(original_size: torch.Tensor, crop_top_left: torch.Tensor, target_size: tuple[int, int],
                 dtype, device) -> torch.Tensor:
    """[B, 6]: (original height, width, crop top, left, target height, width) per sample."""
    target = torch.tensor(target_size, dtype=torch.long).expand(original_size.shape[0], 2)
    ids = torch.cat([original_size.long().cpu(), crop_top_left.long().cpu(), target], dim=1)
    return ids.to(device=device, dtype=dtype)


def unet_conditioning(models: dict, batch: dict, latents: torch.Tensor, device) -> tuple[torch.Tensor, dict | None]:
    """The UNet's text conditioning for a batch: (encoder_hidden_states, added_cond_kwargs). SD: the text encoder's
    last hidden state, no added conditions. SDXL: both encoders' penultimate hidden states and the pooled prompt
    (from the batch when the text cache supplied them) plus the time ids, whose target size is the batch's own
    (latent size x the VAE factor)."""
    sdxl = models.get("text_encoder_2") is not None
    pooled = batch.get("pooled_prompt_embeds")
    mask = batch["attention_mask"].to(device) if "attention_mask" in batch else None  # text_encoder_use_attention_mask
    if "encoder_hidden_states" in batch:
        hidden = batch["encoder_hidden_states"].to(device)
    elif sdxl:
        encoders = [models["text_encoder"], models["text_encoder_2"]]
        hidden, pooled = encode_prompt(encoders, batch["input_ids"].to(device), mask)
    else:
        hidden = models["text_encoder"](batch["input_ids"].to(device), attention_mask=mask, return_dict=False)[0]
    if not sdxl:
        return hidden, None
    factor = vae_scale_factor(models["vae"].config)
    time_ids = add_time_ids(batch["original_size"], batch["crop_top_left"],
                            (latents.shape[-2] * factor, latents.shape[-1] * factor), hidden.dtype, device)
    return hidden, {"text_embeds": pooled.to(device), "time_ids": time_ids}
