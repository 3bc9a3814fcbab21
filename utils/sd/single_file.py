"""Single-file Stable Diffusion checkpoints: one `model.safetensors` in the original LDM key layout (the file
AUTOMATIC1111, ComfyUI, Forge and model-sharing sites use), written from our diffusers models and read back.

Writing (`--save_single_file`): diffusers ships only the other direction (`diffusers.loaders.single_file_utils`:
LDM -> diffusers), so the layout is written here, as the inverse of diffusers' converters. Key layout facts:
  UNet    model.diffusion_model.  input_blocks.{1 + b*(L+1) + j}.0 = down block b resnet j (.1 its attention),
          input_blocks.{(b+1)*(L+1)}.0.op = down block b's downsampler, middle_block.{0,1,2} = resnet, attention,
          resnet, output_blocks.{b*(L+1) + j}.0/.1 = up block b resnet/attention j (L+1 per up block), its
          upsampler at .1 (no attention) or .2; resnets norm1/conv1/norm2/conv2/time_emb_proj/conv_shortcut =
          in_layers.0/in_layers.2/out_layers.0/out_layers.3/emb_layers.1/skip_connection; SDXL's add_embedding
          = label_emb.0.0/.0.2 (L = layers_per_block).
  VAE     first_stage_model.  encoder.down.{b}.block.{j}, encoder.down.{b}.downsample, decoder.up.{N-1-b}.block.{j},
          decoder.up.{N-1-b}.upsample, {en,de}coder.mid.block_{1,2}, mid.attn_1 (norm, q, k, v, proj_out as 1x1
          convolutions), nin_shortcut, norm_out.
  Text    SD 1.x: cond_stage_model.transformer.text_model.* (transformers' CLIPTextModel keys). SD 2.x (OpenCLIP,
          gelu): cond_stage_model.model.{token_embedding, positional_embedding, ln_final,
          transformer.resblocks.{i}.{ln_1, ln_2, attn.in_proj_weight (q, k, v stacked), attn.out_proj, mlp.c_fc,
          mlp.c_proj}}. SDXL: conditioner.embedders.0.transformer.text_model.* (CLIP ViT-L) and
          conditioner.embedders.1.model.* (OpenCLIP bigG, as SD 2.x, plus text_projection = the projection's
          weight transposed).
Every file is checked before it is written: diffusers' own LDM -> diffusers converters must give back every tensor
of every model, unchanged, or nothing is written (an internal error with the first differing key).

Reading (`--pretrained_model_name_or_path model.safetensors`): diffusers' `from_single_file`, with `--model_config`
(a diffusers pipeline folder or Hub id for the component configs, needed offline) or `--original_config` (the LDM
YAML).
"""

from __future__ import annotations

import logging
import os

import torch

from utils.atomic import atomic_file
from utils.errors import UserError, UserFileNotFoundError
from utils.sd.model_kind import SDXL_PIPELINE, pipeline_class_name

logger = logging.getLogger(__name__)

SINGLE_FILE_NAME = "model.safetensors"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
CLIP_PREFIX, OPEN_CLIP_PREFIX = "cond_stage_model.transformer.", "cond_stage_model.model."
SDXL_CLIP_PREFIX, SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
RESNET_NAMES = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
UNET_TOP_LEVEL = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                  "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
                  "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def add_single_file_args(parser) -> None:
    group = parser.add_argument_group("single-file checkpoints (AUTOMATIC1111 / ComfyUI / Forge)")
    group.add_argument("--save_single_file", action="store_true",
                       help=f"Also save the final model as one {SINGLE_FILE_NAME} in the original LDM/SGM key layout "
                            "(SD 1.x/2.x, SDXL; the EMA weights with --use_ema), for ComfyUI, AUTOMATIC1111 and Forge.")
    group.add_argument("--single_file_dtype", type=str, default="fp16", choices=sorted(DTYPES),
                       help="The precision of --save_single_file's tensors.")
    group.add_argument("--model_config", type=str, default=None,
                       help="With --pretrained_model_name_or_path model.safetensors: a diffusers pipeline folder or "
                            "Hub id whose component configs (and tokenizer, scheduler) describe the file; for an SD3 "
                            "file, also the text encoders it does not hold.")
    group.add_argument("--original_config", type=str, default=None,
                       help="With --pretrained_model_name_or_path model.safetensors: the original LDM YAML "
                            "(e.g. v1-inference.yaml) instead of --model_config.")


