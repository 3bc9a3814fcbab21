"""Stable Diffusion 3 / 3.5 LoRA in kohya's sd-scripts layout (`lora_unet_joint_blocks_0_x_block_attn_qkv.
lora_down.weight`, ...: networks/lora_sd3.py's names, "lora_unet" so ComfyUI reads it), from the peft adapters
diffusers' SD3Transformer2DModel holds.

The module names are Stability's original MMDiT names (utils/families/sd3_single_file.py's table, "." -> "_"):
ComfyUI maps `lora_unet_<original module with _>` onto its model's weights, and sd-scripts' SD3 network names its
modules so. q, k, v are one `qkv` module per stream there: their adapters become one LoRA of rank 3r with the
`lora_down`s stacked and the `lora_up`s on the block diagonal (sd-scripts' own merge of its split-qkv LoRA), alpha =
3r x (alpha/r) so alpha/rank keeps peft's scale; modulation rows stored (shift, scale) in the original (the final
layer, the last block's context stream) get their `lora_up` rows swapped. CLIP-L and CLIP-G are `lora_te1_` and
`lora_te2_` as sd-scripts writes them. diffusers has no reader for this layout: the tests merge the file into the
original-layout weights, as ComfyUI does, and convert them with diffusers' SD3 checkpoint converter, which must give
the diffusers LoRA fused into the model."""

from __future__ import annotations

import torch

from utils.families.original_layout import block_diagonal, swap_halves
from utils.families.sd3_single_file import BLOCK, FUSED, TOP_LEVEL

MEMBERS = {member: (original, position) for original, members in FUSED.items()
           for position, member in enumerate(members)}


def original_module(module: str, num_layers: int) -> tuple[str, int, int, bool]:
    """(original module, position in its fused group, group size, rows swapped) of an SD3Transformer2DModel module."""
    if module in TOP_LEVEL and module != "pos_embed.pos_embed":
        return TOP_LEVEL[module], 0, 1, module == "norm_out.linear"
    if module.startswith("transformer_blocks."):
        index, inner = module[len("transformer_blocks."):].split(".", 1)
        if inner in BLOCK:
            last_context = int(index) == num_layers - 1 and inner == "norm1_context.linear"
            return f"joint_blocks.{index}.{BLOCK[inner]}", 0, 1, last_context
        if inner in MEMBERS:
            original, position = MEMBERS[inner]
            return f"joint_blocks.{index}.{original}", position, 3, False
    raise ValueError(f"{module}: no module of SD3's original layout holds it (kohya's LoRA format cannot name it)")


def sd3_kohya_state_dict(transformer_state: dict, scale: float, num_layers: int, text_states: dict | None = None,
                         text_alphas: dict | None = None) -> dict:
    """kohya tensors from peft state dicts: `transformer_state` keyed `<module>.lora_A.weight` / `.lora_B.weight`
    (get_peft_model_state_dict of the transformer, adapter scale `scale` = lora_alpha / r, `num_layers` joint
    blocks); `text_states` / `text_alphas` by encoder name (text_encoder, text_encoder_2) likewise for the CLIPs."""
    from utils.sd.lora import kohya_from_peft

    modules = sorted({key.rsplit(".lora_", 1)[0] for key in transformer_state if ".lora_A." in key})
    groups: dict[str, dict] = {}
    for module in modules:
        name, position, size, swapped = original_module(module, num_layers)
        group = groups.setdefault(name, {"members": [None] * size, "swapped": swapped})
        group["members"][position] = (transformer_state[f"{module}.lora_A.weight"],
                                      transformer_state[f"{module}.lora_B.weight"])
    kohya = {}
    for name, group in groups.items():
        present = [member for member in group["members"] if member is not None]
        width = present[0][1].shape[0]  # (q, k and v are equally wide)
        down, up = block_diagonal(group["members"], [width] * len(group["members"]), name)
        key = "lora_unet_" + name.replace(".", "_")
        kohya.update({f"{key}.lora_down.weight": down.contiguous(),
                      f"{key}.lora_up.weight": (swap_halves(up) if group["swapped"] else up).contiguous(),
                      f"{key}.alpha": torch.tensor(scale * down.shape[0])})
    if text_states:
        both = {f"{encoder}.{k}": v for encoder, state in text_states.items() for k, v in state.items()}
        clip = kohya_from_peft(both, text_alphas or {})
        kohya.update({key.replace("lora_te_", "lora_te1_", 1): value for key, value in clip.items()})
    return {key: value.detach().to("cpu").clone() for key, value in kohya.items()}  # (no tensor shared with the model)


def save_sd3_kohya_lora(directory: str, transformer, encoders: dict, metadata: dict | None, dtype) -> str:
    """pytorch_lora_weights_kohya.safetensors with sd-scripts' SD3 ss_network_* keys."""
    from peft.utils import get_peft_model_state_dict

    from utils.families.original_layout import one_scale, write_layout_file

    scale, config = one_scale(transformer, "kohya's SD3 layout"), transformer.peft_config["default"]
    trained = {name: model for name, model in encoders.items() if model is not None and hasattr(model, "peft_config")}
    tensors = sd3_kohya_state_dict(get_peft_model_state_dict(transformer), scale, transformer.config.num_layers,
                                   {name: get_peft_model_state_dict(model) for name, model in trained.items()},
                                   {name: model.peft_config["default"].lora_alpha for name, model in trained.items()})
    return write_layout_file(directory, tensors, metadata, dtype, {
        "ss_network_module": "networks.lora_sd3", "ss_network_dim": config.r, "ss_network_alpha": config.lora_alpha})
