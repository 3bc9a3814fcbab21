"""Stable Diffusion 3 / 3.5 behind the family interface, through diffusers' own classes: SD3Transformer2DModel (the
MMDiT), two CLIP text encoders with projection plus T5 (optional, as the pipeline allows), a 16- (tiny: 4-) channel
VAE with a shift, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline for sampling, saving and LoRA files.
The prompt encoding, targets, LoRA layers and flag defaults are those of diffusers' train_dreambooth_sd3.py and
train_dreambooth_lora_sd3.py (diffusers main, 2026-12, commit 58eb52c0); the rectified flow is
utils/families/flow_matching.py."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

import utils.families.flow_matching as flow
from utils.checkpointing import own_memory
from utils.families.flow_matching import FlowMatchingFamily
from utils.latents import vae_scale_factor

PIPELINE = "StableDiffusion3Pipeline"
# diffusers' SD3 scripts' default LoRA targets: the joint attention's image and context projections
DEFAULT_TRANSFORMER_TARGETS = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                               "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"]
CLIP_LENGTH = 77  # diffusers' SD3 scripts and pipeline tokenize both CLIP prompts to 77 tokens


def build_tiny_sd3(texts=None, seed: int = 0, tokenizer_dir: str | None = None,
                   transformer_config: dict | None = None, vae_config: dict | None = None) -> dict:
    """Fresh components of the tiny SD3 pipeline of diffusers' own tests (tests/pipelines/stable_diffusion_3/
    test_pipeline_stable_diffusion_3.py, get_dummy_components; the T5 sized as hf-internal-testing/tiny-random-t5),
    with tokenizers generated offline: the CLIP BPE of utils/sd/builder.py and a unigram T5 tokenizer.
    `transformer_config` / `vae_config`: SD3Transformer2DModel / AutoencoderKL overrides (a test that must fit an
    image uses SD3's 16 latent channels)."""
    import tempfile

    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    from utils.sd.builder import (build_clip_tokenizer, build_t5_tokenizer, tiny_clip_config, tiny_flow_vae,
                                  tiny_t5_encoder)

    root = tokenizer_dir or tempfile.mkdtemp(prefix="tokenizers-")
    tokenizer = build_clip_tokenizer(os.path.join(root, "tokenizer"), texts, 500, model_max_length=CLIP_LENGTH)
    tokenizer_3 = build_t5_tokenizer(os.path.join(root, "tokenizer_3"), texts)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**{**dict(sample_size=32, patch_size=1, in_channels=4, num_layers=1,
                                                  attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                                  joint_attention_dim=32, pooled_projection_dim=64, out_channels=4),
                                           **(transformer_config or {})})
    clip = tiny_clip_config(tokenizer, CLIP_LENGTH)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(clip)
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(clip)
    text_encoder_3, vae = tiny_t5_encoder(tokenizer_3, seed), tiny_flow_vae(4, vae_config, seed)
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                text_encoder_2=text_encoder_2, tokenizer_2=tokenizer, text_encoder_3=text_encoder_3,
                tokenizer_3=tokenizer_3, scheduler=FlowMatchEulerDiscreteScheduler())


def build_tiny_sd3_pipeline(output_dir: str, texts=None, seed: int = 0, transformer_config: dict | None = None,
                            vae_config: dict | None = None) -> str:
    """A loadable tiny StableDiffusion3Pipeline folder (the offline stand-in of hf-internal-testing/tiny-sd3-pipe)."""
    from diffusers import StableDiffusion3Pipeline

    components = build_tiny_sd3(texts, seed, output_dir, transformer_config, vae_config)
    StableDiffusion3Pipeline(**components).save_pretrained(output_dir)
    return output_dir