def _rename(key: str, old: str, new: str) -> str:
    return new + key[len(old):]


def _resnet(suffix: str) -> str:
    for diffusers_name, ldm_name in RESNET_NAMES:
        if suffix.startswith(diffusers_name + "."):
            return ldm_name + suffix[len(diffusers_name):]
    return suffix


def unet_to_ldm(state_dict: dict, config) -> dict:
    """A diffusers UNet2DConditionModel state dict in the LDM layout (keys without the model.diffusion_model.
    prefix)."""
    per_block = config["layers_per_block"]
    if not isinstance(per_block, int):
        raise UserError("--save_single_file: a UNet with a different layers_per_block per block has no LDM layout.")
    up_attention = [block.startswith("CrossAttn") for block in config["up_block_types"]]
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        top = next((name for name in UNET_TOP_LEVEL if key.startswith(name + ".")), None)
        if top is not None:
            out[_rename(key, top, UNET_TOP_LEVEL[top])] = value
        elif parts[0] == "down_blocks":
            block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "resnets":
                out[f"input_blocks.{1 + block * (per_block + 1) + index}.0.{_resnet(rest)}"] = value
            elif kind == "attentions":
                out[f"input_blocks.{1 + block * (per_block + 1) + index}.1.{rest}"] = value
            else:  # downsamplers.0.conv.weight -> input_blocks.N.0.op.weight
                out[f"input_blocks.{(block + 1) * (per_block + 1)}.0.op.{parts[-1]}"] = value
        elif parts[0] == "mid_block":
            kind, index, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            if kind == "resnets":
                out[f"middle_block.{2 * index}.{_resnet(rest)}"] = value
            else:
                out[f"middle_block.1.{rest}"] = value
        elif parts[0] == "up_blocks":
            block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            first = block * (per_block + 1)
            if kind == "resnets":
                out[f"output_blocks.{first + index}.0.{_resnet(rest)}"] = value
            elif kind == "attentions":
                out[f"output_blocks.{first + index}.1.{rest}"] = value
            else:  # upsamplers.0.conv.* -> after the block's last resnet (and attention)
                out[f"output_blocks.{first + per_block}.{2 if up_attention[block] else 1}.conv.{parts[-1]}"] = value
        else:
            raise UserError(f"--save_single_file: the UNet weight {key} has no place in the LDM layout "
                            "(only Stable Diffusion 1.x/2.x-shaped UNets can be saved as one file).")
    return out


def vae_to_ldm(state_dict: dict, config) -> dict:
    """A diffusers AutoencoderKL state dict in the LDM layout (keys without the first_stage_model. prefix)."""
    num_up = len(config["up_block_types"])
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        side = parts[0]
        if parts[1:2] == ["down_blocks"]:
            block, kind, rest = int(parts[2]), parts[3], parts[4:]
            if kind == "resnets":
                new = f"{side}.down.{block}.block.{rest[0]}.{'.'.join(rest[1:])}"
            else:
                new = f"{side}.down.{block}.downsample.{'.'.join(rest[1:])}"
        elif parts[1:2] == ["up_blocks"]:
            block, kind, rest = num_up - 1 - int(parts[2]), parts[3], parts[4:]
            if kind == "resnets":
                new = f"{side}.up.{block}.block.{rest[0]}.{'.'.join(rest[1:])}"
            else:
                new = f"{side}.up.{block}.upsample.{'.'.join(rest[1:])}"
        elif parts[1:3] == ["mid_block", "resnets"]:
            new = f"{side}.mid.block_{int(parts[3]) + 1}.{'.'.join(parts[4:])}"
        elif parts[1:3] == ["mid_block", "attentions"]:
            rest = ".".join(parts[4:])
            for diffusers_name, ldm_name in (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."),
                                             ("to_v.", "v."), ("to_out.0.", "proj_out.")):
                if rest.startswith(diffusers_name):
                    rest = ldm_name + rest[len(diffusers_name):]
            new = f"{side}.mid.attn_1.{rest}"
            if value.ndim == 2 and not rest.startswith("norm."):  # linear -> the original 1x1 convolution
                value = value[:, :, None, None]
        elif parts[1] == "conv_norm_out":
            new = f"{side}.norm_out.{parts[-1]}"
        else:
            new = key
        out[new.replace("conv_shortcut", "nin_shortcut")] = value
    return out


