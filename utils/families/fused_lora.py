"""What the original (non-diffusers) layouts of the transformer families share: modules diffusers keeps apart that
the original model fuses (q, k, v as one `qkv`; FLUX's single blocks also the MLP input, `linear1`), and
modulation rows in (shift, scale) order where diffusers' AdaLayerNormContinuous has (scale, shift). Used by the
LoRA writers (FLUX kohya, SD3 kohya, Lumina-2 original) and the SD3 single-file writer."""

from __future__ import annotations

import torch


def swap_halves(weight: torch.Tensor) -> torch.Tensor:
    """(shift, scale) <-> (scale, shift) along the output rows: its own inverse."""
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def block_diagonal(members: list, widths: list[int], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One LoRA of rank n x r on a module fused from n diffusers modules: the n `lora_down`s stacked, the
    `lora_up`s on the block diagonal, zeros elsewhere (the layout diffusers' converters detect and split back
    exactly). `members[i]`: (down, up), or None for a member without an adapter (zero blocks); `widths[i]`: its
    output width. Returns (down, up) on the first member's device."""
    present = [member for member in members if member is not None]
    down, up = present[0]
    rank = down.shape[0]
    if any(member_down.shape[0] != rank for member_down, _ in present):
        raise ValueError(f"{name}: the fused modules' adapters have different ranks")
    downs = [member[0].to(down.device) if member is not None else torch.zeros_like(down) for member in members]
    ups = torch.zeros(sum(widths), rank * len(members), dtype=up.dtype, device=up.device)
    row = 0
    for position, (member, width) in enumerate(zip(members, widths)):
        if member is not None:
            ups[row:row + width, position * rank:(position + 1) * rank] = member[1].to(up.device)
        row += width
    return torch.cat(downs, dim=0), ups


def one_scale(transformer, layout: str) -> float:
    """peft's scale (lora_alpha / r) of `transformer`'s adapter, which these layouts give every module: per-module
    ranks or rsLoRA scaling are a one-block error naming the way out."""
    from utils.errors import UserError

    config = transformer.peft_config["default"]
    if config.rank_pattern or config.alpha_pattern or config.use_rslora:
        raise UserError(f"{layout} has one alpha/rank scale for every module; this adapter has per-module ranks or "
                        "rsLoRA scaling: use --lora_format diffusers.")
    return config.lora_alpha / config.r


def write_layout_file(directory: str, tensors: dict, metadata: dict | None, dtype, network: dict) -> str:
    """pytorch_lora_weights_kohya.safetensors in `directory` (atomically; `dtype` for the matrices, alphas as they
    are) with the run's metadata and kohya's `ss_network_*` keys (`network`); returns its path."""
    import os

    from utils.sd.lora import KOHYA_WEIGHT_NAME, write_kohya_file

    tensors = {key: value.to(dtype) if dtype is not None and value.ndim else value for key, value in tensors.items()}
    path = os.path.join(directory, KOHYA_WEIGHT_NAME)
    write_kohya_file(path, tensors, metadata, network)
    return path
