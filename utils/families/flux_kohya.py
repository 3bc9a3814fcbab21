"""FLUX.1 LoRA in kohya's sd-scripts layout (`lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`, ...), the
file A1111/Forge, sd-scripts and ComfyUI read for FLUX, from the peft adapters diffusers' FluxTransformer2DModel
holds.

The key layout is Black Forest Labs' original module names (facts read from diffusers'
`_convert_kohya_flux_lora_to_diffusers` and `convert_flux_transformer_checkpoint_to_diffusers`, the converters this
writer is tested against): the double blocks' q, k, v are one `qkv` module, the single blocks' q, k, v and MLP
input are one `linear1`. A LoRA on modules that the original fuses becomes one LoRA of rank n x r on the fused
module: the n `lora_down`s stacked, the `lora_up`s on the block diagonal (zeros elsewhere, the layout diffusers'
converter detects and splits back exactly), `alpha` = n x r x (alpha/r), so alpha/rank keeps peft's scale. A fused
member without an adapter contributes zero blocks. CLIP's adapters are `lora_te1_...` as sd-scripts writes them.
"""

from __future__ import annotations

import torch

from utils.families.flux_single_file import original_module
from utils.families.original_layout import block_diagonal, swap_halves

# Loaders apply no alpha to the final layer's keys (diffusers' converter: "TODO: alphas"): its scale is baked in.
BAKED = ("final_layer_linear", "final_layer_adaLN_modulation_1")


def kohya_module(module: str) -> tuple[str, int, int]:
    """(kohya module name, position in its fused group, group size) of a diffusers FluxTransformer2DModel module:
    BFL's name (utils/families/flux_single_file.py's table) with "_" for "." under `lora_unet_`."""
    try:
        name, position, size = original_module(module)
    except ValueError as error:
        raise ValueError(f"{error} (kohya's LoRA format cannot name it)") from None
    return "lora_unet_" + name.replace(".", "_"), position, size


def flux_kohya_state_dict(transformer_state: dict, scale: float, text_encoder_state: dict | None = None,
                          text_encoder_alpha: float | None = None) -> dict:
    """kohya tensors from peft state dicts: `transformer_state` keyed `<module>.lora_A.weight` / `.lora_B.weight`
    (get_peft_model_state_dict of the transformer, adapter scale `scale` = lora_alpha / r), `text_encoder_state`
    likewise for CLIP (its lora_alpha `text_encoder_alpha`)."""
    from utils.sd.lora import kohya_from_peft

    modules = sorted({key.rsplit(".lora_", 1)[0] for key in transformer_state if ".lora_A." in key})
    groups: dict[str, dict] = {}
    for module in modules:
        name, position, size = kohya_module(module)
        group = groups.setdefault(name, {"size": size, "members": {}})
        group["members"][position] = (transformer_state[f"{module}.lora_A.weight"],
                                      transformer_state[f"{module}.lora_B.weight"])
    kohya = {}
    for name, group in groups.items():
        members = group["members"]
        downs, ups = block_diagonal([members.get(p) for p in range(group["size"])],
                                    member_widths(members, group["size"]), name)
        if name.endswith("adaLN_modulation_1"):
            ups = swap_halves(ups)
        rank = downs.shape[0]
        if name.removeprefix("lora_unet_") in BAKED:
            downs, alpha = downs * scale, float(rank)
        else:
            alpha = scale * rank
        kohya.update({f"{name}.lora_down.weight": downs.contiguous(), f"{name}.lora_up.weight": ups.contiguous(),
                      f"{name}.alpha": torch.tensor(alpha)})
    if text_encoder_state:
        clip = kohya_from_peft({f"text_encoder.{k}": v for k, v in text_encoder_state.items()},
                               {"text_encoder": text_encoder_alpha})
        kohya.update({key.replace("lora_te_", "lora_te1_", 1): value for key, value in clip.items()})
    return {key: value.detach().to("cpu").clone() for key, value in kohya.items()}  # (no tensor shared with the model)


def member_widths(members: dict, size: int) -> list[int]:
    """Output widths of a fused group's members: qkv, 3 x the model width; linear1, that and the MLP input, 4x the
    width (FluxSingleTransformerBlock's mlp_ratio); an unfused module, its own."""
    if size == 1:
        return [members[0][1].shape[0]]
    attention = [members[p][1].shape[0] for p in range(3) if p in members]
    width = attention[0] if attention else members[3][1].shape[0] // 4
    return [width] * 3 + ([4 * width] if size == 4 else [])
