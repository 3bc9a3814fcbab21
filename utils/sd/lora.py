"""LoRA adapters with peft, saved in the diffusers format `load_lora_weights` reads and, with
`--lora_format kohya|both`, in the kohya/AUTOMATIC1111 layout ComfyUI, A1111 and Forge load."""

from __future__ import annotations

import os

import torch

from utils.errors import MissingPackageError, UserError, UserFileNotFoundError

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"
LORA_FORMATS = ("diffusers", "kohya", "both")
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
    parser.add_argument("--lora_format", type=str, default="diffusers", choices=LORA_FORMATS,
                        help=f"The final LoRA weights: diffusers ({LORA_WEIGHT_NAME}, for load_lora_weights), kohya "
                             f"({KOHYA_WEIGHT_NAME}: lora_unet_*/lora_te_* keys with .alpha, for ComfyUI, "
                             "AUTOMATIC1111, Forge; diffusers' load_lora_weights reads it too) or both.")


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


def lora_state_dicts(unet, text_encoder=None, text_encoder_2=None) -> dict:
    """Adapter weights only, as `save_lora_weights` keyword arguments (diffusers key names)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    import inspect

    from diffusers import StableDiffusionPipeline

    layers = {"unet_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))}
    for name, model in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        if model is not None:
            layers[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
    # The adapter config (lora_alpha above all: without it a loader assumes alpha = rank, a wrong scale) goes into
    # the file's metadata where diffusers can write it (0.34+).
    if "unet_lora_adapter_metadata" in inspect.signature(StableDiffusionPipeline.save_lora_weights).parameters:
        for name, model in (("unet", unet), ("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
            if model is not None:
                layers[f"{name}_lora_adapter_metadata"] = model.peft_config["default"].to_dict()
    return layers


def save_lora(directory: str, unet, text_encoder=None, text_encoder_2=None, lora_format: str = "diffusers",
              metadata: dict | None = None):
    """The adapter weights in `directory`: the diffusers file and/or the kohya one (`lora_format`). SDXL: its second
    text encoder as text_encoder_2 (StableDiffusionXLPipeline.load_lora_weights reads the file)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    os.makedirs(directory, exist_ok=True)
    sdxl = unet.config.get("addition_embed_type") == "text_time"
    if lora_format in ("diffusers", "both"):
        pipeline_class = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
        pipeline_class.save_lora_weights(directory, **lora_state_dicts(unet, text_encoder, text_encoder_2),
                                         safe_serialization=True)
    if lora_format in ("kohya", "both"):
        save_kohya_lora(os.path.join(directory, KOHYA_WEIGHT_NAME), unet, text_encoder, text_encoder_2, metadata)
    return os.path.join(directory, LORA_WEIGHT_NAME if lora_format != "kohya" else KOHYA_WEIGHT_NAME)


