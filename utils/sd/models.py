"""The Stable Diffusion components a run trains: loaded from a pipeline folder or Hub id, or built
fresh from a preset (`utils.sd.builder`) with a tokenizer learned from the captions."""

from __future__ import annotations

import json
import os

from utils.checkpointing import own_memory
from utils.errors import UserError, UserFileNotFoundError
from utils.sd.model_kind import is_single_file
from utils.sd.single_file import load_single_file_pipeline
from utils.text_encoders import load_text_encoder


def check_pipeline_folder(path: str, sdxl: bool = False) -> None:
    """A local --pretrained_model_name_or_path must be a Stable Diffusion pipeline folder (a Hub id is left to the Hub)."""
    if not os.path.isdir(path):
        if os.path.exists(path) or path.startswith((".", "/")) or path.count("/") > 1:
            raise UserFileNotFoundError(f"--pretrained_model_name_or_path {path}: no such pipeline folder (give a "
                                        "folder with model_index.json, or a Hub id such as "
                                        "stable-diffusion-v1-5/stable-diffusion-v1-5)")
        return
    from utils.mask_dit.nextdit import is_mask_dit_dir

    if is_mask_dit_dir(path):
        raise UserError(f"--pretrained_model_name_or_path {path} is a mask DiT (train_mask_dit.py's output), not a "
                        "Stable Diffusion pipeline: fine-tune it with train_mask_dit.py --pretrained_model_name_or_path.")
    names = ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler")
    missing = [name for name in names + (("text_encoder_2", "tokenizer_2") if sdxl else ())
               if not os.path.exists(os.path.join(path, name))]
    if missing:
        raise UserError(f"--pretrained_model_name_or_path {path}: not a Stable Diffusion pipeline folder (missing "
                        f"{', '.join(missing)}); give the folder a pipeline's save_pretrained wrote, or a Hub id.")


def load_models(args, captions_for_tokenizer) -> dict:
    """tokenizer, text_encoder, vae, unet and noise_scheduler (SDXL: + tokenizer_2, text_encoder_2): loaded (a
    pipeline folder, a Hub id or one single-file checkpoint, whose own inference scheduler is kept as
    inference_scheduler), or built fresh from a preset; then --pretrained_vae_model_name_or_path and
    --prediction_type applied."""
    if is_single_file(args.pretrained_model_name_or_path):  # one LDM-layout file, as model-sharing sites give them
        models = load_single_file_models(args)
    elif args.pretrained_model_name_or_path:
        models = load_pipeline_models(args)
    else:
        models = build_fresh_models(args, captions_for_tokenizer)
    replace_vae(args, models)
    if args.prediction_type is not None:
        models["noise_scheduler"].register_to_config(prediction_type=args.prediction_type)
    return models


def load_single_file_models(args) -> dict:
    from diffusers import DDPMScheduler

    pipeline = load_single_file_pipeline(args.pretrained_model_name_or_path, args.model_config, args.original_config)
    models = dict(noise_scheduler=DDPMScheduler.from_config(pipeline.scheduler.config),
                  inference_scheduler=pipeline.scheduler, tokenizer=pipeline.tokenizer,
                  text_encoder=own_memory(pipeline.text_encoder), vae=own_memory(pipeline.vae),
                  unet=own_memory(pipeline.unet))
    if args.sdxl:
        models.update(tokenizer_2=pipeline.tokenizer_2, text_encoder_2=own_memory(pipeline.text_encoder_2))
    return models


def load_pipeline_models(args) -> dict:
    """From a diffusers pipeline folder or Hub id (--revision, --variant; the UNet at --non_ema_revision)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path, rev, variant = args.pretrained_model_name_or_path, args.revision, args.variant
    check_pipeline_folder(path, args.sdxl)
    models = dict(
        noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler"),
        tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=rev),
        text_encoder=own_memory(CLIPTextModel.from_pretrained(path, subfolder="text_encoder", revision=rev,
                                                              variant=variant)),
        vae=own_memory(AutoencoderKL.from_pretrained(path, subfolder="vae", revision=rev, variant=variant)),
        unet=own_memory(UNet2DConditionModel.from_pretrained(path, subfolder="unet", revision=args.non_ema_revision)),
    )
    if args.sdxl:  # the second tokenizer and text encoder (with projection: the pooled prompt)
        from transformers import CLIPTextModelWithProjection

        models.update(tokenizer_2=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", revision=rev),
                      text_encoder_2=own_memory(CLIPTextModelWithProjection.from_pretrained(
                          path, subfolder="text_encoder_2", revision=rev, variant=variant)))
    return models


def build_fresh_models(args, captions_for_tokenizer) -> dict:
    """From scratch: --model_preset sizes (--unet_config / --vae_config JSON overrides), a tokenizer learnt from the
    captions (saved in <output_dir>/tokenizer) or --text_encoder_name_or_path's encoder and tokenizer."""
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
    return dict(noise_scheduler=components.pop("scheduler"), **components)


def replace_vae(args, models: dict) -> None:
    """--pretrained_vae_model_name_or_path (e.g. madebyollin/sdxl-vae-fp16-fix, as diffusers' SDXL scripts)."""
    from diffusers import AutoencoderKL

    vae_path = args.pretrained_vae_model_name_or_path
    if not vae_path:
        return
    if os.path.isfile(os.path.join(vae_path, "model_index.json")) and not os.path.isfile(
            os.path.join(vae_path, "config.json")):
        raise UserError(f"--pretrained_vae_model_name_or_path {vae_path} is a whole pipeline: give its VAE folder, "
                        f"{os.path.join(vae_path, 'vae')}.")
    models["vae"] = own_memory(AutoencoderKL.from_pretrained(vae_path, revision=args.revision, variant=args.variant))


def text_encoder_names(models) -> list[str]:
    """The pipeline's text encoders: text_encoder (and SDXL's text_encoder_2)."""
    return ["text_encoder"] + (["text_encoder_2"] if models.get("text_encoder_2") is not None else [])


def trained_text_encoders(args, models) -> list[str]:
    """The text encoders this run trains (--train_text_encoder: all of them)."""
    return text_encoder_names(models) if args.train_text_encoder else []
