"""Stable Diffusion: model builder, data, caches, LoRA, the VAE stage, schedulers, the kanji dataset."""
