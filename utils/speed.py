"""Speed and memory flags shared by the scripts: --torch_compile, --channels_last, --gradient_checkpointing.
"""

from __future__ import annotations

import contextlib

import torch

from utils.errors import UserError


def add_speed_args(parser, gradient_checkpointing: bool = False) -> None:
    """--torch_compile and --channels_last (see docs/PERFORMANCE.md); --gradient_checkpointing for the trainers
    whose models support it."""
    if gradient_checkpointing:
        parser.add_argument("--gradient_checkpointing", action="store_true",
                            help="Whether or not to use gradient checkpointing to save memory at the "
                                 "expense of slower backward pass.")
    parser.add_argument("--torch_compile", action="store_true",
                        help="Compile the trained model with torch.compile (in place; the first steps are slow while it compiles).")
    parser.add_argument("--channels_last", action="store_true",
                        help="Keep the trained model in channels_last memory format: faster convolutions on GPUs with bf16/fp16.")


def apply_speedups(model: torch.nn.Module, args) -> torch.nn.Module:
    """channels_last and in-place torch.compile (the module object, its state_dict keys and hooks stay the same)."""
    if getattr(args, "channels_last", False):
        model.to(memory_format=torch.channels_last)
    if getattr(args, "torch_compile", False):
        if any(p.device.type == "xla" for p in model.parameters()):
            raise UserError("--torch_compile is for CUDA/CPU; on TPU (XLA) every step is already compiled as a graph: drop the flag.")
        model.compile()
    return model


def forward_autocast(accelerator, everywhere: bool = False):
    """The forward pass's mixed precision where accelerate leaves it to the script: under DeepSpeed, whose bf16/fp16
    mode casts the model's weights (not its inputs) and so needs autocast for fp32 inputs (the latents, the noise,
    the timesteps). Elsewhere accelerate's own autocast on the prepared model already applies: a no-op, or with
    `everywhere` (models called unwrapped, as validation does) accelerate's autocast."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return accelerator.autocast() if everywhere else contextlib.nullcontext()
    if accelerator.mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float16
    return torch.autocast(accelerator.device.type, dtype=dtype)