def uses_open_clip(text_encoder) -> bool:
    """SD 2.x's OpenCLIP text encoder (gelu) rather than SD 1.x's OpenAI CLIP (quick_gelu)."""
    return text_encoder.config.hidden_act == "gelu"


def text_encoder_to_ldm(text_encoder, clip_prefix: str = CLIP_PREFIX, open_clip_prefix: str = OPEN_CLIP_PREFIX,
                        open_clip: bool | None = None) -> dict:
    """The text encoder in the LDM layout, prefix included: CLIP (SD 1.x; SDXL's first) or OpenCLIP (SD 2.x;
    SDXL's second, with its text_projection)."""
    state = {(k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): v
             for k, v in text_encoder.state_dict().items() if not k.endswith("position_ids")}
    if not (uses_open_clip(text_encoder) if open_clip is None else open_clip):
        return {clip_prefix + k: v for k, v in state.items()}
    out, attention = {}, {}
    for key, value in state.items():
        if key == "text_projection.weight":
            out["text_projection"] = value.T
            continue
        key = key[len("text_model."):]
        if key == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == "embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key.startswith("final_layer_norm."):
            out["ln_final." + key.split(".")[-1]] = value
        elif key.startswith("encoder.layers."):
            parts = key.split(".")
            layer, rest = parts[2], ".".join(parts[3:])
            if rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                attention.setdefault((layer, parts[-1]), {})[rest.split(".")[1]] = value
                continue
            for diffusers_name, ldm_name in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                                             ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj")):
                rest = rest.replace(diffusers_name, ldm_name)
            out[f"transformer.resblocks.{layer}.{rest}"] = value
        else:
            raise UserError(f"--save_single_file: the text-encoder weight {key} has no place in the OpenCLIP layout.")
    for (layer, kind), qkv in attention.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([qkv["q_proj"], qkv["k_proj"],
                                                                               qkv["v_proj"]])
    return {open_clip_prefix + k: v for k, v in out.items()}


def _check_round_trip(name: str, original: dict, converted: dict) -> None:
    """diffusers' converter must give back exactly the original tensors (an internal error otherwise)."""
    missing = sorted(set(original) - set(converted))
    extra = sorted(set(converted) - set(original))
    if missing or extra:
        raise RuntimeError(f"single-file {name}: diffusers reads back different keys (missing {missing[:3]}, "
                           f"unexpected {extra[:3]})")
    for key, value in original.items():
        back = converted[key]
        if back.shape != value.shape or not torch.equal(back.reshape(value.shape), value):
            raise RuntimeError(f"single-file {name}: {key} does not round-trip through diffusers' converter")


def _text_state(text_encoder) -> dict:
    return {k: v for k, v in text_encoder.state_dict().items() if not k.endswith("position_ids")}


def _as_model_keys(converted: dict, text_encoder) -> dict:
    """diffusers' converted text-encoder keys as the model names them (transformers >= 5.6 flattened
    CLIPTextModel: no text_model. level)."""
    converted = {k: v for k, v in converted.items() if not k.endswith("position_ids")}
    if not any(k.startswith("text_model.") for k in text_encoder.state_dict()):
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    return converted


def single_file_state_dict(unet, vae, text_encoder, text_encoder_2=None) -> dict:
    """The whole model in the LDM layout (SDXL: the SGM layout), each part checked against diffusers' own
    LDM -> diffusers converters."""
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)

    unet_state, vae_state = unet.state_dict(), vae.state_dict()
    unet_ldm = {UNET_PREFIX + k: v for k, v in unet_to_ldm(unet_state, unet.config).items()}
    vae_ldm = {VAE_PREFIX + k: v for k, v in vae_to_ldm(vae_state, vae.config).items()}
    _check_round_trip("UNet", unet_state, convert_ldm_unet_checkpoint(unet_ldm, unet.config))
    _check_round_trip("VAE", vae_state, convert_ldm_vae_checkpoint(vae_ldm, vae.config))
    if text_encoder_2 is not None:  # SDXL
        text_ldm = text_encoder_to_ldm(text_encoder, clip_prefix=SDXL_CLIP_PREFIX, open_clip=False)
        text_ldm_2 = text_encoder_to_ldm(text_encoder_2, open_clip_prefix=SDXL_OPEN_CLIP_PREFIX, open_clip=True)
        _check_round_trip("text encoder", _text_state(text_encoder),
                          _as_model_keys(convert_ldm_clip_checkpoint(text_ldm), text_encoder))
        back = convert_open_clip_checkpoint(text_encoder_2, text_ldm_2, prefix=SDXL_OPEN_CLIP_PREFIX)
        _check_round_trip("text encoder 2", _text_state(text_encoder_2), _as_model_keys(back, text_encoder_2))
        return {**unet_ldm, **vae_ldm, **text_ldm, **text_ldm_2}
    text_ldm = text_encoder_to_ldm(text_encoder)
    if uses_open_clip(text_encoder):
        back = convert_open_clip_checkpoint(text_encoder, text_ldm, prefix=OPEN_CLIP_PREFIX)
    else:
        back = convert_ldm_clip_checkpoint(text_ldm)
    _check_round_trip("text encoder", _text_state(text_encoder), _as_model_keys(back, text_encoder))
    return {**unet_ldm, **vae_ldm, **text_ldm}


