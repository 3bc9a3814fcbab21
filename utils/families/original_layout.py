"""What the original (non-diffusers) layouts of the transformer families share: modules diffusers keeps apart that
the original model fuses (q, k, v as one `qkv`; FLUX's single blocks also the MLP input, `linear1`), modulation
rows in (shift, scale) order where diffusers' AdaLayerNormContinuous has (scale, shift), the LoRA files' one scale
and writing, and a transformer-only single file's writing and reading (`--model_config` for the rest). Used by the
LoRA writers (FLUX kohya, SD3 kohya, Lumina-2 original) and the single-file modules (SD3, FLUX.1, Lumina-2)."""

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


def checked_original(name: str, transformer, to_original, converter) -> dict:
    """`transformer`'s state dict in an original layout (`to_original`), every tensor checked to come back exactly
    through diffusers' `converter` for that layout (an internal error otherwise)."""
    from utils.sd.single_file import _check_round_trip

    state = transformer.state_dict()
    original = to_original(state)
    _check_round_trip(name, state, converter(dict(original)))
    return original


def save_single_file_tensors(path: str, state: dict, dtype: str, metadata: dict | None = None) -> str:
    """`state` (an original-layout state dict) written atomically at `dtype` (fp16, bf16, fp32)."""
    from safetensors.torch import save_file

    from utils.atomic import atomic_file
    from utils.sd.single_file import DTYPES

    tensors = {k: (v.to(DTYPES[dtype]) if v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in state.items()}
    with atomic_file(path) as temp:
        save_file(tensors, temp, metadata={k: str(v) for k, v in (metadata or {}).items() if v is not None})
    return path


def load_transformer_single_file(path: str, model_config: str | None, model_class, family: str, pipeline: str,
                                 example: str, **kwargs):
    """`model_class.from_single_file(path)` with `model_config`'s transformer config (the file has none), after
    one-block checks that `model_config` is given and is a `pipeline` (`family`'s; `example`, a Hub id to name)."""
    from utils.errors import UserError
    from utils.sd.model_kind import pipeline_class_name

    if model_config is None:
        raise UserError(f"--pretrained_model_name_or_path {path} is a single-file {family} transformer: give "
                        f"--model_config with the {family} pipeline it belongs to (a folder or Hub id, e.g. {example}), "
                        "which holds the text encoders, VAE, tokenizers and scheduler the file does not.")
    config_kind = pipeline_class_name(model_config)
    if config_kind != pipeline:
        raise UserError(f"--model_config {model_config}: not a {family} pipeline (its model_index.json names "
                        f"{config_kind}); give the {family} pipeline the file belongs to.")
    return model_class.from_single_file(path, config=model_config, subfolder="transformer", **kwargs)


def tensor_shape(path: str, key_end: str) -> list[int] | None:
    """The shape of the first tensor of `path` whose key ends with `key_end` (None: none), read from the header."""
    from safetensors import safe_open

    with safe_open(path, "pt") as handle:
        key = next((k for k in handle.keys() if k.endswith(key_end)), None)
        return handle.get_slice(key).get_shape() if key is not None else None
