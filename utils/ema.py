"""Exponential moving average of weights, on diffusers' `EMAModel`.

For diffusers models the EMA is stored the way diffusers' examples store it
(`checkpoint-N/unet_ema/` with config + safetensors, loadable as a normal model); for any
other module (MSHNet, for example) the shadow weights go to `ema.safetensors` and the
EMA counters to `ema_state.json`.
"""

from __future__ import annotations

import contextlib
import json
import os

import torch
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file


def add_ema_args(parser) -> None:
    """The EMA flags of diffusers' train_text_to_image.py, same names and defaults."""
    parser.add_argument("--use_ema", action="store_true", help="Whether to use EMA model.")
    parser.add_argument(
        "--offload_ema", action="store_true", help="Offload EMA model to CPU during training step."
    )
    parser.add_argument("--foreach_ema", action="store_true", help="Use faster foreach implementation of EMAModel.")
    parser.add_argument("--ema_decay", type=float, default=0.9999, help="EMA decay (maximum, with warmup).")
    parser.add_argument(
        "--ema_min_decay", type=float, default=0.0, help="Lower bound of the EMA decay during warmup."
    )
    parser.add_argument(
        "--ema_use_warmup",
        action="store_true",
        help="Warm the decay up as 1 - (1 + step / inv_gamma) ** -power instead of (1 + step) / (10 + step).",
    )
    parser.add_argument("--ema_inv_gamma", type=float, default=1.0, help="EMA warmup inverse multiplicative factor.")
    parser.add_argument("--ema_power", type=float, default=2 / 3, help="EMA warmup exponential factor.")


def create_ema(model: torch.nn.Module, args) -> EMAModel:
    """An EMAModel tracking `model`'s parameters, configured by the `add_ema_args` flags."""
    diffusers_model = hasattr(model, "config") and hasattr(type(model), "from_config")
    ema = EMAModel(
        model.parameters(),
        decay=args.ema_decay,
        min_decay=args.ema_min_decay,
        use_ema_warmup=args.ema_use_warmup,
        inv_gamma=args.ema_inv_gamma,
        power=args.ema_power,
        foreach=args.foreach_ema,
        model_cls=type(model) if diffusers_model else None,
        model_config=model.config if diffusers_model else None,
    )
    return ema


def place_ema(ema: EMAModel | None, device, offload: bool = False) -> EMAModel | None:
    """Put the shadow weights on `device`, or on the CPU with --offload_ema (pinned when CUDA can use that)."""
    if ema is None:
        return None
    ema.to("cpu" if offload else device)
    if offload and torch.cuda.is_available():
        ema.pin_memory()
    return ema


def ema_step(ema: EMAModel | None, parameters, device, offload: bool = False) -> None:
    """One EMA update after an optimizer step (an offloaded EMA visits `device` for it)."""
    if ema is None:
        return
    if offload:
        ema.to(device, non_blocking=True)
    ema.step(parameters)
    if offload:
        ema.to("cpu", non_blocking=True)


@contextlib.contextmanager
def ema_weights(ema: EMAModel | None, parameters):
    """Inside the block the model holds the EMA weights (for validation); the trained ones come back after.
    A no-op without an EMA."""
    if ema is None:
        yield
        return
    parameters = list(parameters)
    ema.store(parameters)
    ema.copy_to(parameters)
    try:
        yield
    finally:
        ema.restore(parameters)


def ema_checkpoint_hooks(ema: EMAModel | None, name: str) -> dict:
    """`register_checkpoint_hooks` keyword arguments that save/load the EMA as checkpoint-N/<name>."""
    if ema is None:
        return {}
    return {"extra_savers": {name: lambda path: save_ema(ema, path)},
            "extra_loaders": {name: lambda path: load_ema(ema, path)}}


def save_ema(ema: EMAModel, directory: str) -> None:
    if ema.model_cls is not None:
        ema.save_pretrained(directory)
        return
    os.makedirs(directory, exist_ok=True)
    state = ema.state_dict()
    shadow = state.pop("shadow_params")
    save_file({f"shadow.{i}": p.detach().contiguous().cpu() for i, p in enumerate(shadow)}, os.path.join(directory, "ema.safetensors"))
    with open(os.path.join(directory, "ema_state.json"), "w", encoding="utf-8") as handle:
        json.dump(state, handle)


def load_ema(ema: EMAModel, directory: str) -> None:
    """Restore `ema` in place from `save_ema`'s output (device of the current shadow weights kept)."""
    device = ema.shadow_params[0].device if ema.shadow_params else torch.device("cpu")
    if ema.model_cls is not None:
        loaded = EMAModel.from_pretrained(directory, model_cls=ema.model_cls, foreach=ema.foreach)
        ema.load_state_dict(loaded.state_dict())
        del loaded
    else:
        tensors = load_file(os.path.join(directory, "ema.safetensors"))
        with open(os.path.join(directory, "ema_state.json"), encoding="utf-8") as handle:
            state = json.load(handle)
        state["shadow_params"] = [tensors[f"shadow.{i}"] for i in range(len(tensors))]
        ema.load_state_dict(state)
    ema.to(device)