def encode_prompt(encoders: list, input_ids: torch.Tensor, max_sequence_length: int,
                  joint_attention_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [B, 3, L] (CLIP-L, CLIP-G, T5 rows, right-padded to a common L) -> (prompt_embeds
    [B, 77 + max_sequence_length, D_T5]: both CLIPs' penultimate hidden states side by side, zero-padded (or cut) to
    the T5 width, followed by T5's last hidden state; pooled [B, P1 + P2]: both CLIPs' projections), as
    StableDiffusion3Pipeline.encode_prompt. Without T5 (encoders[2] None) its part is zeros, as the pipeline's."""
    hidden, pooled = [], []
    for index, encoder in enumerate(encoders[:2]):
        output = encoder(input_ids[:, index, :CLIP_LENGTH], output_hidden_states=True)
        pooled.append(output[0])
        hidden.append(output.hidden_states[-2])
    clip = torch.cat(hidden, dim=-1)
    if encoders[2] is not None:
        t5 = encoders[2](input_ids[:, 2, :max_sequence_length])[0].to(clip.dtype)
    else:
        t5 = torch.zeros(clip.shape[0], max_sequence_length, joint_attention_dim, device=clip.device, dtype=clip.dtype)
    clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)


class StableDiffusion3(FlowMatchingFamily):
    name = "sd3"
    model_card_tags = ["sd3", "sd3-diffusers", "text-to-image", "diffusers"]
    pipeline_class = PIPELINE
    pipeline_components = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                           "text_encoder_3", "tokenizer_3")
    default_lora_targets = tuple(DEFAULT_TRANSFORMER_TARGETS)
    architecture = "sd3"
    other_layout = "kohya's SD3 layout"
    joint_attention_dim = 4096  # the transformer's (load_models reads it)

    def defaults(self, args) -> dict:
        return {"resolution": 512, "weighting_scheme": "logit_normal", "max_sequence_length": 77,
                "precondition_outputs": 1,
                "output_dir": "sd3-model-finetuned-lora" if args.use_lora else "sd3-model-finetuned",
                "validation_epochs": 1, "num_validation_images": 4, "tracker_project_name": "text2image-fine-tune-sd3"}

    def check_args(self, args) -> None:
        flow.check_transformer_family_args(args, "Stable Diffusion 3", "tiny-sd3", kohya=True, single_file=True)

    def load_models(self, source, captions_for_tokenizer) -> dict:
        models = self.load_base_models(source, captions_for_tokenizer, build_tiny_sd3, load_sd3_pipeline_models,
                                       load_sd3_single_file_models)
        flow.check_sequence_length(self.max_sequence_length, models.get("tokenizer_3"))
        self.joint_attention_dim = models["transformer"].config.joint_attention_dim  # (T5's width; read before DDP)
        return models

    def latent_multiple(self, models) -> int:
        return vae_scale_factor(models["vae"]) * models["transformer"].config.patch_size

    def trainable_text_encoder_names(self, models) -> list[str]:
        return ["text_encoder", "text_encoder_2"]  # the CLIPs (diffusers' SD3 scripts leave T5 frozen)

    def encode_text(self, models, input_ids, attention_mask) -> dict:
        encoders = [models["text_encoder"], models["text_encoder_2"], models.get("text_encoder_3")]
        prompt, pooled = encode_prompt(encoders, input_ids, self.max_sequence_length, self.joint_attention_dim)
        return {"encoder_hidden_states": prompt, "pooled_prompt_embeds": pooled}

    def predict(self, models, noisy, timesteps, batch) -> torch.Tensor:
        text = self.conditioning(models, batch, noisy.device)
        return models["transformer"](hidden_states=noisy, timestep=timesteps,
                                     encoder_hidden_states=text["encoder_hidden_states"],
                                     pooled_projections=text["pooled_prompt_embeds"], return_dict=False)[0]

    def lora_targets(self, args) -> list[str]:
        """--lora_layers (or --lora_target_modules), else diffusers' attention projections; --lora_blocks limits
        them to those transformer blocks (diffusers' train_dreambooth_lora_sd3.py)."""
        targets = super().lora_targets(args)
        if args.lora_blocks:
            blocks = [int(block) for block in args.lora_blocks.split(",")]
            targets = [f"transformer_blocks.{block}.{module}" for block in blocks for module in targets]
        return targets

    def other_layout_module(self, module, transformer) -> None:
        from utils.families.sd3_kohya import original_module

        original_module(module, transformer.config.num_layers)

    def save_other_layout(self, directory, denoiser, encoders, metadata, dtype) -> str:
        """sd-scripts' names, what ComfyUI reads as kohya's (utils/families/sd3_kohya.py)."""
        from utils.families.sd3_kohya import save_sd3_kohya_lora

        return save_sd3_kohya_lora(directory, denoiser, encoders, metadata, dtype)

    def write_pipeline(self, output, models, unwrapped, directory) -> None:
        if output.skip_text_encoder:
            unwrapped = dict(unwrapped, text_encoder=None, text_encoder_2=None)
        super().write_pipeline(output, models, unwrapped, directory)

    def write_single_file(self, path, transformer, models, dtype, metadata) -> None:
        """The transformer and VAE in Stability's layout (utils/families/sd3_single_file.py), what ComfyUI and the
        UIs load."""
        from utils.families.sd3_single_file import save_sd3_single_file

        save_sd3_single_file(path, transformer, models["vae"], dtype, metadata)


