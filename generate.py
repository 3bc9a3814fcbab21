#!/usr/bin/env python
"""Generate images from a trained text-to-image model.

Loads any of what train_text_to_image.py writes and samples with diffusers' StableDiffusionPipeline:

    # the final pipeline folder (or a Hub id)
    python generate.py --model sd-model-finetuned --prompt "kanji character for water" --num_images 4
    # a base model + LoRA weights
    python generate.py --model BASE --lora sd-lora-out --lora_scale 0.8 --prompt "..."
    # an intermediate checkpoint: its UNet (or EMA UNet) on top of the base/final pipeline
    python generate.py --checkpoint sd-model-finetuned/checkpoint-500 --ema --prompt "..."
    # a ControlNet (train_controlnet.py's output, or checkpoint-N/controlnet) under a conditioning image
    python generate.py --model BASE --controlnet controlnet-model --control_image edges.png --prompt "..."
    # a mask-conditioned DiT (train_mask_dit.py): one image set per mask file
    python generate.py --model mask-dit-out --mask masks/ --num_images 2
    # a single-file checkpoint (AUTOMATIC1111 / ComfyUI layout), configs from a pipeline folder
    python generate.py --model model.safetensors --model_config sd-model-finetuned --prompt "..."
    # export instead of generating: a LoRA as a kohya/A1111 file, or a model (or checkpoint-N) as one file
    python generate.py --lora sd-lora-out --export kohya --export_path my_lora.safetensors
    python generate.py --checkpoint sd-model-finetuned/checkpoint-500 --ema --export single_file

Every image is a PNG carrying its prompt, negative prompt, seed, steps, scheduler, guidance
scale and model in the PNG text metadata; a grid of all of them is saved as grid.png.
Image i of every prompt uses seed + i with its own CPU torch.Generator, so the same command
(same seed, batch size and device) gives the same images again.
"""

from __future__ import annotations

import gc

if __name__ == "__main__":  # a command, not an import: no cyclic GC until its imports are done (user_entry_point)
    gc.disable()

import argparse
import inspect
import json
import os
import random
import re
from dataclasses import dataclass

import utils  # noqa: F401  (first: its log filter must be in place before diffusers/peft import bitsandbytes)

# isort: split

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from tqdm.auto import tqdm

from utils.config import parse_args_with_config
from utils.errors import UserError, UserFileNotFoundError, user_entry_point
from utils.run import quiet_empty_notices
from utils.images import load_image, make_grid
from utils.sd.lora import KOHYA_WEIGHT_NAME, LORA_WEIGHT_NAME, export_kohya, is_lycoris_file, load_lycoris_file
from utils.sd.lycoris import has_peft_adapters, load_peft_adapters
from utils.sd.single_file import DTYPES as SINGLE_FILE_DTYPES
from utils.sd.single_file import SINGLE_FILE_NAME, load_single_file_pipeline, save_single_file
from utils.sd.schedulers import SCHEDULERS, make_scheduler
from utils.sd.model_kind import SDXL_PIPELINE, is_single_file, pipeline_class_name

# The pipelines train_text_to_image.py trains -> the ModelSpec architecture its LoRA files carry (utils/sd/lora.py)
LORA_ARCHITECTURES = {"StableDiffusionPipeline": "stable-diffusion-v", SDXL_PIPELINE: "stable-diffusion-xl",
                      "StableDiffusion3Pipeline": "stable-diffusion-3", "FluxPipeline": "flux-1",
                      "Lumina2Pipeline": "lumina-2"}

