"""LoRA adapters with peft, saved in the diffusers format `load_lora_weights` reads."""

from __future__ import annotations

import os

import torch

from utils.errors import MissingPackageError, UserError

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
DEFAULT_UNET_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
DEFAULT_TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def add_lora_args(parser) -> None:
    parser.add_argument("--use_lora", action="store_true",
                        help="Train LoRA adapters instead of the full UNet (what diffusers' train_text_to_image_lora.py does).")
    parser.add_argument("--rank", type=int, default=4, help="The dimension of the LoRA update matrices.")
    parser.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (scale = alpha / rank). Default: --rank.")
    parser.add_argument("--lora_dropout", type=float, default=0.0, help="Dropout on the LoRA branch.")
    parser.add_argument("--lora_target_modules", type=str, nargs="+", default=None,
                        help=f"Module names to adapt in the UNet (default: {' '.join(DEFAULT_UNET_TARGETS)}).")


def check_text_encoder_lora_support() -> None:
    """Refuse, with both versions named, a transformers that needs a newer peft than the installed one.

    transformers >= 5.24 requires peft >= 0.22 for `add_adapter` (its MIN_PEFT_VERSION), and
    otherwise fails deep inside the call with a ValueError; the lock pins transformers below it.
    """
    from importlib.metadata import version

    from packaging.version import Version

    try:
        from transformers.integrations.peft import MIN_PEFT_VERSION
    except ImportError:
        return
    installed_peft, installed_transformers = version("peft"), version("transformers")
    if Version(installed_peft) < Version(MIN_PEFT_VERSION):
        raise MissingPackageError(
            f"--use_lora --train_text_encoder: transformers {installed_transformers} needs peft >= {MIN_PEFT_VERSION} "
            f"for text-encoder LoRA, but peft {installed_peft} is installed. Install the tested versions with "
            f"`make setup` (requirements.lock), or `pip install 'transformers<5.24'`, or a newer peft when one exists."
        )


def add_lora_adapter(model: torch.nn.Module, args, targets) -> None:
    """Freeze `model` and add a trainable LoRA adapter (gaussian init, so training starts at the base model)."""
    from peft import LoraConfig

    config = LoraConfig(
        r=args.rank,
        lora_alpha=args.lora_alpha if args.lora_alpha is not None else args.rank,
        lora_dropout=args.lora_dropout,
        init_lora_weights="gaussian",
        target_modules=list(targets),
    )
    model.add_adapter(config)


def lora_state_dicts(unet, text_encoder=None) -> dict:
    """Adapter weights only, as `save_lora_weights` keyword arguments (diffusers key names)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = {"unet_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))}
    if text_encoder is not None:
        layers["text_encoder_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder))
    return layers


def save_lora(directory: str, unet, text_encoder=None) -> str:
    from diffusers import StableDiffusionPipeline

    os.makedirs(directory, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(directory, **lora_state_dicts(unet, text_encoder), safe_serialization=True)
    return os.path.join(directory, LORA_WEIGHT_NAME)


def load_lora_into(directory: str, unet, text_encoder=None) -> None:
    """Load adapter weights saved by `save_lora` into models that already carry an adapter."""
    from diffusers import StableDiffusionPipeline
    from diffusers.training_utils import _set_state_dict_into_text_encoder
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    state_dict, _ = StableDiffusionPipeline.lora_state_dict(directory)
    unet_state = convert_unet_state_dict_to_peft({k[len("unet."):]: v for k, v in state_dict.items() if k.startswith("unet.")})
    result = set_peft_model_state_dict(unet, unet_state, adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise UserError(f"{directory}: LoRA weights do not match the UNet adapter (unexpected keys: {unexpected[:5]})")
    if text_encoder is not None:
        _set_state_dict_into_text_encoder(state_dict, prefix="text_encoder.", text_encoder=text_encoder)


def lora_checkpoint_check(args):
    """`resume_position`'s check: a LoRA run resumes LoRA checkpoints only, a full fine-tune full ones."""
    def check(path: str) -> None:
        has_lora = os.path.isfile(os.path.join(path, LORA_WEIGHT_NAME))
        has_unet = os.path.isdir(os.path.join(path, "unet"))
        if args.use_lora and not has_lora and has_unet:
            raise UserError(f"--resume_from_checkpoint {path} is a full fine-tune checkpoint (unet/, no {LORA_WEIGHT_NAME}) "
                            "and this run has --use_lora: drop --use_lora to continue it, or start the LoRA run in "
                            "a new --output_dir.")
        if not args.use_lora and has_lora and not has_unet:
            raise UserError(f"--resume_from_checkpoint {path} is a LoRA checkpoint ({LORA_WEIGHT_NAME}): add --use_lora "
                            "(with the same --rank) to continue it.")
    return check