def load_sd3_single_file_models(source) -> dict:
    """From one SD3 checkpoint file (the transformer and VAE) with --model_config's text encoders, tokenizers and
    scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from utils.sd.single_file import load_sd3_single_file_pipeline

    pipeline = load_sd3_single_file_pipeline(source.pretrained_model_name_or_path, source.model_config)
    models = {name: getattr(pipeline, name) for name in ("tokenizer", "tokenizer_2", "tokenizer_3", "text_encoder",
                                                         "text_encoder_2", "text_encoder_3", "vae", "transformer")
              if getattr(pipeline, name, None) is not None}
    models = {name: own_memory(value) if isinstance(value, torch.nn.Module) else value for name, value in models.items()}
    return dict(models, noise_scheduler=FlowMatchEulerDiscreteScheduler.from_config(pipeline.scheduler.config))


def load_sd3_pipeline_models(source) -> dict:
    """From a StableDiffusion3Pipeline folder or Hub id (--revision, --variant; the transformer at
    --non_ema_revision). A pipeline saved without T5 (text_encoder_3 null) trains with T5's part zero, as the
    pipeline samples it."""
    import json

    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

    path, rev, variant = source.pretrained_model_name_or_path, source.revision, source.variant
    flow.check_pipeline_folder(path, "Stable Diffusion 3", ("scheduler", "tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "vae",
                                                       "transformer"))
    index_path = os.path.join(path, "model_index.json")
    index = json.load(open(index_path, encoding="utf-8")) if os.path.isfile(index_path) else {}
    has_t5 = (index.get("text_encoder_3") or [None])[0] is not None if index else True
    models = dict(
        noise_scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler", revision=rev),
        tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=rev),
        tokenizer_2=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", revision=rev),
        text_encoder=own_memory(CLIPTextModelWithProjection.from_pretrained(
            path, subfolder="text_encoder", revision=rev, variant=variant)),
        text_encoder_2=own_memory(CLIPTextModelWithProjection.from_pretrained(
            path, subfolder="text_encoder_2", revision=rev, variant=variant)),
        vae=own_memory(AutoencoderKL.from_pretrained(path, subfolder="vae", revision=rev, variant=variant)),
        transformer=own_memory(SD3Transformer2DModel.from_pretrained(
            path, subfolder="transformer", revision=source.non_ema_revision, variant=variant)))
    if has_t5:
        models.update(tokenizer_3=AutoTokenizer.from_pretrained(path, subfolder="tokenizer_3", revision=rev),
                      text_encoder_3=own_memory(T5EncoderModel.from_pretrained(
                          path, subfolder="text_encoder_3", revision=rev, variant=variant)))
    return models