# Step presets from the kanji tuning guide (guide 001): 25 steps for a quick look, 75 for quality.
STEP_PRESETS = {"fast": 25, "quality": 75}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SD_GUIDANCE, MASK_DIT_GUIDANCE = 9.0, 4.0
MASK_DIT_SAMPLERS = ("euler", "midpoint")  # flow-matching ODE steppers (utils/mask_dit/flow_matching.py)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Generate images with a trained Stable Diffusion model (full pipeline, base "
                    "+ LoRA, or checkpoint-N).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model", type=str, default=None,
                       help="Pipeline folder (train_text_to_image.py's --output_dir) or Hub id. With "
                            "--checkpoint it is the base "
                            "the checkpoint's weights go on; it may then be omitted if the checkpoint's "
                            "parent holds a full pipeline.")
    model.add_argument("--checkpoint", type=str, default=None,
                       help="A training checkpoint (output_dir/checkpoint-N): its unet/ (or unet_ema/ "
                            "with --ema), plus vae/ and "
                            "text_encoder/ when present, replace the base model's; a LoRA checkpoint's "
                            "adapter is loaded instead.")
    model.add_argument("--ema", action="store_true",
                       help="With --checkpoint: use the EMA UNet (checkpoint-N/unet_ema, written with --use_ema).")
    model.add_argument("--lora", type=str, default=None,
                       help="LoRA weights to load on top of --model: a folder with "
                            "pytorch_lora_weights.safetensors, or the file.")
    model.add_argument("--lora_scale", type=float, default=1.0, help="Strength of the LoRA (0 = base model only).")
    model.add_argument("--controlnet", type=str, default=None,
                       help="A ControlNet for --model (train_controlnet.py's --output_dir, a checkpoint-N/controlnet "
                            "folder, or a Hub id): samples with diffusers' ControlNet pipeline under --control_image.")
    model.add_argument("--control_image", type=str, default=None,
                       help="With --controlnet: the conditioning image (resized and centre-cropped to the output size; "
                            "a class-index mask when the ControlNet was trained with --conditioning_num_classes).")
    model.add_argument("--image", type=str, default=None,
                       help="DeepFloyd IF stage II (an IFSuperResolutionPipeline --model): the low-resolution image "
                            "to upscale to the output size.")
    model.add_argument("--controlnet_scale", type=float, default=1.0,
                       help="With --controlnet: the strength of its residuals (the pipelines' "
                            "controlnet_conditioning_scale; 0 = the base model alone).")
    model.add_argument("--mask", type=str, default=None,
                       help="For a mask-conditioned DiT (train_mask_dit.py's output as --model): a "
                            "mask image or a folder of "
                            "them (index maps: 0 = background, k = channel k; or 0/255 for one "
                            "channel). --prompt is optional.")
    model.add_argument("--mask_guidance_scale", type=float, default=1.0, help="Mask DiT only: mask guidance (1 = off).")
    model.add_argument("--model_config", type=str, default=None,
                       help="With --model model.safetensors (a single-file checkpoint): a diffusers pipeline folder or "
                            "Hub id with the component configs, tokenizer and scheduler (needed offline).")
    model.add_argument("--original_config", type=str, default=None,
                       help="With --model model.safetensors: the original LDM YAML instead of --model_config.")
    export = parser.add_argument_group("export (instead of generating images)")
    export.add_argument("--export", type=str, default=None, choices=["kohya", "single_file"],
                        help="kohya: the --lora (or LoRA --checkpoint) as a kohya/A1111 file for ComfyUI, "
                             "AUTOMATIC1111, Forge; single_file: the model the flags load (--model, --checkpoint, "
                             "--ema) as one LDM-layout model.safetensors.")
    export.add_argument("--export_path", type=str, default=None,
                        help=f"The exported file (default: {KOHYA_WEIGHT_NAME} next to the LoRA weights, or "
                             f"{SINGLE_FILE_NAME} in --output_dir).")
    export.add_argument("--single_file_dtype", type=str, default="fp16", choices=sorted(SINGLE_FILE_DTYPES),
                        help="--export single_file: the precision of the tensors.")

    prompts = parser.add_argument_group("prompts")
    prompts.add_argument("--prompt", type=str, default=None, help="The text prompt.")
    prompts.add_argument("--prompts_file", type=str, default=None,
                         help="A text file with one prompt per line (blank lines and # comments skipped).")
    prompts.add_argument("--negative_prompt", type=str, default=None,
                         help="What the images should not show (used for every prompt).")

    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--num_images", type=int, default=4, help="Images per prompt.")
    sampling.add_argument("--batch_size", type=int, default=4,
                          help="Images per pipeline call (lower it if memory runs out).")
    sampling.add_argument("--preset", type=str, default="fast", choices=sorted(STEP_PRESETS),
                          help="Number of denoising steps: fast = 25, quality = 75 (guide 001). --steps overrides it.")
    sampling.add_argument("--steps", type=int, default=None, help="Denoising steps (default: from --preset).")
    sampling.add_argument("--guidance_scale", type=float, default=None,
                          help=f"Classifier-free guidance (1 = off). Default {SD_GUIDANCE}: 7-12 "
                               "works for the kanji model "
                               f"(guide 001); mask DiT default {MASK_DIT_GUIDANCE}.")
    sampling.add_argument("--scheduler", type=str, default=None,
                          choices=list(dict.fromkeys([*SCHEDULERS, *MASK_DIT_SAMPLERS])),  # euler is in both
                          help="Sampler. Stable Diffusion (default dpm++): the noise schedule "
                               "comes from the model's own "
                               f"scheduler config. Mask DiT: {' or '.join(MASK_DIT_SAMPLERS)} (default euler).")
    sampling.add_argument("--height", type=int, default=None,
                          help="Image height in pixels (default: the model's training size).")
    sampling.add_argument("--width", type=int, default=None,
                          help="Image width in pixels (default: the model's training size).")
    sampling.add_argument("--seed", type=int, default=None,
                          help="Image i of each prompt uses seed + i (default: a random seed, "
                               "printed and stored in the PNGs).")

    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--dtype", type=str, default=None, choices=sorted(DTYPES),
                         help="Weights dtype (default: fp16 on CUDA/MPS, fp32 on CPU; fp16 does not run on CPU).")
    runtime.add_argument("--device", type=str, default=None,
                         help="cuda, cuda:1, mps or cpu (default: cuda > mps > cpu).")
    runtime.add_argument("--output_dir", type=str, default="generated", help="Where the PNGs and grid.png are written.")
    args = parse_args_with_config(parser, argv)
    validate_args(args)
    return args


