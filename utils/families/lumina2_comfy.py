"""Lumina-Image-2.0 LoRA in the original model's layout (`diffusion_model.layers.0.attention.qkv.lora_A.weight`,
...), the file ComfyUI reads for Lumina-2 and diffusers' Lumina2Pipeline.load_lora_weights converts
(`_convert_non_diffusers_lumina2_lora_to_diffusers`, the reader this writer is tested against), from the peft
adapters diffusers' Lumina2Transformer2DModel holds.

Facts from that converter: the original names are Alpha-VLLM's (`attention.qkv`, `attention.out`,
`feed_forward.w1..w3`, `adaLN_modulation.1`) under `diffusion_model.`; q, k and v are one `qkv` module whose LoRA
has one `lora_A` shared by the three and a `lora_B` the converter splits by rows; no alpha (scale 1); and every block
the file names must hold all of its modules (the converter takes each one), and blocks are read by index from 0. So q, k and v's adapters are written
as one LoRA of rank 3r, the three `lora_A`s stacked and the `lora_B`s on the block diagonal (the converter's row split
then gives each of q, k, v its own B @ A exactly), the peft scale (alpha / r) is folded into `lora_A`, and a module
of a named block without an adapter (or a block before the last named one) gets a zero LoRA."""

from __future__ import annotations

import torch

from utils.families.lumina2_single_file import BLOCK, QKV
from utils.families.lumina2_single_file import PREFIXES as BLOCK_PREFIXES
from utils.families.original_layout import block_diagonal

PREFIXES = tuple(prefix.rstrip(".") for prefix in BLOCK_PREFIXES)
# the LoRA-carrying modules of a block, named as in the single file's table; q, k, v are the fused qkv
MODULES = {inner: BLOCK[inner] for inner in ("attn.to_out.0", "feed_forward.linear_1", "feed_forward.linear_2",
                                             "feed_forward.linear_3", "norm1.linear")}


def block_of(module: str) -> tuple[str, str]:
    """('<prefix>.<i>', the module's name inside the block) of a diffusers Lumina2Transformer2DModel module."""
    prefix, _, rest = module.partition(".")
    index, _, inner = rest.partition(".")
    if prefix not in PREFIXES or not index.isdigit() or (inner not in MODULES and inner not in QKV):
        raise ValueError(f"{module}: the original Lumina-2 layout names only the blocks' attention, feed-forward and "
                         "modulation; this adapter is on another module (train with the default --lora_layers).")
    return f"{prefix}.{index}", inner


def lumina2_original_state_dict(transformer, state: dict, scale: float) -> dict:
    """The file's tensors from peft's `state` (`<module>.lora_A.weight` / `.lora_B.weight` of `transformer`'s
    adapter, scale `scale`); `transformer`: the model, for the shapes of the zero LoRAs."""
    modules = sorted({key.rsplit(".lora_", 1)[0] for key in state if ".lora_A." in key})
    blocks: dict[str, dict] = {}
    for module in modules:
        block, inner = block_of(module)
        blocks.setdefault(block, {})[inner] = (state[f"{module}.lora_A.weight"] * scale, state[f"{module}.lora_B.weight"])
    rank = state[f"{modules[0]}.lora_A.weight"].shape[0]
    last = {}
    for block in blocks:  # the converter reads blocks 0..n-1 of each kind: the ones between are named too
        prefix, index = block.rsplit(".", 1)
        last[prefix] = max(last.get(prefix, 0), int(index))
    out = {}
    for block in [f"{prefix}.{index}" for prefix, count in last.items() for index in range(count + 1)]:
        adapters = blocks.get(block, {})
        def adapter(inner: str):
            if inner in adapters:
                return adapters[inner]
            layer = transformer.get_submodule(f"{block}.{inner}")
            layer = getattr(layer, "base_layer", layer)
            return torch.zeros(rank, layer.in_features), torch.zeros(layer.out_features, rank)

        qkv = [adapter(inner) for inner in QKV]
        down, up = block_diagonal(qkv, [member_up.shape[0] for _, member_up in qkv], f"{block}.attention.qkv")
        out[f"diffusion_model.{block}.attention.qkv.lora_A.weight"] = down
        out[f"diffusion_model.{block}.attention.qkv.lora_B.weight"] = up
        for inner, original in MODULES.items():
            if inner == "norm1.linear" and block.startswith("context_refiner"):
                continue  # (the context refiner has no modulation)
            down, up = adapter(inner)
            out[f"diffusion_model.{block}.{original}.lora_A.weight"] = down
            out[f"diffusion_model.{block}.{original}.lora_B.weight"] = up
    return {key: value.detach().to("cpu").contiguous().clone() for key, value in out.items()}