# The shapes by which ComfyUI, AUTOMATIC1111 and Forge recognise a checkpoint (ComfyUI's model_detection reads
# the UNet's channels and context width; every UI builds the standard CLIP tokenizer of 49408 tokens, 77 positions).
_STANDARD = {"SD 1.x": {"blocks": [320, 640, 1280, 1280], "context": 768, "text": [768]},
             "SD 2.x": {"blocks": [320, 640, 1280, 1280], "context": 1024, "text": [1024]},
             "SDXL": {"blocks": [320, 640, 1280], "context": 2048, "text": [768, 1280]}}
_CLIP_VOCAB, _CLIP_POSITIONS = 49408, 77


def ui_compatibility_problem(unet, vae, text_encoder, text_encoder_2=None) -> str | None:
    """Why UI tools will not load this model as one file (None: it has a standard SD1/SD2/SDXL architecture
    and tokenizer), e.g. a model built from scratch with its own small vocabulary."""
    encoders = [e for e in (text_encoder, text_encoder_2) if e is not None]
    context = unet.config.cross_attention_dim
    kind = next((name for name, shape in _STANDARD.items() if list(unet.config.block_out_channels) == shape["blocks"]
                 and context == shape["context"] and [e.config.hidden_size for e in encoders] == shape["text"]), None)
    if kind is None:
        return (f"the UNet (channels {list(unet.config.block_out_channels)}, context {context}) and text encoder(s) "
                f"(width {[e.config.hidden_size for e in encoders]}) are not a standard SD 1.x / 2.x / SDXL "
                "architecture")
    for encoder in encoders:
        if (encoder.config.vocab_size, encoder.config.max_position_embeddings) != (_CLIP_VOCAB, _CLIP_POSITIONS):
            return (f"its text encoder has {encoder.config.vocab_size} token embeddings and "
                    f"{encoder.config.max_position_embeddings} positions, not CLIP's standard {_CLIP_VOCAB} and "
                    f"{_CLIP_POSITIONS} (its own tokenizer)")
    if vae.config.latent_channels != 4:
        return f"its VAE has {vae.config.latent_channels} latent channels, not 4"
    return None


def save_single_file(path: str, unet, vae, text_encoder, dtype: str = "fp16", metadata: dict | None = None,
                     text_encoder_2=None) -> str:
    """Write `path` (atomically: a temporary file renamed into place) in the LDM layout at `dtype`; says in one
    line when UI tools will not load it (`ui_compatibility_problem`)."""
    from safetensors.torch import save_file

    problem = ui_compatibility_problem(unet, vae, text_encoder, text_encoder_2)
    if problem:
        logger.warning(f"{path}: {problem}, so ComfyUI / AUTOMATIC1111 / Forge will not load this file; diffusers' "
                       "from_single_file (and this project's --model_config) will.")

    state = single_file_state_dict(unet, vae, text_encoder, text_encoder_2)
    target = DTYPES[dtype]
    tensors = {k: (v.to(target) if v.is_floating_point() else v).detach().cpu().contiguous() for k, v in state.items()}
    with atomic_file(path) as temp:
        save_file(tensors, temp, metadata={k: str(v) for k, v in (metadata or {}).items() if v is not None})
    return path


