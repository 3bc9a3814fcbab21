"""The Stable Diffusion components a run trains: loaded from a pipeline folder or Hub id, or built
fresh from a preset (`utils.sd.builder`) with a tokenizer learned from the captions."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields

from utils.checkpointing import own_memory
from utils.errors import UserError, UserFileNotFoundError
from utils.sd.model_kind import is_single_file
from utils.sd.single_file import load_single_file_pipeline
from utils.text_encoders import load_text_encoder


@dataclass(frozen=True)
class ModelSource:
    """Where a run's Stable Diffusion components come from: the model flags of train_text_to_image.py, typed (the
    loaders below read this, not the whole namespace)."""

    pretrained_model_name_or_path: str | None  # a pipeline folder, a Hub id or one single file; None: from scratch
    revision: str | None
    variant: str | None
    non_ema_revision: str | None  # the UNet's revision
    sdxl: bool
    model_config: str | None  # a single file's component configs (a pipeline folder or Hub id)
    original_config: str | None  # or its original LDM YAML
    pretrained_vae_model_name_or_path: str | None
    prediction_type: str | None  # None: the scheduler's own
    model_preset: str | None  # from scratch: the size preset (utils/sd/builder.py) ...
    unet_config: str | None  # ... with JSON overrides
    vae_config: str | None
    text_encoder_name_or_path: str | None  # from scratch: a pretrained CLIP instead of a fresh one
    tokenizer_name: str | None  # a pipeline's tokenizer from elsewhere (diffusers' DreamBooth flag)
    resolution: int
    seed: int | None
    output_dir: str  # from scratch: the learnt tokenizer goes to <output_dir>/tokenizer

    @classmethod
    def from_args(cls, args) -> "ModelSource":
        """The flags of the same names."""
        return cls(**{field.name: getattr(args, field.name) for field in fields(cls)})


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


def load_models(source: ModelSource, captions_for_tokenizer) -> dict:
    """tokenizer, text_encoder, vae, unet and noise_scheduler (SDXL: + tokenizer_2, text_encoder_2): loaded (a
    pipeline folder, a Hub id or one single-file checkpoint, whose own inference scheduler is kept as
    inference_scheduler), or built fresh from a preset; then --pretrained_vae_model_name_or_path and
    --prediction_type applied."""
    if is_single_file(source.pretrained_model_name_or_path):  # one LDM-layout file, as model-sharing sites give them
        models = load_single_file_models(source)
    elif source.pretrained_model_name_or_path:
        models = load_pipeline_models(source)
    else:
        models = build_fresh_models(source, captions_for_tokenizer)
    replace_vae(source, models)
    if source.prediction_type is not None:
        models["noise_scheduler"].register_to_config(prediction_type=source.prediction_type)
    return models


def load_single_file_models(source: ModelSource) -> dict:
    from diffusers import DDPMScheduler

    pipeline = load_single_file_pipeline(source.pretrained_model_name_or_path, source.model_config, source.original_config)
    models = dict(noise_scheduler=DDPMScheduler.from_config(pipeline.scheduler.config),
                  inference_scheduler=pipeline.scheduler, tokenizer=pipeline.tokenizer,
                  text_encoder=own_memory(pipeline.text_encoder), vae=own_memory(pipeline.vae),
                  unet=own_memory(pipeline.unet))
    if source.sdxl:
        models.update(tokenizer_2=pipeline.tokenizer_2, text_encoder_2=own_memory(pipeline.text_encoder_2))
    return models


def load_pipeline_models(source: ModelSource) -> dict:
    """From a diffusers pipeline folder or Hub id (--revision, --variant; the UNet at --non_ema_revision)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from utils.sd.edm import check_not_edm_pipeline

    path, rev, variant = source.pretrained_model_name_or_path, source.revision, source.variant
    check_pipeline_folder(path, source.sdxl)
    scheduler_config = DDPMScheduler.load_config(path, subfolder="scheduler")  # (read once: checked, then built)
    check_not_edm_pipeline(path, scheduler_config.get("_class_name"))
    models = dict(
        noise_scheduler=DDPMScheduler.from_config(scheduler_config),
        tokenizer=(CLIPTokenizer.from_pretrained(source.tokenizer_name, revision=rev) if source.tokenizer_name
                   else CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=rev)),
        text_encoder=own_memory(CLIPTextModel.from_pretrained(path, subfolder="text_encoder", revision=rev,
                                                              variant=variant)),
        vae=own_memory(AutoencoderKL.from_pretrained(path, subfolder="vae", revision=rev, variant=variant)),
        unet=own_memory(UNet2DConditionModel.from_pretrained(path, subfolder="unet", revision=source.non_ema_revision)),
    )
    if source.sdxl:  # the second tokenizer and text encoder (with projection: the pooled prompt)
        from transformers import CLIPTextModelWithProjection

        models.update(tokenizer_2=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", revision=rev),
                      text_encoder_2=own_memory(CLIPTextModelWithProjection.from_pretrained(
                          path, subfolder="text_encoder_2", revision=rev, variant=variant)))
    return models


def build_fresh_models(source: ModelSource, captions_for_tokenizer) -> dict:
    """From scratch: --model_preset sizes (--unet_config / --vae_config JSON overrides), a tokenizer learnt from the
    captions (saved in <output_dir>/tokenizer) or --text_encoder_name_or_path's encoder and tokenizer."""
    from utils.sd.builder import build_components

    read_json = lambda p: json.load(open(p, encoding="utf-8")) if p else None  # noqa: E731
    tokenizer = text_encoder = None
    if source.text_encoder_name_or_path:
        tokenizer, text_encoder = load_text_encoder(source.text_encoder_name_or_path, clip_only=True, frozen=False)
    components = build_components(source.model_preset, texts=captions_for_tokenizer, resolution=source.resolution,
                                  seed=source.seed or 0, unet_config=read_json(source.unet_config),
                                  vae_config=read_json(source.vae_config), tokenizer=tokenizer,
                                  tokenizer_dir=os.path.join(source.output_dir, "tokenizer"))
    if text_encoder is not None:
        components["text_encoder"] = text_encoder
    return dict(noise_scheduler=components.pop("scheduler"), **components)


def replace_vae(source: ModelSource, models: dict) -> None:
    """--pretrained_vae_model_name_or_path (e.g. madebyollin/sdxl-vae-fp16-fix, as diffusers' SDXL scripts)."""
    from diffusers import AutoencoderKL

    vae_path = source.pretrained_vae_model_name_or_path
    if not vae_path:
        return
    if os.path.isfile(os.path.join(vae_path, "model_index.json")) and not os.path.isfile(
            os.path.join(vae_path, "config.json")):
        raise UserError(f"--pretrained_vae_model_name_or_path {vae_path} is a whole pipeline: give its VAE folder, "
                        f"{os.path.join(vae_path, 'vae')}.")
    models["vae"] = own_memory(AutoencoderKL.from_pretrained(vae_path, revision=source.revision, variant=source.variant))

