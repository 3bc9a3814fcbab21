"""FLUX.1 in Black Forest Labs' original layout (`double_blocks.0.img_attn.qkv.weight`, `single_blocks.0.linear1.
weight`, ...): the module table the kohya LoRA writer (utils/families/flux_kohya.py) names its modules by, and the
transformer as one file, the `flux1-dev.safetensors` layout ComfyUI's diffusion-model loader reads and diffusers'
`FluxTransformer2DModel.from_single_file` converts. Written by --save_single_file from the trained
FluxTransformer2DModel; read as a base model with --pretrained_model_name_or_path FILE --model_config PIPELINE (the
file holds the transformer only; text encoders, VAE, tokenizers and scheduler come from the pipeline).

The layout is the inverse of diffusers' `convert_flux_transformer_checkpoint_to_diffusers` (facts read from it: the
double blocks' q, k, v are one `qkv` per stream, the single blocks' q, k, v and MLP input one `linear1`, the
RMSNorms' weights are `.scale`, the final layer's (shift, scale) halves are swapped relative to diffusers'); every
tensor is checked to come back exactly through that converter before the file is written. The converter (like
ComfyUI's model detection) fixes FLUX.1's width, 3072 (24 heads x 128) with a 4x MLP: a transformer of another width
has no single file, refused before training starts."""

from __future__ import annotations

import torch

from utils.errors import UserError
from utils.families.original_layout import (checked_original, load_transformer_single_file, save_single_file_tensors,
                                             swap_halves, tensor_shape)

# diffusers module -> (original module, position in its fused group, group size); per block under
# transformer_blocks.<i>. -> double_blocks.<i>. and single_transformer_blocks.<i>. -> single_blocks.<i>.
DOUBLE = {"attn.to_q": ("img_attn.qkv", 0, 3), "attn.to_k": ("img_attn.qkv", 1, 3), "attn.to_v": ("img_attn.qkv", 2, 3),
          "attn.add_q_proj": ("txt_attn.qkv", 0, 3), "attn.add_k_proj": ("txt_attn.qkv", 1, 3),
          "attn.add_v_proj": ("txt_attn.qkv", 2, 3), "attn.to_out.0": ("img_attn.proj", 0, 1),
          "attn.to_add_out": ("txt_attn.proj", 0, 1), "ff.net.0.proj": ("img_mlp.0", 0, 1),
          "ff.net.2": ("img_mlp.2", 0, 1), "ff_context.net.0.proj": ("txt_mlp.0", 0, 1),
          "ff_context.net.2": ("txt_mlp.2", 0, 1), "norm1.linear": ("img_mod.lin", 0, 1),
          "norm1_context.linear": ("txt_mod.lin", 0, 1)}
SINGLE = {"attn.to_q": ("linear1", 0, 4), "attn.to_k": ("linear1", 1, 4), "attn.to_v": ("linear1", 2, 4),
          "proj_mlp": ("linear1", 3, 4), "proj_out": ("linear2", 0, 1), "norm.linear": ("modulation.lin", 0, 1)}
GLOBAL = {"x_embedder": "img_in", "context_embedder": "txt_in",
          "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
          "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
          "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
          "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
          "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
          "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
          "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1"}
SWAPPED = "final_layer.adaLN_modulation.1"  # (shift, scale) in the original, (scale, shift) in diffusers
# the RMSNorms of q and k (their weight is `.scale` in the original)
NORMS = {"transformer_blocks.": {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                                 "attn.norm_added_q": "txt_attn.norm.query_norm",
                                 "attn.norm_added_k": "txt_attn.norm.key_norm"},
         "single_transformer_blocks.": {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}}
BLOCKS = {"transformer_blocks.": ("double_blocks", DOUBLE), "single_transformer_blocks.": ("single_blocks", SINGLE)}
WIDTH = 3072  # what diffusers' converter and ComfyUI's detection assume (with FLUX's fixed 4x MLP)


def original_module(module: str) -> tuple[str, int, int]:
    """(original module name, position in its fused group, group size) of a FluxTransformer2DModel module."""
    for prefix, (original_prefix, table) in BLOCKS.items():
        if module.startswith(prefix):
            index, rest = module[len(prefix):].split(".", 1)
            if rest in table:
                name, position, size = table[rest]
                return f"{original_prefix}.{index}.{name}", position, size
    if module in GLOBAL:
        return GLOBAL[module], 0, 1
    raise ValueError(f"{module}: no module of FLUX.1's original layout holds it")


def original_norm(module: str) -> str | None:
    """The original name of a q/k RMSNorm module (None: not one)."""
    for prefix, (original_prefix, _) in BLOCKS.items():
        if module.startswith(prefix):
            index, rest = module[len(prefix):].split(".", 1)
            if rest in NORMS[prefix]:
                return f"{original_prefix}.{index}.{NORMS[prefix][rest]}"
    return None


def transformer_to_original(state: dict) -> dict:
    """A diffusers FluxTransformer2DModel state dict in BFL's layout (fused groups concatenated in their order)."""
    out, groups = {}, {}
    for key, value in state.items():
        module, _, kind = key.rpartition(".")
        norm = original_norm(module)
        if norm is not None:
            out[f"{norm}.scale"] = value
            continue
        name, position, size = original_module(module)
        if size == 1:
            out[f"{name}.{kind}"] = swap_halves(value) if name == SWAPPED else value
        else:
            groups.setdefault(f"{name}.{kind}", [None] * size)[position] = value
    for key, parts in groups.items():
        if any(part is None for part in parts):
            raise ValueError(f"{key}: a fused module with a member missing from the state dict")
        out[key] = torch.cat(parts, dim=0)
    return out


def check_single_file_width(transformer, flag: str = "--save_single_file") -> None:
    """FLUX.1's single file exists for its own width only (see the module's note): a one-block error otherwise."""
    config = transformer.config
    width = config.num_attention_heads * config.attention_head_dim
    if width != WIDTH:
        raise UserError(f"{flag}: FLUX.1's single-file layout (what diffusers' from_single_file and ComfyUI read) "
                        f"assumes a {WIDTH}-wide transformer; this one is {width} wide ({config.num_attention_heads} "
                        f"heads x {config.attention_head_dim}): drop {flag} (the pipeline folder is saved).")


def flux_single_file_state_dict(transformer) -> dict:
    """The transformer in BFL's layout, checked through diffusers' converter."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    check_single_file_width(transformer)
    return checked_original("FLUX.1 transformer", transformer, transformer_to_original,
                            convert_flux_transformer_checkpoint_to_diffusers)


def save_flux_single_file(path: str, transformer, dtype: str, metadata: dict | None = None) -> str:
    """Write `path` atomically at `dtype` (fp16, bf16, fp32)."""
    return save_single_file_tensors(path, flux_single_file_state_dict(transformer), dtype, metadata)


def load_flux_single_file_transformer(path: str, model_config: str | None, **kwargs):
    """FluxTransformer2DModel.from_single_file with --model_config's transformer config (the file has none)."""
    from diffusers import FluxTransformer2DModel

    width = (tensor_shape(path, "img_in.weight") or [WIDTH])[0]
    if width != WIDTH:
        raise UserError(f"--pretrained_model_name_or_path {path}: a {width}-wide FLUX transformer; diffusers' "
                        f"FLUX.1 single-file converter reads {WIDTH}-wide ones only: give its diffusers pipeline "
                        "folder instead.")
    return load_transformer_single_file(path, model_config, FluxTransformer2DModel, "FLUX.1", "FluxPipeline",
                                        "black-forest-labs/FLUX.1-dev", **kwargs)
