"""Stable Diffusion 3 / 3.5 as one file in Stability's layout (`model.diffusion_model.joint_blocks.0.x_block.attn.qkv.
weight`, ... and the VAE under `first_stage_model.`), the checkpoint ComfyUI's loader and the UIs read and diffusers'
`StableDiffusion3Pipeline.from_single_file` converts: written by --save_single_file from the trained
SD3Transformer2DModel (reading one as a base model, --pretrained_model_name_or_path FILE --model_config PIPELINE, is
utils/sd/single_file.py's load_sd3_single_file_pipeline).

The layout is the inverse of diffusers' `convert_sd3_transformer_checkpoint_to_diffusers` (facts read from it: q, k,
v are one `qkv` per stream, the last block's context stream has only its modulation, whose (shift, scale) halves and
the final layer's are swapped relative to diffusers'); every tensor written is checked to come back exactly through
that converter (and the VAE through `convert_ldm_vae_checkpoint`) before the file is written."""

from __future__ import annotations

import torch

from utils.families.original_layout import save_single_file_tensors, swap_halves

TRANSFORMER_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
TOP_LEVEL = {"pos_embed.pos_embed": "pos_embed", "pos_embed.proj": "x_embedder.proj",
             "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
             "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2", "context_embedder": "context_embedder",
             "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
             "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2", "proj_out": "final_layer.linear",
             "norm_out.linear": "final_layer.adaLN_modulation.1"}
# per block: diffusers module -> its original module (under joint_blocks.<i>.), for the modules that are not fused
BLOCK = {"attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
         "attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
         "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
         "attn2.to_out.0": "x_block.attn2.proj", "attn2.norm_q": "x_block.attn2.ln_q",
         "attn2.norm_k": "x_block.attn2.ln_k", "norm1.linear": "x_block.adaLN_modulation.1",
         "norm1_context.linear": "context_block.adaLN_modulation.1", "ff.net.0.proj": "x_block.mlp.fc1",
         "ff.net.2": "x_block.mlp.fc2", "ff_context.net.0.proj": "context_block.mlp.fc1",
         "ff_context.net.2": "context_block.mlp.fc2"}
FUSED = {"x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
         "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
         "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v")}


def transformer_to_original(state: dict, num_layers: int) -> dict:
    """A diffusers SD3Transformer2DModel state dict in Stability's layout (keys without the prefix)."""
    out = {}
    for key, value in state.items():
        module, _, kind = key.rpartition(".")
        if key == "pos_embed.pos_embed":
            out["pos_embed"] = value
        elif module in TOP_LEVEL:
            out[f"{TOP_LEVEL[module]}.{kind}"] = swap_halves(value) if module == "norm_out.linear" else value
        elif module.startswith("transformer_blocks."):
            index, inner = module[len("transformer_blocks."):].split(".", 1)
            if inner in BLOCK:
                last_context = int(index) == num_layers - 1 and inner == "norm1_context.linear"
                out[f"joint_blocks.{index}.{BLOCK[inner]}.{kind}"] = swap_halves(value) if last_context else value
            elif not any(inner in members for members in FUSED.values()):
                raise ValueError(f"{key}: no module of SD3's original layout holds it")
        else:
            raise ValueError(f"{key}: no module of SD3's original layout holds it")
    for index in range(num_layers):
        for original, members in FUSED.items():
            for kind in ("weight", "bias"):
                parts = [state.get(f"transformer_blocks.{index}.{member}.{kind}") for member in members]
                if all(part is not None for part in parts):
                    out[f"joint_blocks.{index}.{original}.{kind}"] = torch.cat(parts, dim=0)
    return out


def sd3_single_file_state_dict(transformer, vae) -> dict:
    """The transformer and VAE in the single file's layout, each checked against diffusers' converters."""
    from diffusers.loaders.single_file_utils import (convert_ldm_vae_checkpoint,
                                                     convert_sd3_transformer_checkpoint_to_diffusers)

    from utils.sd.single_file import _check_round_trip, vae_to_ldm

    transformer_state, vae_state = transformer.state_dict(), vae.state_dict()
    original = {TRANSFORMER_PREFIX + k: v for k, v in
                transformer_to_original(transformer_state, transformer.config.num_layers).items()}
    vae_ldm = {VAE_PREFIX + k: v for k, v in vae_to_ldm(vae_state, vae.config).items()}
    _check_round_trip("SD3 transformer", transformer_state, convert_sd3_transformer_checkpoint_to_diffusers(dict(original)))
    _check_round_trip("VAE", vae_state, convert_ldm_vae_checkpoint(vae_ldm, vae.config))
    return {**original, **vae_ldm}


def save_sd3_single_file(path: str, transformer, vae, dtype: str, metadata: dict | None = None) -> str:
    """Write `path` atomically at `dtype` (fp16, bf16, fp32)."""
    return save_single_file_tensors(path, sd3_single_file_state_dict(transformer, vae), dtype, metadata)
