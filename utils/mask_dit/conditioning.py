"""Mask DiT model inputs from a batch: the target (latents or pixels), the mask with its CFG dropout, and
the caption tokens with theirs. Cached batches (--cache_latents / --cache_text_embeddings) give the same
inputs from the same random numbers."""

from __future__ import annotations

import torch

from utils.cache import sample_cached_latents
from utils.latents import encode_latents
from utils.mask_dit.pipeline import encode_captions


class Conditioner:
    """Turns a batch into model inputs: latents (or pixels), masks and caption tokens, with CFG dropout.

    Batches from the caches (--cache_latents / --cache_text_embeddings) carry the latent distribution
    and the caption embeddings instead; they use the same random numbers, so the inputs are the same.
    `empty_caption`: the cached (embedding [S, D], attention mask [S]) of "" for caption dropout.
    """

    def __init__(self, args, vae, tokenizer, text_encoder, empty_caption=None):
        self.args, self.vae, self.tokenizer, self.text_encoder = args, vae, tokenizer, text_encoder
        self.empty_caption = empty_caption

    def __call__(self, batch, generator, train: bool = True):
        mask, captions = batch["mask"], list(batch["captions"])
        batch_size, device = mask.shape[0], mask.device
        if "latent_mean" in batch:
            target = sample_cached_latents(batch, self.vae.config, generator).float()
        elif self.vae is not None:
            target = encode_latents(self.vae, batch["pixel_values"], generator).float()
        else:
            target = batch["pixel_values"].float()
        mask_keep = torch.ones(batch_size, device=device)
        if train and self.args.mask_dropout_prob > 0:
            mask_keep = (
                torch.rand(batch_size, generator=generator, device=device) >= self.args.mask_dropout_prob
            ).float()
        caption = caption_mask = None
        if self.text_encoder is not None:
            drop = None
            if train and self.args.caption_dropout_prob > 0:
                drop = torch.rand(batch_size, generator=generator, device=device) < self.args.caption_dropout_prob
            if "caption_embedding" in batch:
                caption, caption_mask = batch["caption_embedding"], batch["caption_mask"]
                if drop is not None:
                    empty, empty_mask = self.empty_caption
                    caption = torch.where(drop[:, None, None], empty, caption)
                    caption_mask = torch.where(drop[:, None], empty_mask, caption_mask)
            else:
                if drop is not None:
                    captions = ["" if d else c for d, c in zip(drop.tolist(), captions)]
                caption, caption_mask = encode_captions(self.tokenizer, self.text_encoder, captions,
                                                        self.args.max_caption_length, self.args.caption_hidden_layer)
            caption = caption.float()
        return target, mask, mask_keep, caption, caption_mask
