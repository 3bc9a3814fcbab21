"""LoHa and LoKr (the LyCORIS adapters) through peft's own LoHaConfig / LoKrConfig (`--lora_type loha|lokr`):
saved as peft adapter folders (`unet_adapter/`, `text_encoder_adapter/`: adapter_config.json +
adapter_model.safetensors, what peft and generate.py load) and, for ComfyUI / AUTOMATIC1111, as one file in
LyCORIS's kohya key layout (`lora_unet_<module>.hada_w1_a`, `.hada_w1_b`, `.hada_w2_a`, `.hada_w2_b`, `.alpha`;
`.lokr_w1[_a/_b]`, `.lokr_w2[_a/_b]`, `.alpha`). diffusers' `load_lora_weights` reads neither kind.

The update each one adds to a weight W (LyCORIS's definitions, as peft computes them, scale = alpha / rank):
    LoHa: dW = scale * (w1_a @ w1_b) * (w2_a @ w2_b)          (Hadamard product of two low-rank matrices)
    LoKr: dW = scale * kron(w1, w2), w1 = w1_a @ w1_b and w2 = w2_a @ w2_b where factored
LyCORIS readers apply alpha / rank only when a LoKr factor is low-rank and 1 otherwise, so a LoKr module whose
w1 and w2 are both full is written with peft's scale folded into w2 (its `.alpha` then equals the rank)."""

from __future__ import annotations

import json
import os

import torch

from utils.atomic import atomic_file, write_json_atomic
from utils.errors import UserError, UserFileNotFoundError

LYCORIS_TYPES = ("loha", "lokr")
ADAPTER_FOLDER = "{}_adapter"  # unet_adapter/, text_encoder_adapter/, text_encoder_2_adapter/
LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


def lycoris_config(lora_type: str, rank: int, alpha: float, dropout: float, targets):
    """peft's config for --lora_type loha|lokr (`dropout`: peft's module dropout, the LyCORIS meaning)."""
    from peft import LoHaConfig, LoKrConfig

    config_class = LoHaConfig if lora_type == "loha" else LoKrConfig
    return config_class(r=rank, alpha=alpha, module_dropout=dropout, target_modules=list(targets),
                        init_weights=True)


def check_lycoris_args(lora_type: str, rank: int) -> None:
    if lora_type in LYCORIS_TYPES and rank < 1:
        raise UserError(f"--lora_type {lora_type} --rank {rank}: the rank must be a positive integer.")


def _modules(peft_state: dict, suffixes) -> dict[str, dict[str, torch.Tensor]]:
    """{module path: {tensor name: tensor}} of the adapter tensors of one kind."""
    modules: dict[str, dict] = {}
    for key, value in peft_state.items():
        module, _, name = key.rpartition(".")
        if name in suffixes:
            modules.setdefault(module, {})[name] = value
    return modules


def adapter_modules(peft_state: dict, lora_type: str) -> list[str]:
    """The module paths that carry LoHa/LoKr tensors in `peft_state`."""
    return list(_modules(peft_state, LOHA_KEYS if lora_type == "loha" else LOKR_KEYS))


def lycoris_state_dict(peft_state: dict, lora_type: str, rank: int, alpha: float, names: dict[str, str]) -> dict:
    """The LyCORIS kohya-layout tensors of peft LoHa/LoKr adapters (`peft_state`: keys prefixed unet./text_encoder./
    text_encoder_2.; `names`: each module's kohya name), each module with its `.alpha`."""
    scale = alpha / rank
    out = {}
    modules = _modules(peft_state, LOHA_KEYS if lora_type == "loha" else LOKR_KEYS)
    for module, tensors in modules.items():
        name = names[module]
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
        module_alpha = float(alpha)
        if lora_type == "lokr" and "lokr_w1" in tensors and "lokr_w2" in tensors:  # both full: no alpha applied
            tensors["lokr_w2"] = tensors["lokr_w2"] * scale
            module_alpha = float(rank)
        out.update({f"{name}.{k}": v for k, v in tensors.items()})
        out[f"{name}.alpha"] = torch.tensor(module_alpha)
    return out


def save_peft_adapters(directory: str, models: dict) -> None:
    """Each model's adapter as `<name>_adapter/` (peft's adapter_config.json + adapter_model.safetensors)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    for name, model in models.items():
        if model is None:
            continue
        folder = os.path.join(directory, ADAPTER_FOLDER.format(name))
        os.makedirs(folder, exist_ok=True)
        config = model.peft_config["default"].to_dict()
        config["target_modules"] = sorted(config["target_modules"])  # (a set in peft)
        write_json_atomic(os.path.join(folder, "adapter_config.json"), config)
        state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
        with atomic_file(os.path.join(folder, "adapter_model.safetensors")) as temp:
            save_file(state, temp)


def has_peft_adapters(directory: str) -> bool:
    """A LoHa/LoKr run's folder: the denoiser's peft adapter (unet_adapter/, or transformer_adapter/ for SD3, FLUX.1,
    Lumina-2)."""
    return any(os.path.isfile(os.path.join(directory, ADAPTER_FOLDER.format(name), "adapter_config.json"))
               for name in ("unet", "transformer"))


def adapter_config_from(folder: str):
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    with open(os.path.join(folder, "adapter_config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    kinds = {"LOHA": LoHaConfig, "LOKR": LoKrConfig, "LORA": LoraConfig}
    config_class = kinds[str(config.get("peft_type", "LORA")).upper()]
    known = set(config_class.__dataclass_fields__)
    return config_class(**{k: v for k, v in config.items() if k in known and k != "peft_type"})


def load_peft_adapters(directory: str, models: dict, add: bool = False) -> None:
    """Load `<name>_adapter/` into each model (`add`: first give it the saved adapter; else it has one already)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    for name, model in models.items():
        folder = os.path.join(directory, ADAPTER_FOLDER.format(name))
        if model is None or not os.path.isdir(folder):
            continue
        if not os.path.isfile(os.path.join(folder, "adapter_model.safetensors")):
            raise UserFileNotFoundError(f"{folder}: no adapter_model.safetensors")
        if add:
            model.add_adapter(adapter_config_from(folder))
        result = set_peft_model_state_dict(model, load_file(os.path.join(folder, "adapter_model.safetensors")),
                                           adapter_name="default")
        if getattr(result, "unexpected_keys", None):
            raise UserError(f"{folder}: the adapter does not fit the {name} (unexpected keys: "
                            f"{result.unexpected_keys[:5]})")
