"""The Stable Diffusion components a run trains: loaded from a pipeline folder or Hub id, or built
fresh from a preset (`utils.sd.builder`) with a tokenizer learned from the captions."""

from __future__ import annotations

import json
import os

from utils.checkpointing import own_memory
from utils.text_encoders import load_text_encoder


def load_models(args, captions_for_tokenizer):
    """tokenizer, text_encoder, vae, unet and noise_scheduler: loaded, or built fresh from a preset."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if args.pretrained_model_name_or_path:
        path, rev = args.pretrained_model_name_or_path, args.revision
        models = dict(
            noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler"),
            tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=rev),
            text_encoder=own_memory(CLIPTextModel.from_pretrained(path, subfolder="text_encoder", revision=rev,
                                                                  variant=args.variant)),
            vae=own_memory(AutoencoderKL.from_pretrained(path, subfolder="vae", revision=rev, variant=args.variant)),
            unet=own_memory(UNet2DConditionModel.from_pretrained(path, subfolder="unet", revision=args.non_ema_revision)),
        )
    else:
        from utils.sd.builder import build_components

        read_json = lambda p: json.load(open(p, encoding="utf-8")) if p else None  # noqa: E731
        tokenizer = text_encoder = None
        if args.text_encoder_name_or_path:
            tokenizer, text_encoder = load_text_encoder(args.text_encoder_name_or_path, clip_only=True, frozen=False)
        components = build_components(args.model_preset, texts=captions_for_tokenizer, resolution=args.resolution,
                                      seed=args.seed or 0, unet_config=read_json(args.unet_config),
                                      vae_config=read_json(args.vae_config), tokenizer=tokenizer,
                                      tokenizer_dir=os.path.join(args.output_dir, "tokenizer"))
        if text_encoder is not None:
            components["text_encoder"] = text_encoder
        models = dict(noise_scheduler=components.pop("scheduler"), **components)
    if args.prediction_type is not None:
        models["noise_scheduler"].register_to_config(prediction_type=args.prediction_type)
    return models