def validate_args(args) -> None:
    if args.model is None and args.checkpoint is None and args.export != "kohya":
        raise UserError("Pass --model (a pipeline folder or Hub id) and/or --checkpoint output_dir/checkpoint-N.")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise UserError(f"--output_dir {args.output_dir} is a file; give a folder for the images (it is created).")
    if args.mask is None and args.model is not None and os.path.isdir(args.model) and is_mask_dit_dir(args.model):
        raise UserError(f"--model {args.model} is a mask DiT (train_mask_dit.py's output): pass --mask "
                        "MASK_IMAGE_OR_FOLDER (and optionally --prompt).")
    if args.export == "kohya" and args.lora is None and args.checkpoint is None:
        raise UserError("--export kohya converts LoRA weights: give --lora FOLDER_OR_FILE (or a LoRA --checkpoint).")
    if args.export is None and args.mask is None and (args.prompt is None) == (args.prompts_file is None):
        raise UserError("Pass exactly one of --prompt or --prompts_file.")
    if args.mask is not None and (args.checkpoint or args.lora or args.prompts_file):
        raise UserError("--mask (mask DiT) takes --model and an optional --prompt; --checkpoint, --lora and "
                        "--prompts_file are "
                        "Stable Diffusion options.")
    if (args.controlnet is None) != (args.control_image is None):
        raise UserError("--controlnet and --control_image go together: a ControlNet samples under a conditioning image.")
    if args.control_image is not None and not os.path.isfile(args.control_image):
        raise UserFileNotFoundError(f"--control_image {args.control_image}: no such file")
    if args.image is not None and not os.path.isfile(args.image):
        raise UserFileNotFoundError(f"--image {args.image}: no such file")
    if args.controlnet is not None and (args.mask is not None or args.export is not None):
        raise UserError("--controlnet samples a Stable Diffusion (XL) pipeline; it cannot go with --mask or --export.")
    if args.ema and args.checkpoint is None:
        raise UserError("--ema picks checkpoint-N/unet_ema, so it needs --checkpoint (a final pipeline "
                        "already holds the EMA weights).")
    for flag in ("num_images", "batch_size"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    for flag in ("height", "width"):  # the VAE downsamples by 8 (SD, SDXL, the mask DiT's latent models)
        value = getattr(args, flag)
        if value is not None and (value < 8 or value % 8):
            nearest = max(8, round(value / 8) * 8)
            raise UserError(f"--{flag} {value}: give a multiple of 8 pixels (e.g. {nearest}); the VAE works on 8x8 "
                            "pixel blocks.")


def read_prompts(args) -> list[str]:
    if args.prompt is not None:
        return [args.prompt]
    if not os.path.isfile(args.prompts_file):
        raise UserFileNotFoundError(f"--prompts_file {args.prompts_file}: no such file")
    with open(args.prompts_file, encoding="utf-8") as handle:
        prompts = [line.strip() for line in handle if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise UserError(f"--prompts_file {args.prompts_file}: no prompts in it (one per line)")
    return prompts


def pick_device_and_dtype(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """cuda > mps > cpu; fp16 on accelerators and fp32 on CPU unless asked otherwise."""
    if device is None:
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    device = torch.device(device)
    if dtype is None:
        dtype = "fp32" if device.type == "cpu" else "fp16"
    if dtype == "fp16" and device.type == "cpu":
        raise UserError("--dtype fp16 does not run on CPU (half-precision convolutions are missing there); "
                        "use --dtype bf16 or --dtype fp32, or a GPU with --device cuda.")
    return device, DTYPES[dtype]


# ----------------------------------------------------------------------------------------------
# Loading: full pipeline, base + LoRA, or checkpoint-N on top of a base
# ----------------------------------------------------------------------------------------------

def dtype_kwarg(dtype: torch.dtype) -> dict:
    """`from_pretrained`'s dtype argument: newer diffusers call it `dtype` and deprecate `torch_dtype`."""
    from diffusers.utils import deprecation_utils

    return {"dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype": dtype}


def is_mask_dit_dir(path: str) -> bool:
    from utils.mask_dit.nextdit import is_mask_dit_dir as check  # imported lazily: only mask-DiT users need it

    return check(path)


def is_pipeline_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "model_index.json"))


def resolve_base_model(args) -> str:
    """The pipeline to load: --model, or the folder a --checkpoint was saved in if it holds a full pipeline."""
    if args.model is not None:
        if is_single_file(args.model):
            return args.model
        if os.path.isdir(args.model) and not is_pipeline_dir(args.model):
            found = sorted(n for n in os.listdir(args.model) if n.startswith("checkpoint-"))
            hint = ""
            if os.path.isfile(os.path.join(args.model, LORA_WEIGHT_NAME)) or has_peft_adapters(args.model):
                hint = f" It holds LoRA weights: use --model BASE_MODEL --lora {args.model}."
            elif found:
                hint = (f" It holds checkpoints ({', '.join(found)}): use --model BASE_MODEL --checkpoint "
                        f"{os.path.join(args.model, found[-1])}.")
            raise UserError(f"--model {args.model}: no model_index.json, so not a diffusers pipeline folder.{hint}")
        return args.model
    parent = os.path.dirname(os.path.abspath(args.checkpoint))
    if is_pipeline_dir(parent):
        return parent
    raise UserError(f"--checkpoint {args.checkpoint}: its parent folder {parent} holds no full "
                    "pipeline (training has not "
                    "finished there); pass the base model the run started from with --model.")


def load_pipeline(args, device: torch.device, dtype: torch.dtype):
    """A StableDiffusionPipeline on `device` with the weights the flags ask for.

    Returns (pipe, model description for the metadata, path of the LoRA loaded or None).
    """
    import diffusers

    base = resolve_base_model(args)
    kind = pipeline_class_name(base) if is_single_file(base) else None  # (a file's family, from its keys)
    if kind in ("FluxPipeline", "Lumina2Pipeline"):
        pipe = load_transformer_single_file_pipeline(kind, base, args.model_config, dtype)
    elif is_single_file(base):
        pipe = load_single_file_pipeline(base, args.model_config, args.original_config, **dtype_kwarg(dtype))
    else:  # StableDiffusion(XL|3)Pipeline, as the folder's model_index.json says
        name = pipeline_class_name(base)
        from utils.families.deepfloyd_if import PIPELINES as IF_PIPELINES  # (stages I and II, pixel space)

        pipeline_class = getattr(diffusers, name if name in LORA_ARCHITECTURES or name in IF_PIPELINES
                                 else "StableDiffusionPipeline")
        pipe = pipeline_class.from_pretrained(base, **dtype_kwarg(dtype))
    description, lora_source = base, None
    if args.checkpoint is not None:
        description, lora_source = load_checkpoint_into(pipe, args.checkpoint, args.ema, dtype)
    if args.lora is not None:
        load_lora(pipe, args.lora)
        description, lora_source = f"{description} + LoRA {args.lora}", args.lora
    if args.controlnet is not None:
        pipe = with_controlnet(pipe, args.controlnet, dtype)
        description = f"{description} + ControlNet {args.controlnet}"
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, description, lora_source


def load_transformer_single_file_pipeline(kind: str, path: str, model_config: str | None, dtype: torch.dtype):
    """A FLUX.1 or Lumina-2 pipeline (`kind`) from a transformer-only single file (BFL's / Alpha-VLLM's layout) and
    --model_config's other components."""
    import diffusers

    from utils.families.flux_single_file import load_flux_single_file_transformer
    from utils.families.lumina2_single_file import load_lumina2_single_file_transformer

    load = load_flux_single_file_transformer if kind == "FluxPipeline" else load_lumina2_single_file_transformer
    transformer = load(path, model_config, **dtype_kwarg(dtype))
    return getattr(diffusers, kind).from_pretrained(model_config, transformer=transformer, **dtype_kwarg(dtype))


def with_controlnet(pipe, path: str, dtype: torch.dtype):
    """The ControlNet pipeline of `pipe`'s components (diffusers' `from_pipe`) with the ControlNet at `path`."""
    import diffusers

    if denoiser_name(pipe) != "unet":
        raise UserError(f"--controlnet: {type(pipe).__name__} is not a Stable Diffusion (XL) pipeline; "
                        "train_controlnet.py's ControlNets steer SD 1.x/2.x and XL.")
    controlnet = diffusers.ControlNetModel.from_pretrained(path, **dtype_kwarg(dtype))
    xl = getattr(pipe, "text_encoder_2", None) is not None
    pipeline_class = diffusers.StableDiffusionXLControlNetPipeline if xl else diffusers.StableDiffusionControlNetPipeline
    return pipeline_class.from_pipe(pipe, controlnet=controlnet)


def control_image(args, height: int, width: int, device, dtype) -> dict:
    """The pipeline's conditioning arguments for --control_image ({} without --controlnet): the image as
    train_controlnet.py fed it (RGB in [0, 1], or one-hot class masks per the ControlNet's conditioning.json)."""
    from utils.families.controlnet import CONDITIONING_FILE
    from utils.sd.controlnet import ConditioningImages

    if args.controlnet is None:
        return {}
    settings = os.path.join(args.controlnet, CONDITIONING_FILE)
    num_classes = json.load(open(settings, encoding="utf-8"))["num_classes"] if os.path.isfile(settings) else None
    image = ConditioningImages("control_image", num_classes).at_size(args.control_image, width, height)
    return {"image": image[None].to(device, dtype), "controlnet_conditioning_scale": args.controlnet_scale}


def upscaled_image(args, pipe) -> dict:
    """DeepFloyd IF stage II's low-resolution input (--image), which only that pipeline takes."""
    stage_ii = type(pipe).__name__ == "IFSuperResolutionPipeline"
    if stage_ii != (args.image is not None):
        raise UserError("--image goes with a DeepFloyd IF stage II model (IFSuperResolutionPipeline): "
                        + ("give the low-resolution image to upscale." if stage_ii else "drop --image."))
    return {"image": load_image(args.image)} if stage_ii else {}


def denoiser_name(pipe) -> str:
    """The pipeline's denoising network: unet (SD 1.x/2.x, SDXL) or transformer (SD3)."""
    return "transformer" if getattr(pipe, "transformer", None) is not None else "unet"


def load_checkpoint_into(pipe, checkpoint: str, ema: bool, dtype: torch.dtype) -> tuple[str, str | None]:
    """Swap in the modules a training checkpoint holds. Returns (description, LoRA path or None)."""
    if not os.path.isdir(checkpoint):
        raise UserFileNotFoundError(f"--checkpoint {checkpoint}: no such folder")
    present, name = sorted(os.listdir(checkpoint)), denoiser_name(pipe)
    if (LORA_WEIGHT_NAME in present or has_peft_adapters(checkpoint)) and name not in present:
        if ema:
            raise UserError(f"--checkpoint {checkpoint} is a LoRA checkpoint; it has no EMA {name}, drop --ema.")
        load_lora(pipe, checkpoint)
        return f"{checkpoint} (LoRA)", checkpoint
    folder = f"{name}_ema" if ema else name
    path = os.path.join(checkpoint, folder)
    if not os.path.isfile(os.path.join(path, "config.json")):
        hint = " (the run was trained without --use_ema; drop --ema)" if ema else ""
        raise UserFileNotFoundError(
            f"--checkpoint {checkpoint}: no {folder}/ with a diffusers {name} for --model's pipeline{hint}; found "
            f"{present}"
        )
    setattr(pipe, name, type(getattr(pipe, name)).from_pretrained(path).to(dtype))
    loaded = [folder]
    for name in ("vae", "text_encoder"):
        folder = os.path.join(checkpoint, name)
        if os.path.isfile(os.path.join(folder, "config.json")):
            setattr(pipe, name, type(getattr(pipe, name)).from_pretrained(folder).to(dtype))
            loaded.append(name)
    return f"{checkpoint} ({', '.join(loaded)})", None


def load_lora(pipe, path: str) -> None:
    """Load LoRA weights: a folder with pytorch_lora_weights.safetensors (or our kohya file), or a file in the
    diffusers or kohya/A1111 layout (diffusers' load_lora_weights reads both); a LoHa/LoKr run's folder through
    peft (its unet_adapter/, text_encoder_adapter/), and a LyCORIS LoHa/LoKr file (ours or another tool's)."""
    models = {"unet": getattr(pipe, "unet", None), "transformer": getattr(pipe, "transformer", None),
              "text_encoder": pipe.text_encoder, "text_encoder_2": getattr(pipe, "text_encoder_2", None)}
    if os.path.isdir(path) and has_peft_adapters(path):
        return load_peft_adapters(path, models, add=True)
    if os.path.isfile(path) and path.endswith(".safetensors") and is_lycoris_file(path):  # LoHa / LoKr, any tool's
        return load_lycoris_file(path, models)
    if os.path.isfile(path):
        folder, name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    elif os.path.isfile(os.path.join(path, LORA_WEIGHT_NAME)):
        folder, name = path, LORA_WEIGHT_NAME
    elif os.path.isfile(os.path.join(path, KOHYA_WEIGHT_NAME)):  # --lora_format kohya
        folder, name = path, KOHYA_WEIGHT_NAME
    elif os.path.isdir(path):
        raise UserFileNotFoundError(f"--lora {path}: no {LORA_WEIGHT_NAME} in it; pass the weights file itself")
    else:
        return pipe.load_lora_weights(path)  # a Hub id
    check_lora_family(pipe, path, os.path.join(folder, name))
    try:
        pipe.load_lora_weights(folder, weight_name=name)
    except (RuntimeError, ValueError) as error:
        if "size mismatch" not in str(error) and "shape" not in str(error):
            raise
        from safetensors import safe_open

        with safe_open(os.path.join(folder, name), "pt") as handle:
            metadata = handle.metadata() or {}
        trained_for = metadata.get("modelspec.architecture") or metadata.get("ss_base_model_version") or "unrecorded"
        base = "SDXL" if type(pipe).__name__ == "StableDiffusionXLPipeline" else "SD 1.x/2.x"
        raise UserError(f"--lora {path} does not fit --model ({base} {pipe.unet.config.cross_attention_dim}-wide "
                        f"cross-attention): its weights have other shapes; the file says it was trained for "
                        f"{trained_for}. Give the base model it was trained on.") from None


def check_lora_family(pipe, given: str, path: str) -> None:
    """A LoRA file for one model family loaded into another is refused by name (diffusers would load nothing, or
    fail on shapes): by the ModelSpec architecture in its metadata, else by its keys (SD3/FLUX files hold
    transformer.* keys, SD/SDXL ones unet.* / lora_unet_*)."""
    from safetensors import safe_open

    if not path.endswith(".safetensors") or not os.path.isfile(path):
        return
    with safe_open(path, "pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata() or {}
    pipe_class = type(pipe).__name__
    expected = LORA_ARCHITECTURES.get(pipe_class)
    architecture = metadata.get("modelspec.architecture")
    for_transformer = any(key.startswith("transformer.") for key in keys)
    unet_families = ("stable-diffusion-v", "stable-diffusion-xl")  # (SD vs SDXL: the shape check below names them)
    if architecture and expected:
        wrong = not architecture.startswith(expected) and not (architecture.startswith(unet_families)
                                                               and expected in unet_families)
    else:
        wrong = bool(keys) and for_transformer != (denoiser_name(pipe) == "transformer")
    if wrong:
        trained_for = architecture or ("a transformer (SD3/FLUX)" if for_transformer else "a UNet (SD/SDXL)")
        base = {"StableDiffusion3Pipeline": "an SD3", "FluxPipeline": "a FLUX.1", "Lumina2Pipeline": "a Lumina-2"}.get(
            pipe_class, "a Stable Diffusion 1.x/2.x/XL")
        raise UserError(f"--lora {given} is a LoRA for {trained_for}, and --model is {base} pipeline "
                        f"({pipe_class}): give the base model it was trained on.")


# ----------------------------------------------------------------------------------------------
# Sampling and saving
# ----------------------------------------------------------------------------------------------

@dataclass
class Job:
    """One image to make: prompt `prompt_index`, its `image_index`-th image, from noise seed `seed`."""
    prompt_index: int
    image_index: int
    prompt: str
    seed: int


def slugify(text: str, max_length: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:max_length].rstrip("-") or "prompt"


def png_metadata(settings: dict) -> PngInfo:
    """Each setting as a PNG tEXt/iTXt chunk (readable with PIL: `Image.open(path).text`)."""
    info = PngInfo()
    for key, value in settings.items():
        info.add_text(key, "" if value is None else str(value))  # falls back to iTXt for non-Latin-1 text
    info.add_text("parameters", json.dumps(settings, ensure_ascii=False))
    return info


def generate(pipe, jobs: list[Job], settings: dict, batch_size: int, output_dir: str,
             conditions: dict | None = None) -> list[tuple[Job, str, object]]:
    """Run the pipeline over `jobs` in batches; returns (job, png path, PIL image) in job order. `conditions`: more
    pipeline arguments for every batch (a ControlNet's image and scale)."""
    results = []
    scale = {"scale": settings["lora_scale"]} if settings.get("lora") else None
    accepted = inspect.signature(pipe.__call__).parameters  # the pipelines' names for the same thing (LoRA scale)
    name = next(n for n in ("cross_attention_kwargs", "joint_attention_kwargs", "attention_kwargs") if n in accepted)
    attention_kwargs = {name: scale}
    if "clean_caption" in accepted:  # DeepFloyd IF: the prompt as trained (its cleaner needs bs4 and ftfy)
        attention_kwargs["clean_caption"] = False
    with tqdm(total=len(jobs), desc="images", unit="img") as progress:
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start:start + batch_size]
            generators = [torch.Generator("cpu").manual_seed(job.seed) for job in batch]
            images = pipe(
                prompt=[job.prompt for job in batch],
                negative_prompt=[settings["negative_prompt"]] * len(batch) if settings["negative_prompt"] else None,
                num_inference_steps=settings["steps"],
                guidance_scale=settings["guidance_scale"],
                height=settings["height"],
                width=settings["width"],
                generator=generators,
                **attention_kwargs,
                **{key: [value] * len(batch) if isinstance(value, Image.Image) else value  # (IF: one image a prompt)
                   for key, value in (conditions or {}).items()},
            ).images
            for job, image in zip(batch, images):
                path = os.path.join(
                    output_dir, f"{job.prompt_index:03d}_{job.image_index:03d}_{slugify(job.prompt)}_seed{job.seed}.png"
                )
                image.save(path, pnginfo=png_metadata({"prompt": job.prompt, **settings, "seed": job.seed}))
                results.append((job, path, image))
            progress.update(len(batch))
    return results


def default_size(pipe) -> int:
    """The model's training resolution in pixels: the UNet's / transformer's latent sample_size x VAE downsampling
    factor (x the transformer's patch size already counted in SD3's sample_size)."""
    if getattr(pipe, "default_sample_size", None):  # SD3, FLUX pipelines: their own default (FLUX: 1024 px)
        return int(pipe.default_sample_size) * pipe.vae_scale_factor
    return int(pipe.unet.config.sample_size) * getattr(pipe, "vae_scale_factor", 1)  # (IF: pixel space)


def sd_main(args, device, dtype) -> list[str]:
    prompts = read_prompts(args)
    pipe, model_description, lora_source = load_pipeline(args, device, dtype)
    guidance = SD_GUIDANCE
    if denoiser_name(pipe) == "transformer":  # SD3, FLUX: a rectified flow, sampled with its own flow-matching Euler
        if args.scheduler is not None:
            raise UserError(f"--scheduler {args.scheduler}: an SD3 / FLUX model samples with its own flow-matching "
                            "Euler scheduler (FlowMatchEulerDiscreteScheduler); drop --scheduler.")
        scheduler = type(pipe.scheduler).__name__
        guidance = inspect.signature(pipe.__call__).parameters["guidance_scale"].default  # the pipeline's own
    else:
        scheduler = args.scheduler or "dpm++"
        if scheduler not in SCHEDULERS:
            raise UserError(f"--scheduler {scheduler} is for mask DiTs; Stable Diffusion takes one of "
                            f"{', '.join(SCHEDULERS)}")
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)

    seed = args.seed if args.seed is not None else random.randint(0, 2**31 - 1)
    size = default_size(pipe)
    settings = {
        "negative_prompt": args.negative_prompt,
        "steps": args.steps or STEP_PRESETS[args.preset],
        "scheduler": scheduler,
        "guidance_scale": args.guidance_scale if args.guidance_scale is not None else guidance,
        "height": args.height or size,
        "width": args.width or size,
        "model": model_description,
        "lora": lora_source,
        "lora_scale": args.lora_scale if lora_source else None,
        **({"controlnet": args.controlnet, "control_image": args.control_image,
            "controlnet_scale": args.controlnet_scale} if args.controlnet else {}),
        "dtype": str(dtype).replace("torch.", ""),
    }
    jobs = [Job(p, i, prompt, seed + i) for p, prompt in enumerate(prompts) for i in range(args.num_images)]
    print(f"Generating {len(jobs)} image(s) of {settings['height']}x{settings['width']} with {model_description}: "
          f"{settings['steps']} {scheduler} steps, guidance {settings['guidance_scale']}, seed {seed}, on {device} "
          f"({settings['dtype']}).")

    conditions = control_image(args, settings["height"], settings["width"], device, dtype) | upscaled_image(args, pipe)
    results = generate(pipe, jobs, settings, args.batch_size, args.output_dir, conditions)
    grid_path = os.path.join(args.output_dir, "grid.png")
    make_grid([image for _, _, image in results], columns=args.num_images if len(prompts) > 1 else None).save(grid_path)
    print(f"Saved {len(results)} image(s) and {grid_path}")
    return [path for _, path, _ in results] + [grid_path]


