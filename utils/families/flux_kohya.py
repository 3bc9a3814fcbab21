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

# diffusers module (under transformer_blocks.{i}.) -> (kohya module under lora_unet_double_blocks_{i}_, position in
# the fused group, group size)
DOUBLE = {"attn.to_q": ("img_attn_qkv", 0, 3), "attn.to_k": ("img_attn_qkv", 1, 3), "attn.to_v": ("img_attn_qkv", 2, 3),
          "attn.add_q_proj": ("txt_attn_qkv", 0, 3), "attn.add_k_proj": ("txt_attn_qkv", 1, 3),
          "attn.add_v_proj": ("txt_attn_qkv", 2, 3), "attn.to_out.0": ("img_attn_proj", 0, 1),
          "attn.to_add_out": ("txt_attn_proj", 0, 1), "ff.net.0.proj": ("img_mlp_0", 0, 1),
          "ff.net.2": ("img_mlp_2", 0, 1), "ff_context.net.0.proj": ("txt_mlp_0", 0, 1),
          "ff_context.net.2": ("txt_mlp_2", 0, 1), "norm1.linear": ("img_mod_lin", 0, 1),
          "norm1_context.linear": ("txt_mod_lin", 0, 1)}
SINGLE = {"attn.to_q": ("linear1", 0, 4), "attn.to_k": ("linear1", 1, 4), "attn.to_v": ("linear1", 2, 4),
          "proj_mlp": ("linear1", 3, 4), "proj_out": ("linear2", 0, 1), "norm.linear": ("modulation_lin", 0, 1)}
GLOBAL = {"x_embedder": "img_in", "context_embedder": "txt_in",
          "time_text_embed.timestep_embedder.linear_1": "time_in_in_layer",
          "time_text_embed.timestep_embedder.linear_2": "time_in_out_layer",
          "time_text_embed.text_embedder.linear_1": "vector_in_in_layer",
          "time_text_embed.text_embedder.linear_2": "vector_in_out_layer",
          "time_text_embed.guidance_embedder.linear_1": "guidance_in_in_layer",
          "time_text_embed.guidance_embedder.linear_2": "guidance_in_out_layer",
          "proj_out": "final_layer_linear", "norm_out.linear": "final_layer_adaLN_modulation_1"}
# Loaders apply no alpha to the final layer's keys (diffusers' converter: "TODO: alphas"): its scale is baked in.
BAKED = ("final_layer_linear", "final_layer_adaLN_modulation_1")


def kohya_module(module: str) -> tuple[str, int, int]:
    """(kohya module name, position in its fused group, group size) of a diffusers FluxTransformer2DModel module."""
    for prefix, table, kohya_prefix in (("transformer_blocks.", DOUBLE, "double_blocks"),
                                        ("single_transformer_blocks.", SINGLE, "single_blocks")):
        if module.startswith(prefix):
            index, rest = module[len(prefix):].split(".", 1)
            if rest in table:
                name, position, size = table[rest]
                return f"lora_unet_{kohya_prefix}_{index}_{name}", position, size
    if module in GLOBAL:
        return f"lora_unet_{GLOBAL[module]}", 0, 1
    raise ValueError(f"{module}: no module of FLUX.1's original layout holds it (kohya's LoRA format cannot name it)")


def swap_halves(weight: torch.Tensor) -> torch.Tensor:
    """The original final AdaLayerNorm's (shift, scale) rows vs diffusers' (scale, shift): its own inverse."""
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


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
        downs, ups = fused(group["members"], group["size"], name)
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


def fused(members: dict, size: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One LoRA of rank size x r for a fused module: the downs stacked, the ups on the block diagonal; a member
    without an adapter is zero blocks."""
    if size == 1:
        return members[0]
    down, up = next(iter(members.values()))
    rank, widths = down.shape[0], member_widths(members, size)
    downs, ups = [], torch.zeros(sum(widths), rank * size, dtype=up.dtype, device=up.device)
    row = 0
    for position in range(size):
        member_down, member_up = members.get(position, (torch.zeros_like(down), None))
        if member_down.shape[0] != rank:
            raise ValueError(f"{name}: the fused modules' adapters have different ranks")
        downs.append(member_down)
        if member_up is not None:
            ups[row:row + widths[position], position * rank:(position + 1) * rank] = member_up
        row += widths[position]
    return torch.cat(downs, dim=0), ups


def member_widths(members: dict, size: int) -> list[int]:
    """Output widths of a fused group's members: qkv, 3 x the model width; linear1, that and the MLP input, 4x the
    width (FluxSingleTransformerBlock's mlp_ratio)."""
    attention = [members[p][1].shape[0] for p in range(3) if p in members]
    width = attention[0] if attention else members[3][1].shape[0] // 4
    return [width] * 3 + ([4 * width] if size == 4 else [])
