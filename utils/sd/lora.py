"""LoRA adapters with peft, saved in the diffusers format `load_lora_weights` reads and, with
`--lora_format kohya|both`, in the kohya/AUTOMATIC1111 layout ComfyUI, A1111 and Forge load."""

from __future__ import annotations

import json
import logging
import os

import torch

from utils.atomic import atomic_file
from utils.errors import MissingPackageError, UserError, UserFileNotFoundError
from utils.sd.lycoris import (ADAPTER_FOLDER, LYCORIS_TYPES, adapter_modules, check_lycoris_args, has_peft_adapters,
                              load_peft_adapters, lycoris_config, lycoris_state_dict, save_peft_adapters)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"
LORA_FORMATS = ("diffusers", "kohya", "both")
LORA_TYPES = ("lora", "dora", "loha", "lokr")
logger = logging.getLogger(__name__)
DEFAULT_UNET_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
DEFAULT_TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def add_lora_args(parser) -> None:
    parser.add_argument("--use_lora", action="store_true",
                        help="Train LoRA adapters instead of the full UNet (what diffusers' train_text_to_image_lora.py does).")
    parser.add_argument("--rank", type=int, default=4, help="The dimension of the LoRA update matrices.")
    parser.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (scale = alpha / rank). Default: --rank.")
    parser.add_argument("--lora_dropout", type=float, default=0.0, help="Dropout on the LoRA branch.")
    parser.add_argument("--lora_type", type=str, default="lora", choices=LORA_TYPES,
                        help="The adapter, all through peft: lora; dora (weight-decomposed LoRA: better at low rank, "
                             "~2x slower steps); loha (LyCORIS Hadamard product: more expressive per parameter, good "
                             "for styles); lokr (LyCORIS Kronecker product: smallest files). loha/lokr are saved as "
                             "peft adapter folders and a LyCORIS kohya file (ComfyUI, A1111), not diffusers' format.")
    parser.add_argument("--use_dora", action="store_true", default=False,
                        help="= --lora_type dora (diffusers' DreamBooth flag).")
    parser.add_argument("--lora_target_modules", type=str, nargs="+", default=None,
                        help=f"Module names to adapt in the UNet (default: {' '.join(DEFAULT_UNET_TARGETS)}).")
    parser.add_argument("--lora_format", type=str, default="both", choices=LORA_FORMATS,
                        help=f"The final LoRA weights: diffusers ({LORA_WEIGHT_NAME}, for load_lora_weights), kohya "
                             f"({KOHYA_WEIGHT_NAME}: lora_unet_*/lora_te_* keys with .alpha, for ComfyUI, "
                             "AUTOMATIC1111, Forge, which ignore the diffusers file; diffusers' "
                             "load_lora_weights reads it too) or both (default: every tool finds its file).")


def check_lora_args(args) -> None:
    """What a LoRA run does not combine with (each refused with the reason)."""
    if not args.use_lora:
        if args.lora_type != "lora" or args.use_dora:
            raise UserError(f"--lora_type {lora_type_of(args)} is an adapter type: add --use_lora.")
        return
    check_lycoris_args(lora_type_of(args), args.rank)
    if args.save_single_file:
        raise UserError("--save_single_file writes a whole model; a LoRA run's weights for ComfyUI / AUTOMATIC1111 / "
                        "Forge are --lora_format kohya (or both).")
    if args.use_ema:
        raise UserError(
            "--use_ema with --use_lora is not supported: EMA of LoRA adapters is not what diffusers' scripts do."
        )
    if args.train_vae:
        raise UserError("--train_vae trains a VAE from scratch; it cannot be combined with --use_lora.")
    if args.train_text_encoder:
        check_text_encoder_lora_support()


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


def lora_type_of(args) -> str:
    """--lora_type, with diffusers' --use_dora as dora."""
    if args.use_dora and args.lora_type not in ("lora", "dora"):
        raise UserError(f"--use_dora means --lora_type dora; it cannot go with --lora_type {args.lora_type}.")
    return "dora" if args.use_dora else args.lora_type


def add_lora_adapter(model: torch.nn.Module, args, targets) -> None:
    """Freeze `model` and add a trainable adapter of --lora_type (initialised so training starts at the base
    model: LoRA's gaussian A and zero B; LoHa/LoKr peft's own zero-update init)."""
    from peft import LoraConfig

    lora_type, alpha = lora_type_of(args), args.lora_alpha if args.lora_alpha is not None else args.rank
    if lora_type in LYCORIS_TYPES:
        config = lycoris_config(lora_type, args.rank, alpha, args.lora_dropout, targets)
    else:
        config = LoraConfig(r=args.rank, lora_alpha=alpha, lora_dropout=args.lora_dropout,
                            init_lora_weights="gaussian", target_modules=list(targets), use_dora=lora_type == "dora")
    model.add_adapter(config)