# ----------------------------------------------------------------------------------------------
# Mask DiT (train_mask_dit.py): one row of images per mask file
# ----------------------------------------------------------------------------------------------

def read_masks(path: str, mask_channels: int) -> list[tuple[str, torch.Tensor]]:
    """(file path, mask [1, mask_channels, h, w] in {0, 1}) for a mask image or every image in a folder."""
    from PIL import Image

    from utils.mask_dit.data import IMAGE_EXTENSIONS, mask_to_channels

    if os.path.isdir(path):
        files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise UserError(f"--mask {path}: no mask images ({', '.join(IMAGE_EXTENSIONS)}) in the folder")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise UserFileNotFoundError(f"--mask {path}: no such file or folder")
    masks = []
    for file in files:
        with Image.open(file) as image:
            array = mask_to_channels(np.asarray(image.convert("L")), mask_channels, file)
        masks.append((file, torch.from_numpy(array)[None]))
    return masks


def mask_dit_main(args, device, dtype) -> list[str]:
    """Sample --num_images images per mask; grid rows are [mask, image 0, image 1, ...]."""
    from utils.images import tensor_to_pil
    from utils.mask_dit.pipeline import generate_from_mask, load_mask_dit_pipeline, mask_to_rgb

    sampler = args.scheduler or "euler"
    if sampler not in MASK_DIT_SAMPLERS:
        raise UserError(f"--scheduler {sampler}: a mask DiT samples with {' or '.join(MASK_DIT_SAMPLERS)}")
    pipeline = load_mask_dit_pipeline(args.model, device=device, dtype=dtype)
    masks = read_masks(args.mask, pipeline.transformer.config.mask_channels)
    seed = args.seed if args.seed is not None else random.randint(0, 2**31 - 1)
    settings = {
        "prompt": args.prompt,
        "steps": args.steps or STEP_PRESETS[args.preset],
        "scheduler": sampler,
        "guidance_scale": args.guidance_scale if args.guidance_scale is not None else MASK_DIT_GUIDANCE,
        "mask_guidance_scale": args.mask_guidance_scale,
        "model": args.model,
        "dtype": str(dtype).replace("torch.", ""),
    }
    print(f"Generating {len(masks) * args.num_images} image(s) from {len(masks)} mask(s) with {args.model}: "
          f"{settings['steps']} {sampler} steps, seed {seed}, on {device} ({settings['dtype']}).")
    paths, tiles = [], []
    with tqdm(total=len(masks) * args.num_images, desc="images", unit="img") as progress:
        for mask_index, (mask_file, mask) in enumerate(masks):
            samples = []
            for image_index in range(args.num_images):  # one call per image: image i always comes from seed + i
                sample = generate_from_mask(pipeline, mask, prompt=args.prompt, steps=settings["steps"],
                                            guidance_scale=settings["guidance_scale"],
                                            mask_guidance_scale=args.mask_guidance_scale, seed=seed + image_index,
                                            sampler=sampler, height=args.height, width=args.width)
                samples.append(tensor_to_pil(sample * 2 - 1)[0])  # [1, 3, H, W] in [0, 1]
                progress.update(1)
            stem = os.path.splitext(os.path.basename(mask_file))[0]
            for image_index, image in enumerate(samples):
                path = os.path.join(
                    args.output_dir, f"{mask_index:03d}_{image_index:03d}_{slugify(stem)}_seed{seed + image_index}.png"
                )
                image.save(path, pnginfo=png_metadata({**settings, "mask": mask_file, "seed": seed + image_index}))
                paths.append(path)
            mask_rgb = torch.nn.functional.interpolate(mask_to_rgb(mask), size=samples[0].size[::-1], mode="nearest")
            tiles += tensor_to_pil(mask_rgb * 2 - 1) + samples
    grid_path = os.path.join(args.output_dir, "grid.png")
    make_grid(tiles, columns=args.num_images + 1).save(grid_path)
    print(f"Saved {len(paths)} image(s) and {grid_path}")
    return paths + [grid_path]


