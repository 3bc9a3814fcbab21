#!/usr/bin/env python
"""Train a ControlNet on a frozen Stable Diffusion 1.x/2.x or XL pipeline.

A drop-in for diffusers' examples/controlnet/train_controlnet.py and train_controlnet_sdxl.py: their flags with the
same names, defaults and meaning (--controlnet_model_name_or_path, --conditioning_image_column, --validation_image,
--proportion_empty_prompts, ...), checkpoint-N/ folders, the ControlNet in --output_dir. The trainer is
train_text_to_image.py's (the same main(): caches, buckets with the conditioning image cropped like its image,
EMA, every optimizer, exact resume, several processes, run record, report, val/loss, --validation_metrics); the
ControlNet is a model family of it (utils/families/controlnet.py). Conditioning images are RGB, or class-index masks
with --conditioning_num_classes K (one-hot, K channels).

    accelerate launch train_controlnet.py --pretrained_model_name_or_path PATH --dataset_name fusing/fill50k \\
        --resolution 512 --learning_rate 1e-5 --validation_image cond.png --validation_prompt "red circle" \\
        --output_dir controlnet-model
"""

from __future__ import annotations

import gc

if __name__ == "__main__":  # a command, not an import: no cyclic GC until its imports are done (user_entry_point)
    gc.disable()

import utils  # noqa: F401  (first: its log filter must be in place before diffusers/peft import bitsandbytes)

# isort: split

import train_text_to_image
from utils.errors import UserError, user_entry_point
from utils.sd.controlnet import CONTROLNET_DEFAULTS, add_controlnet_args
from utils.sd.model_kind import family_name

CONTROLNET_FAMILIES = {"sd": "sd-controlnet", "sdxl": "sdxl-controlnet"}


def parse_args(argv=None):
    parser = train_text_to_image.build_parser(__doc__.split("\n\n")[0])
    add_controlnet_args(parser)
    parser.set_defaults(**CONTROLNET_DEFAULTS)
    # diffusers' ControlNet scripts take several prompts under --validation_prompt (nargs="+"); they become ours
    # --validation_prompts, paired with --validation_image.
    parser._option_string_actions["--validation_prompt"].nargs = "+"
    args = train_text_to_image.resolve_args(parser, argv, family_of=controlnet_family)
    return args


def controlnet_family(args) -> str:
    """sd-controlnet or sdxl-controlnet, from the base pipeline's family (after the prompts are put together)."""
    if isinstance(args.validation_prompt, list):
        args.validation_prompts, args.validation_prompt = (args.validation_prompts or []) + args.validation_prompt, None
    base = family_name(args)
    if base not in CONTROLNET_FAMILIES:
        raise UserError(f"--pretrained_model_name_or_path is a {base} pipeline; train_controlnet.py trains ControlNets "
                        "for Stable Diffusion 1.x/2.x and XL (diffusers' train_controlnet_sd3.py / _flux.py cover "
                        "the others).")
    return CONTROLNET_FAMILIES[base]


main = train_text_to_image.main

if __name__ == "__main__":
    user_entry_point(main, parse_args)