def adapter_type(model) -> str:
    """The model's adapter as a --lora_type name (lora for LoRA and DoRA alike: saved the same way)."""
    return str(model.peft_config["default"].peft_type.value).lower()


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
    if adapter_type(unet) in LYCORIS_TYPES:
        return save_lycoris(directory, unet, text_encoder, text_encoder_2, lora_format, metadata)
    sdxl = unet.config.get("addition_embed_type") == "text_time"
    if lora_format in ("diffusers", "both"):
        pipeline_class = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
        pipeline_class.save_lora_weights(directory, **lora_state_dicts(unet, text_encoder, text_encoder_2),
                                         safe_serialization=True)
        if metadata:  # the same ss_*/modelspec keys as the kohya file, so an export can copy them
            add_file_metadata(os.path.join(directory, LORA_WEIGHT_NAME), {k: str(v) for k, v in metadata.items()})
    if lora_format in ("kohya", "both"):
        save_kohya_lora(os.path.join(directory, KOHYA_WEIGHT_NAME), unet, text_encoder, text_encoder_2, metadata)
    return os.path.join(directory, LORA_WEIGHT_NAME if lora_format != "kohya" else KOHYA_WEIGHT_NAME)


# Stability's ModelSpec ids (github.com/Stability-AI/ModelSpec) and kohya's ss_base_model_version names
# (sd-scripts library/sai_model_spec.py, model_util.get_model_version_str_for_sd1_sd2), which A1111, Forge and
# ComfyUI's LoRA lists read to file a LoRA under its base model.
_ARCHITECTURES = {"sd_v1": "stable-diffusion-v1", "sd_v2": "stable-diffusion-v2-512",
                  "sd_v2_v": "stable-diffusion-v2-768-v", "sdxl_base_v1-0": "stable-diffusion-xl-v1-base",
                  "sd3": "stable-diffusion-3",  # (kohya's ARCH_SD3_UNKNOWN: medium, large and 3.5 alike)
                  "flux1": "flux-1",  # (kohya's ARCH_FLUX_1_UNKNOWN: dev and schnell alike)
                  "lumina2": "lumina-2"}  # (kohya's ARCH_LUMINA_2)
_IMPLEMENTATIONS = {"flux1": "https://github.com/black-forest-labs/flux",
                    "lumina2": "https://github.com/Alpha-VLLM/Lumina-Image-2.0"}
_SDXL_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"


def base_model_version(sdxl: bool, cross_attention_dim, prediction_type: str | None) -> str:
    """kohya's name of the base model family: sdxl_base_v1-0, or sd_v1 / sd_v2 (+ `_v` for v-prediction)."""
    if isinstance(cross_attention_dim, (list, tuple)):
        cross_attention_dim = cross_attention_dim[0]
    if sdxl:
        return "sdxl_base_v1-0"
    version = "sd_v2" if cross_attention_dim == 1024 else "sd_v1"
    return version + ("_v" if prediction_type == "v_prediction" and version == "sd_v2" else "")


def lora_file_metadata(version: str, resolution: int | None, title: str, prediction_type: str | None = None,
                       extra: dict | None = None) -> dict:
    """The metadata both LoRA files carry (training and `generate.py --export kohya` write the same): kohya's
    `ss_*` keys and Stability's `modelspec.*` keys, all strings (safetensors' rule)."""
    import datetime

    stability = version.startswith(("sdxl", "sd3"))  # Stability's own reference implementation
    info = {"ss_network_module": "networks.lora", "ss_base_model_version": version,
            "ss_v2": str(version.startswith("sd_v2")), "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": f"{_ARCHITECTURES[version]}/lora",
            "modelspec.implementation": _IMPLEMENTATIONS.get(version, _SDXL_IMPLEMENTATION if stability else "diffusers"),
            "modelspec.title": title, "modelspec.date": datetime.date.today().isoformat()}
    if resolution:
        info.update({"ss_resolution": f"({resolution}, {resolution})",
                     "modelspec.resolution": f"{resolution}x{resolution}"})
    if prediction_type:
        info["modelspec.prediction_type"] = "v" if prediction_type == "v_prediction" else "epsilon"
    info.update({k: str(v) for k, v in (extra or {}).items() if v is not None})
    return info