def load_single_file_pipeline(path: str, model_config: str | None, original_config: str | None, **kwargs):
    """A StableDiffusionPipeline (StableDiffusionXLPipeline for an SDXL file, StableDiffusion3Pipeline for an SD3 one)
    from one checkpoint file, by diffusers' `from_single_file`."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if not os.path.isfile(path):
        raise UserFileNotFoundError(f"--pretrained_model_name_or_path {path}: no such file")
    if model_config is None and original_config is None and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise UserError(f"--pretrained_model_name_or_path {path} is a single file and the Hub is offline: give "
                        "--model_config PIPELINE_FOLDER (the component configs, tokenizer and scheduler) or "
                        "--original_config v1-inference.yaml.")
    if original_config is not None and not os.path.isfile(original_config):
        raise UserFileNotFoundError(f"--original_config {original_config}: no such file")
    options = {"config": model_config} if model_config else {"original_config": original_config}
    if model_config is None and original_config is None:
        options = {}
    check_single_file_readable(path)
    kind = pipeline_class_name(path)
    if kind == "StableDiffusion3Pipeline":
        return load_sd3_single_file_pipeline(path, model_config, **kwargs)
    if kind == SDXL_PIPELINE:
        return StableDiffusionXLPipeline.from_single_file(path, add_watermarker=False, **options, **kwargs)
    try:
        return StableDiffusionPipeline.from_single_file(path, safety_checker=None, requires_safety_checker=False,
                                                        **options, **kwargs)
    except Exception as error:
        if path.endswith(".safetensors") or not _is_unsafe_pickle_error(error):
            raise
        raise UserError(_UNSAFE_PICKLE.format(path=path)) from None


_UNSAFE_PICKLE = ("{path} is a pickle (.ckpt) that holds more than plain tensors, so it is refused as unsafe: "
                  "loading it could run code. Convert it once, where you trust its source, to safetensors (e.g. "
                  "diffusers' scripts/convert_original_stable_diffusion_to_diffusers.py --checkpoint_path {path} "
                  "--to_safetensors, or ComfyUI's checkpoint save) and give that file.")


def _is_unsafe_pickle_error(error: BaseException) -> bool:
    import pickle

    chain = [error]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    return any(isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e) for e in chain)


def check_single_file_readable(path: str) -> None:
    """A damaged or truncated .safetensors single file, named in one block before diffusers' loader reads it."""
    if not path.endswith(".safetensors"):
        return
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as handle:
            for key in list(handle.keys())[-1:]:  # the last tensor ends at the file's end: a truncation shows here
                handle.get_tensor(key)
    except Exception as error:
        raise UserError(f"{path} cannot be read as safetensors ({type(error).__name__}: {error}; "
                        f"{os.path.getsize(path)} bytes): the file is damaged or truncated. Copy or download it again."
                        ) from None


def load_sd3_single_file_pipeline(path: str, model_config: str | None, **kwargs):
    """StableDiffusion3Pipeline.from_single_file: the transformer and VAE from `path`, the text encoders,
    tokenizers and scheduler from `model_config` (a pipeline folder or Hub id: the file does not hold them; diffusers
    wants the encoders passed in)."""
    from diffusers import StableDiffusion3Pipeline

    if not os.path.isfile(path):
        raise UserError(f"--pretrained_model_name_or_path {path}: no such file")
    if model_config is None:
        raise UserError(f"--pretrained_model_name_or_path {path} is a single-file SD3 checkpoint: give --model_config "
                        "with the SD3 pipeline it belongs to (a folder or Hub id, e.g. "
                        "stabilityai/stable-diffusion-3.5-medium), which holds the text encoders, tokenizers and "
                        "scheduler the file does not.")
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    config_kind = pipeline_class_name(model_config)
    if config_kind != "StableDiffusion3Pipeline":
        raise UserError(f"--model_config {model_config}: not an SD3 pipeline (its model_index.json names "
                        f"{config_kind}); give the SD3 / 3.5 pipeline the file belongs to.")
    dtype = {"torch_dtype": kwargs["torch_dtype"]} if "torch_dtype" in kwargs else {}
    encoders = {name: model_class.from_pretrained(model_config, subfolder=name, **dtype)
                for name, model_class in (("text_encoder", CLIPTextModelWithProjection),
                                          ("text_encoder_2", CLIPTextModelWithProjection),
                                          ("text_encoder_3", T5EncoderModel))
                if os.path.isdir(os.path.join(model_config, name)) or not os.path.isdir(model_config)}
    if "text_encoder_3" not in encoders:  # (SD3 runs without T5, as its pipeline allows)
        encoders["text_encoder_3"] = None
    return StableDiffusion3Pipeline.from_single_file(path, config=model_config, **encoders, **kwargs)