def main(argv=None) -> list[str]:
    """Generate the images; returns the saved paths (the per-image PNGs, then grid.png)."""
    args = parse_args(argv)
    quiet_empty_notices()
    device, dtype = pick_device_and_dtype(args.device, args.dtype)
    os.makedirs(args.output_dir, exist_ok=True)
    if args.model is not None and os.path.isdir(args.model) and is_mask_dit_dir(args.model):
        return mask_dit_main(args, device, dtype)
    if args.mask is not None:
        raise UserError(f"--mask needs a mask DiT as --model (train_mask_dit.py's output); {args.model} is not one")
    if args.export is not None:
        return [export_main(args, device)]
    return sd_main(args, device, dtype)


def export_main(args, device) -> str:
    """--export kohya: the LoRA weights converted (no base model needed); --export single_file: the loaded model."""
    if args.export == "kohya":
        source = args.lora or args.checkpoint
        folder = source if os.path.isdir(source) else os.path.dirname(os.path.abspath(source))
        path = export_kohya(source, args.export_path or os.path.join(folder, KOHYA_WEIGHT_NAME))
    else:
        pipe, description, lora_source = load_pipeline(args, device, torch.float32)
        if lora_source is not None:
            raise UserError("--export single_file writes a whole model; a LoRA exports with --export kohya.")
        path = save_single_file(args.export_path or os.path.join(args.output_dir, SINGLE_FILE_NAME), pipe.unet,
                                pipe.vae, pipe.text_encoder, args.single_file_dtype, {"base_model": description},
                                text_encoder_2=getattr(pipe, "text_encoder_2", None))
    print(f"Exported {path}")
    return path


if __name__ == "__main__":
    user_entry_point(main)
