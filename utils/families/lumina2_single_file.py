"""Lumina-Image-2.0's transformer as one file in Alpha-VLLM's original layout (`layers.0.attention.qkv.weight`,
`cap_embedder.0.weight`, `final_layer.adaLN_modulation.1.weight`, ...), what diffusers'
`Lumina2Transformer2DModel.from_single_file` converts and ComfyUI's diffusion-model loader reads: written by
--save_single_file from the trained transformer, read as a base model with --pretrained_model_name_or_path FILE
--model_config PIPELINE (Gemma, the VAE, the tokenizer and the scheduler come from the pipeline).

The layout is the inverse of diffusers' `convert_lumina2_to_diffusers` (facts read from it: q, k, v are one `qkv`,
the blocks' norms are `attention_norm1/2` and `ffn_norm1/2`, the final layer is `final_layer.adaLN_modulation.1` +
`final_layer.linear`, and the original's unused `norm_final.weight`, which the converter drops, is written with its
initial value, ones); every tensor is checked to come back exactly through that converter before the file is
written. The converter splits qkv at Lumina-Image-2.0's widths (q 2304 = 24 heads x 96, k and v 768 = 8 heads x 96)
and maps two context-refiner blocks: a transformer of another shape has no single file, refused before training."""

from __future__ import annotations

import torch

from utils.errors import UserError
from utils.families.original_layout import (checked_original, load_transformer_single_file, save_single_file_tensors,
                                             tensor_shape)

TOP_LEVEL = {"x_embedder": "x_embedder", "time_caption_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
             "time_caption_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
             "time_caption_embed.caption_embedder.0": "cap_embedder.0",
             "time_caption_embed.caption_embedder.1": "cap_embedder.1",
             "norm_out.linear_1": "final_layer.adaLN_modulation.1", "norm_out.linear_2": "final_layer.linear"}
# per block (layers.<i>., noise_refiner.<i>., context_refiner.<i>.): diffusers module -> original module
BLOCK = {"attn.norm_q": "attention.q_norm", "attn.norm_k": "attention.k_norm", "attn.to_out.0": "attention.out",
         "feed_forward.linear_1": "feed_forward.w1", "feed_forward.linear_2": "feed_forward.w2",
         "feed_forward.linear_3": "feed_forward.w3", "norm1.linear": "adaLN_modulation.1",
         "norm1.norm": "attention_norm1", "norm1": "attention_norm1", "norm2": "attention_norm2",
         "ffn_norm1": "ffn_norm1", "ffn_norm2": "ffn_norm2"}
QKV = ("attn.to_q", "attn.to_k", "attn.to_v")
PREFIXES = ("layers.", "noise_refiner.", "context_refiner.")
HEAD_DIM, HEADS, KV_HEADS, REFINER_LAYERS = 96, 24, 8, 2  # Lumina-Image-2.0's, what the converter assumes


def transformer_to_original(state: dict) -> dict:
    """A diffusers Lumina2Transformer2DModel state dict in Alpha-VLLM's layout (q, k, v concatenated)."""
    out, qkv = {}, {}
    for key, value in state.items():
        module, _, kind = key.rpartition(".")
        if module in TOP_LEVEL:
            out[f"{TOP_LEVEL[module]}.{kind}"] = value
            continue
        prefix = next((p for p in PREFIXES if module.startswith(p)), None)
        if prefix is None:
            raise ValueError(f"{key}: no module of Lumina-2's original layout holds it")
        index, inner = module[len(prefix):].split(".", 1)
        block = f"{prefix}{index}"
        if inner in QKV:
            qkv.setdefault(f"{block}.attention.qkv.{kind}", [None] * 3)[QKV.index(inner)] = value
        elif inner in BLOCK:
            out[f"{block}.{BLOCK[inner]}.{kind}"] = value
        else:
            raise ValueError(f"{key}: no module of Lumina-2's original layout holds it")
    out.update({key: torch.cat(parts, dim=0) for key, parts in qkv.items()})
    width = state["x_embedder.weight"].shape[0]
    out["norm_final.weight"] = torch.ones(width, dtype=state["x_embedder.weight"].dtype)  # (unused; its init value)
    return out


def check_single_file_shape(transformer, flag: str = "--save_single_file") -> None:
    """Lumina-2's single file exists for its own attention widths and two context-refiner blocks only."""
    config = transformer.config
    shape = (config.hidden_size // config.num_attention_heads, config.num_attention_heads, config.num_kv_heads,
             config.num_refiner_layers)
    if shape != (HEAD_DIM, HEADS, KV_HEADS, REFINER_LAYERS):
        raise UserError(f"{flag}: Lumina-2's single-file layout (what diffusers' from_single_file and ComfyUI read) "
                        f"assumes Lumina-Image-2.0's attention ({HEADS} heads and {KV_HEADS} key/value heads of "
                        f"{HEAD_DIM}) and {REFINER_LAYERS} refiner blocks; this transformer has {shape[1]} heads, "
                        f"{shape[2]} key/value heads of {shape[0]} and {shape[3]} refiner blocks: drop {flag} (the "
                        "pipeline folder is saved).")


def lumina2_single_file_state_dict(transformer) -> dict:
    """The transformer in Alpha-VLLM's layout, checked through diffusers' converter."""
    from diffusers.loaders.single_file_utils import convert_lumina2_to_diffusers

    check_single_file_shape(transformer)
    return checked_original("Lumina-2 transformer", transformer, transformer_to_original, convert_lumina2_to_diffusers)


def save_lumina2_single_file(path: str, transformer, dtype: str, metadata: dict | None = None) -> str:
    """Write `path` atomically at `dtype` (fp16, bf16, fp32)."""
    return save_single_file_tensors(path, lumina2_single_file_state_dict(transformer), dtype, metadata)


def load_lumina2_single_file_transformer(path: str, model_config: str | None, **kwargs):
    """Lumina2Transformer2DModel.from_single_file with --model_config's transformer config (the file has none)."""
    from diffusers import Lumina2Transformer2DModel

    rows = (tensor_shape(path, "layers.0.attention.qkv.weight") or [None])[0]
    if rows is not None and rows != (HEADS + 2 * KV_HEADS) * HEAD_DIM:
        raise UserError(f"--pretrained_model_name_or_path {path}: a Lumina transformer whose q, k, v have {rows} rows; "
                        f"diffusers' Lumina-2 single-file converter reads Lumina-Image-2.0's "
                        f"({(HEADS + 2 * KV_HEADS) * HEAD_DIM}) only: give its diffusers pipeline folder instead.")
    return load_transformer_single_file(path, model_config, Lumina2Transformer2DModel, "Lumina-Image-2.0",
                                        "Lumina2Pipeline", "Alpha-VLLM/Lumina-Image-2.0", **kwargs)