def kohya_state_dict(unet, text_encoder=None, text_encoder_2=None) -> dict:
    """kohya/A1111 keys from the peft adapters of the models (see `kohya_from_peft`)."""
    from peft.utils import get_peft_model_state_dict

    peft_state = {}
    for name, model in (("unet", unet), ("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        if model is not None:
            peft_state.update({f"{name}.{k}": v for k, v in get_peft_model_state_dict(model).items()})
    return kohya_from_peft(peft_state, {"unet": _lora_alpha(unet), "text_encoder": _lora_alpha(text_encoder),
                                        "text_encoder_2": _lora_alpha(text_encoder_2)})


def kohya_from_peft(peft_state: dict, alphas: dict) -> dict:
    """kohya/A1111 keys (`lora_unet_<module path with _>.lora_down.weight`, `.lora_up.weight`, `.alpha`; the SD 1.x
    text encoder as `lora_te_...`, SDXL's two as `lora_te1_...`/`lora_te2_...`) from peft-format keys prefixed
    unet./text_encoder./text_encoder_2., by diffusers' own converter. Its `.alpha` is the rank; ours is each
    adapter's real lora_alpha (`alphas` by model name; None: keep the rank), so the kohya scale alpha/rank equals
    peft's."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    sdxl = any(key.startswith("text_encoder_2.") for key in peft_state)
    prefixes = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2",
                "lora_te_": "text_encoder"}
    kohya = {}
    for key, value in convert_state_dict_to_kohya(peft_state).items():
        if not sdxl:
            key = key.replace("lora_te1_", "lora_te_", 1)  # SD 1.x/2.x has one text encoder: kohya calls it lora_te
        for prefix in ("lora_te_", "lora_te1_", "lora_te2_"):  # transformers 5 dropped the CLIPTextModel
            if key.startswith(prefix) and not key.startswith(prefix + "text_model_"):  # .text_model level kohya names
                key = prefix + "text_model_" + key[len(prefix):]
        kohya[key] = value.detach().to("cpu").contiguous()
    for key in kohya:
        if key.endswith(".alpha"):
            model = next(name for prefix, name in prefixes.items() if key.startswith(prefix))
            if alphas.get(model) is not None:
                kohya[key] = torch.tensor(float(alphas[model]))
    return kohya


def export_kohya(source: str, path: str) -> str:
    """Convert a diffusers-format LoRA (our folder or its pytorch_lora_weights.safetensors) into the kohya file at
    `path`, with the lora_alpha its metadata records (none recorded: alpha = rank, what every loader then
    assumes). No base model is needed."""
    import json

    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft
    from safetensors import safe_open
    from safetensors.torch import save_file

    file = os.path.join(source, LORA_WEIGHT_NAME) if os.path.isdir(source) else source
    if not os.path.isfile(file):
        raise UserFileNotFoundError(f"--lora {source}: no {LORA_WEIGHT_NAME} to export (a diffusers-format LoRA "
                                    "folder or file)")
    with safe_open(file, "pt") as handle:
        metadata = handle.metadata() or {}
    adapter = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    state_dict, _ = StableDiffusionPipeline.lora_state_dict(os.path.dirname(os.path.abspath(file)),
                                                            weight_name=os.path.basename(file))
    peft_state = {}
    for prefix, convert in (("unet.", convert_unet_state_dict_to_peft), ("text_encoder.", convert_state_dict_to_peft),
                            ("text_encoder_2.", convert_state_dict_to_peft)):
        part = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        peft_state.update({prefix + k: v for k, v in (convert(part) if part else {}).items()})
    kohya = kohya_from_peft(peft_state, {name: adapter.get(f"{name}.lora_alpha")
                                         for name in ("unet", "text_encoder", "text_encoder_2")})
    info = {"ss_network_module": "networks.lora", "ss_training_comment": f"exported from {os.path.basename(file)}"}
    if "unet.r" in adapter:
        info.update(ss_network_dim=str(adapter["unet.r"]), ss_network_alpha=str(adapter.get("unet.lora_alpha")))
    save_file(kohya, path + ".tmp", metadata=info)
    os.replace(path + ".tmp", path)
    return path


def _lora_alpha(model):
    return None if model is None else model.peft_config["default"].lora_alpha


def save_kohya_lora(path: str, unet, text_encoder=None, text_encoder_2=None, metadata: dict | None = None) -> None:
    """The kohya file with kohya's `ss_*` metadata (all strings, as safetensors requires)."""
    from safetensors.torch import save_file

    config = unet.peft_config["default"]
    info = {"ss_network_module": "networks.lora", "ss_network_dim": str(config.r),
            "ss_network_alpha": str(config.lora_alpha), "ss_training_comment": "train_text_to_image.py"}
    info.update({k: str(v) for k, v in (metadata or {}).items() if v is not None})
    save_file(kohya_state_dict(unet, text_encoder, text_encoder_2), path, metadata=info)


def load_lora_into(directory: str, unet, text_encoder=None, text_encoder_2=None) -> None:
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
    for prefix, model in (("text_encoder.", text_encoder), ("text_encoder_2.", text_encoder_2)):
        if model is not None:
            _set_state_dict_into_text_encoder(state_dict, prefix=prefix, text_encoder=model)


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
