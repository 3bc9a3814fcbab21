"""Writing a text-to-image run's weights: the diffusers pipeline folder (optionally with a single-file copy) or the
LoRA files, in float32 whatever the mixed precision, atomically anywhere but --output_dir itself."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import torch

from utils.atomic import atomic_directory
from utils.checkpointing import check_finite_before_saving
from utils.sd.builder import assemble_pipeline
from utils.sd.lora import base_model_version, lora_file_metadata
from utils.sd.model_kind import is_single_file
from utils.sd.single_file import SINGLE_FILE_NAME, save_single_file

logger = logging.getLogger(__name__)


@dataclass
class WeightsOutput:
    """How the weights are written (the script builds it from its flags once the step count is known)."""

    output_dir: str
    base: str | None  # --pretrained_model_name_or_path: a pipeline folder / Hub id, or a single file; None: scratch
    base_name: str  # the base, or the --model_preset: what the file metadata name
    revision: str | None
    variant: str | None
    sdxl: bool
    resolution: int
    steps: int  # the run's optimizer steps
    lora_format: str | None = None  # --lora_format of a --use_lora run; None: the whole pipeline
    single_file_dtype: str | None = None  # --single_file_dtype with --save_single_file; None: no single file
    skip_text_encoder: bool = False  # --skip_save_text_encoder: the pipeline without its text encoder (diffusers')
    lora_dtype: torch.dtype | None = None  # the LoRA file's dtype (--upcast_before_saving: float32; else the weight dtype)


def save_weights(output: WeightsOutput, family, accelerator, models: dict, text_encoders: list[str],
                 trained: list[str], directory: str) -> None:
    """The model's current weights in `directory` (main process): the family's pipeline, or the LoRA weights of the
    denoiser and the `trained` text encoders. --output_dir itself is written in place, like diffusers' scripts; any
    other folder (best/) atomically."""
    unwrapped = {name: accelerator.unwrap_model(models[name]) for name in [family.denoiser] + text_encoders}
    check_finite_before_saving(accelerator, output.output_dir, f"the model in {directory}",
                               [unwrapped[family.denoiser]] + [unwrapped[name] for name in trained])
    if directory == output.output_dir:
        write_weights(output, family, models, unwrapped, trained, directory)
    else:
        with atomic_directory(directory) as temp:
            write_weights(output, family, models, unwrapped, trained, temp)
    what = "LoRA weights" if output.lora_format else "pipeline" if family.denoiser in ("unet", "transformer") \
        else family.denoiser
    logger.info(f"Saved the {what} to {directory}")


def lora_metadata(output: WeightsOutput, unet, noise_scheduler) -> dict:
    """ss_*/modelspec.* keys for both LoRA files: the base model family, resolution and training facts."""
    prediction_type = noise_scheduler.config.prediction_type
    version = base_model_version(output.sdxl, unet.config.cross_attention_dim, prediction_type)
    title = f"{os.path.basename(os.path.normpath(output.output_dir))} (LoRA)"
    return lora_file_metadata(version, output.resolution, title, prediction_type,
                              extra={"ss_sd_model_name": output.base_name, "ss_max_train_steps": output.steps})


@contextlib.contextmanager
def float32_components(pipeline):
    """The pipeline's models in float32 inside the block, their own dtypes restored after (bf16/fp16 -> fp32 -> back
    is exact). With --mixed_precision the frozen VAE/text encoders are held in the weight dtype while the trained
    UNet stays float32; saved as they are, the pipeline mixes dtypes and fails on the CPU ("expected m1 and m2 to
    have the same dtype", seen with the kanji demo under bf16)."""
    modules = [m for m in pipeline.components.values() if isinstance(m, torch.nn.Module)]
    dtypes = [m.dtype for m in modules]
    for module in modules:
        module.to(torch.float32)
    try:
        yield
    finally:
        for module, dtype in zip(modules, dtypes):
            module.to(dtype)


def write_weights(output: WeightsOutput, family, models: dict, unwrapped: dict, trained: list[str],
                  directory: str) -> None:
    if output.lora_format:
        family.save_lora(directory, unwrapped[family.denoiser], {name: unwrapped[name] for name in trained},
                         lora_format=output.lora_format, metadata=family.lora_metadata(output, models),
                         dtype=output.lora_dtype)
    else:
        family.write_pipeline(output, models, unwrapped, directory)


def write_sd_pipeline(output: WeightsOutput, models: dict, unwrapped: dict, directory: str) -> None:
    """A Stable Diffusion (XL) pipeline folder (and, with --save_single_file, its LDM-layout copy)."""
    unet, text_encoder = unwrapped["unet"], unwrapped["text_encoder"]
    components = dict(unwrapped, vae=models["vae"])
    prediction_type = models["noise_scheduler"].config.prediction_type
    if output.base and not is_single_file(output.base):
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        pipeline_class = StableDiffusionXLPipeline if output.sdxl else StableDiffusionPipeline
        if output.skip_text_encoder:  # diffusers' train_dreambooth.py: prompt embeddings come from elsewhere
            components.update(text_encoder=None, **({"text_encoder_2": None} if output.sdxl else {}))
        pipeline = pipeline_class.from_pretrained(output.base, revision=output.revision, variant=output.variant,
                                                  **components)
        # Inference must use the target the UNet was trained for (diffusers' script keeps the base's).
        pipeline.scheduler.register_to_config(prediction_type=prediction_type)
    else:
        scheduler = models.get("inference_scheduler", models["noise_scheduler"])  # a single file's own one
        scheduler.register_to_config(prediction_type=prediction_type)
        tokenizers = {name: models[name] for name in ("tokenizer", "tokenizer_2") if models.get(name) is not None}
        pipeline = assemble_pipeline(dict(components, **tokenizers, scheduler=scheduler))
    with float32_components(pipeline):  # mixed precision keeps the frozen parts in bf16/fp16: save one dtype
        pipeline.save_pretrained(directory)
    if output.single_file_dtype:  # the same weights in the LDM layout (round-trip checked before writing)
        save_single_file(os.path.join(directory, SINGLE_FILE_NAME), unet, models["vae"], text_encoder,
                         output.single_file_dtype, {"modelspec.title": os.path.basename(output.output_dir),
                                                    "base_model": output.base_name, "steps": output.steps},
                         text_encoder_2=unwrapped.get("text_encoder_2"))