def guess_base_model_version(state_dict: dict) -> str | None:
    """A LoRA written elsewhere (no metadata): the family from the cross-attention width its to_k/to_v adapters
    read (768 SD1, 1024 SD2, 2048 SDXL) or a second text encoder; None when it matches none of them."""
    if any(key.startswith("text_encoder_2.") for key in state_dict):
        return "sdxl_base_v1-0"
    for key, value in state_dict.items():
        if "attn2" in key and ("to_k" in key or "to_v" in key) and ("lora_A" in key or "lora.down" in key):
            return {768: "sd_v1", 1024: "sd_v2", 2048: "sdxl_base_v1-0"}.get(int(value.shape[-1]))
    return None


def add_file_metadata(path: str, metadata: dict) -> None:
    """Rewrite the safetensors file at `path` (atomically) with `metadata` added to what it has."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(path, "pt") as handle:
        merged = dict(handle.metadata() or {})
    merged.update(metadata)
    tensors = load_file(path)
    with atomic_file(path) as temp:
        save_file(tensors, temp, metadata=merged)


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


def kohya_module_names(modules: list[str]) -> dict[str, str]:
    """{`unet.down_blocks.0....to_q`: `lora_unet_down_blocks_0_..._to_q`}: the names kohya_from_peft gives the same
    modules' LoRA tensors (diffusers' converter), so LoRA and LyCORIS files name a module alike."""
    dummy = {f"{module}.lora_A.weight": torch.tensor([[float(i)]]) for i, module in enumerate(modules)}
    names = {}
    for key, value in kohya_from_peft(dummy, {}).items():
        if key.endswith(".lora_down.weight"):
            names[modules[int(value.item())]] = key[:-len(".lora_down.weight")]
    return names


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
    info = {k: v for k, v in metadata.items() if k.startswith(("ss_", "modelspec."))}  # what training recorded
    version = info.get("ss_base_model_version") or guess_base_model_version(state_dict)
    if "modelspec.architecture" not in info and version is not None:  # a diffusers LoRA written elsewhere
        info.update(lora_file_metadata(version, None, os.path.splitext(os.path.basename(path))[0]))
    elif version is None:
        logger.warning(f"{file}: no recorded base model and an unknown cross-attention width; the exported file "
                       "has no ss_base_model_version / modelspec.architecture, so UI tools may not list it.")
    info.update(ss_network_module="networks.lora", ss_training_comment=f"exported from {os.path.basename(file)}")
    if "unet.r" in adapter:
        info.update(ss_network_dim=str(adapter["unet.r"]), ss_network_alpha=str(adapter.get("unet.lora_alpha")))
    with atomic_file(path) as temp:
        save_file(kohya, temp, metadata=info)
    return path


def _lora_alpha(model):
    return None if model is None else model.peft_config["default"].lora_alpha


def write_kohya_file(path: str, tensors: dict, metadata: dict | None, network: dict) -> None:
    """A kohya-layout file, atomically, with the run's metadata and kohya's `ss_network_*` keys (`network`), all
    strings as safetensors requires."""
    from safetensors.torch import save_file

    info = {k: str(v) for k, v in (metadata or {}).items() if v is not None}
    info.update({k: str(v) for k, v in network.items()}, ss_training_comment="train_text_to_image.py")
    with atomic_file(path) as temp:
        save_file(tensors, temp, metadata=info)


def save_kohya_lora(path: str, unet, text_encoder=None, text_encoder_2=None, metadata: dict | None = None) -> None:
    """The kohya file with kohya's `ss_*` metadata."""
    config = unet.peft_config["default"]
    write_kohya_file(path, kohya_state_dict(unet, text_encoder, text_encoder_2), metadata, {
        "ss_network_module": "networks.lora", "ss_network_dim": config.r, "ss_network_alpha": config.lora_alpha})


def save_lycoris(directory: str, unet, text_encoder, text_encoder_2, lora_format: str, metadata: dict | None):
    """LoHa/LoKr: the peft adapter folders, and with --lora_format kohya|both the LyCORIS file (utils/sd/lycoris.py)."""
    from peft.utils import get_peft_model_state_dict

    models = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    save_peft_adapters(directory, models)
    if lora_format == "diffusers":
        return os.path.join(directory, ADAPTER_FOLDER.format("unet"))
    config, kind = unet.peft_config["default"], adapter_type(unet)
    peft_state = {f"{name}.{k}": v for name, model in models.items() if model is not None
                  for k, v in get_peft_model_state_dict(model).items()}
    names = kohya_module_names(adapter_modules(peft_state, kind))
    path = os.path.join(directory, KOHYA_WEIGHT_NAME)
    write_kohya_file(path, lycoris_state_dict(peft_state, kind, config.r, config.alpha, names), metadata, {
        "ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": kind}),
        "ss_network_dim": config.r, "ss_network_alpha": config.alpha})
    return path


def is_lycoris_file(path: str) -> bool:
    from safetensors import safe_open

    with safe_open(path, "pt") as handle:
        return any(".hada_" in key or ".lokr_" in key for key in handle.keys())


def load_lycoris_file(path: str, models: dict) -> None:
    """A LyCORIS LoHa/LoKr file in kohya's layout (ours, or another tool's) into `models` ({"unet": ..., ...}) as
    peft adapters with the same update: ranks from the tensors, alpha per module; a LoKr module with both factors
    full (LyCORIS applies no alpha there) gets alpha = rank, so peft's alpha / rank is 1 too."""
    import torch.nn as nn
    from peft import LoHaConfig, LoKrConfig
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    tensors = load_file(path)
    loha = any(".hada_" in key for key in tensors)
    paths = {f"{name}.{module}": (name, module) for name, model in models.items() if model is not None
             for module, layer in model.named_modules() if isinstance(layer, nn.Linear)}
    by_kohya = {kohya: paths[full] for full, kohya in kohya_module_names(list(paths)).items()}
    grouped: dict[str, dict] = {}
    for key, value in tensors.items():
        module, _, tensor = key.partition(".")
        if module not in by_kohya:
            raise UserError(f"--lora {path}: {module} is no layer of this model (a LoRA for another base model?).")
        grouped.setdefault(module, {})[tensor] = value
    per_model: dict[str, dict] = {}
    for kohya, parts in grouped.items():
        name, module = by_kohya[kohya]
        entry = per_model.setdefault(name, {"ranks": {}, "alphas": {}, "state": {}, "both": False})
        low_rank = parts.get("hada_w1_b", parts.get("lokr_w2_b", parts.get("lokr_w1_b")))
        layer = models[name].get_submodule(module)
        rank = low_rank.shape[0] if low_rank is not None else max(layer.in_features, layer.out_features)
        alpha = float(parts["alpha"]) if low_rank is not None and "alpha" in parts else float(rank)
        entry["ranks"][module], entry["alphas"][module] = rank, alpha
        entry["both"] |= "lokr_w1_a" in parts
        entry["state"].update({f"{module}.{k}": v for k, v in parts.items() if k != "alpha"})
    for name, entry in per_model.items():
        targets = sorted(entry["ranks"])
        options = dict(r=entry["ranks"][targets[0]], alpha=entry["alphas"][targets[0]], target_modules=targets,
                       rank_pattern={f"^{m}$": r for m, r in entry["ranks"].items()},
                       alpha_pattern={f"^{m}$": a for m, a in entry["alphas"].items()})
        config = LoHaConfig(**options) if loha else LoKrConfig(**options, decompose_both=entry["both"])
        models[name].add_adapter(config)
        result = set_peft_model_state_dict(models[name], entry["state"], adapter_name="default")
        if getattr(result, "unexpected_keys", None):
            raise UserError(f"--lora {path}: tensors that do not fit the {name}: {result.unexpected_keys[:5]}")


def load_lora_into(directory: str, unet, text_encoder=None, text_encoder_2=None) -> None:
    """Load adapter weights saved by `save_lora` into models that already carry an adapter."""
    from diffusers import StableDiffusionPipeline

    if has_peft_adapters(directory):  # LoHa / LoKr
        return load_peft_adapters(directory, {"unet": unet, "text_encoder": text_encoder,
                                              "text_encoder_2": text_encoder_2})
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
        has_lora = os.path.isfile(os.path.join(path, LORA_WEIGHT_NAME)) or has_peft_adapters(path)
        has_unet = os.path.isdir(os.path.join(path, "unet"))
        if args.use_lora and not has_lora and has_unet:
            raise UserError(f"--resume_from_checkpoint {path} is a full fine-tune checkpoint (unet/, no {LORA_WEIGHT_NAME}) "
                            "and this run has --use_lora: drop --use_lora to continue it, or start the LoRA run in "
                            "a new --output_dir.")
        if not args.use_lora and has_lora and not has_unet:
            raise UserError(f"--resume_from_checkpoint {path} is a LoRA checkpoint ({LORA_WEIGHT_NAME}): add --use_lora "
                            "(with the same --rank) to continue it.")
    return check
