"""Lumina-Image-2.0 behind the family interface, through diffusers' own classes: Lumina2Transformer2DModel (the
unified NextDiT), a Gemma-2 text encoder (its penultimate hidden states with their attention mask, the caption
behind Lumina's system prompt), FlowMatchEulerDiscreteScheduler, Lumina2Pipeline for sampling, saving and the LoRA
file. The objective is Lumina's reversed interpolation: sigma is the data fraction, x_sigma = (1 - sigma) noise +
sigma x, the transformer is given sigma as its timestep and predicts x - noise. Prompt format, LoRA layers and flag
defaults are those of diffusers' train_dreambooth_lora_lumina2.py (main, 2026-12, commit 58eb52c0)."""

from __future__ import annotations

import os

import torch

import utils.families.flow_matching as flow
from utils.checkpointing import own_memory
from utils.errors import UserError
from utils.families.flow_matching import FlowMatchingFamily
from utils.families.lumina2_single_file import check_single_file_shape, load_lumina2_single_file_transformer
from utils.latents import vae_scale_factor

# Lumina2Pipeline's own system prompt (its `system_prompt` attribute; what --system_prompt defaults to)
DEFAULT_SYSTEM_PROMPT = ("You are an assistant designed to generate superior images with the superior degree of "
                         "image-text alignment based on textual prompts or user prompts.")
DEFAULT_TRANSFORMER_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")  # diffusers' Lumina-2 LoRA script's


def build_tiny_lumina2(texts=None, seed: int = 0, tokenizer_dir: str | None = None,
                       transformer_config: dict | None = None, vae_config: dict | None = None) -> dict:
    """Fresh components of the tiny Lumina-2 pipeline of diffusers' own tests (tests/pipelines/lumina2/
    test_pipeline_lumina2.py, get_dummy_components; the Gemma-2 vocabulary sized to its tokenizer), with a
    Gemma-style tokenizer generated offline."""
    import tempfile

    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Transformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    from utils.sd.builder import build_gemma_tokenizer, tiny_flow_vae

    tokenizer = build_gemma_tokenizer(os.path.join(tokenizer_dir or tempfile.mkdtemp(prefix="tokenizers-"),
                                                   "tokenizer"), [DEFAULT_SYSTEM_PROMPT, *(texts or [])])
    torch.manual_seed(seed)
    transformer = Lumina2Transformer2DModel(**{**dict(sample_size=4, patch_size=2, in_channels=4, hidden_size=8,
                                                      num_layers=2, num_attention_heads=1, num_kv_heads=1,
                                                      multiple_of=16, ffn_dim_multiplier=None, norm_eps=1e-5,
                                                      scaling_factor=1.0, axes_dim_rope=[4, 2, 2], cap_feat_dim=8),
                                               **(transformer_config or {})})
    vae = tiny_flow_vae(4, vae_config, seed)
    torch.manual_seed(seed)
    text_encoder = Gemma2Model(Gemma2Config(head_dim=4, hidden_size=8, intermediate_size=8, num_attention_heads=2,
                                            num_hidden_layers=2, num_key_value_heads=2, sliding_window=2,
                                            vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                scheduler=FlowMatchEulerDiscreteScheduler())


def build_tiny_lumina2_pipeline(output_dir: str, texts=None, seed: int = 0, transformer_config: dict | None = None,
                                vae_config: dict | None = None) -> str:
    """A loadable tiny Lumina2Pipeline folder (the offline stand-in of diffusers' test components)."""
    from diffusers import Lumina2Pipeline

    Lumina2Pipeline(**build_tiny_lumina2(texts, seed, output_dir, transformer_config, vae_config)).save_pretrained(
        output_dir)
    return output_dir


class Lumina2(FlowMatchingFamily):
    name = "lumina2"
    model_card_tags = ["lumina2", "lumina2-diffusers", "text-to-image", "diffusers"]
    pipeline_class = "Lumina2Pipeline"
    pipeline_components = ("transformer", "vae", "text_encoder", "tokenizer")
    default_lora_targets = DEFAULT_TRANSFORMER_TARGETS
    architecture = "lumina2"
    other_layout = "the original Lumina-2 layout"

    def defaults(self, args) -> dict:
        return {"resolution": 512, "weighting_scheme": "none", "max_sequence_length": 256, "precondition_outputs": 0,
                "system_prompt": DEFAULT_SYSTEM_PROMPT,
                "output_dir": "lumina2-model-finetuned-lora" if args.use_lora else "lumina2-model-finetuned",
                "validation_epochs": 1, "num_validation_images": 4,
                "tracker_project_name": "text2image-fine-tune-lumina2"}

    def implied(self, args) -> dict:
        return {"text_encoder_use_attention_mask": True}  # Gemma reads its padding mask, and so does the transformer

    def check_args(self, args) -> None:
        flow.check_transformer_family_args(args, "Lumina-Image-2.0", "tiny-lumina2", system_prompt=True, kohya=True,
                                           single_file=True)
        refused = {"--train_text_encoder": args.train_text_encoder, "--lora_blocks": bool(args.lora_blocks),
                   "--precondition_outputs 1": args.precondition_outputs == 1}
        for flag, given in refused.items():
            if given:
                raise UserError(f"{flag} is not available for Lumina-Image-2.0 (diffusers' Lumina-2 script trains "
                                "the transformer, full or LoRA, on the velocity): drop it.")

    def load_models(self, source, captions_for_tokenizer) -> dict:
        return self.load_base_models(source, captions_for_tokenizer, build_tiny_lumina2, load_lumina2_pipeline_models,
                                     load_lumina2_single_file_models)

    def check_single_file(self, transformer) -> None:
        check_single_file_shape(transformer)

    def latent_multiple(self, models) -> int:
        return vae_scale_factor(models["vae"]) * models["transformer"].config.patch_size

    def trainable_text_encoder_names(self, models) -> list[str]:
        return []

    def encode_text(self, models, input_ids, attention_mask) -> dict:
        """input_ids / attention_mask [B, L] (the system prompt, " <Prompt Start> ", the caption) -> Gemma's
        penultimate hidden states [B, L, D] and the mask, as Lumina2Pipeline._get_gemma_prompt_embeds."""
        states = models["text_encoder"](input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return {"encoder_hidden_states": states.hidden_states[-2], "encoder_attention_mask": attention_mask}

    def noisy(self, latents, noise, sigmas) -> torch.Tensor:
        """Lumina's reversed interpolation (diffusers' Lumina-2 script): sigma is the data fraction,
        (1 - sigma) noise + sigma x: the shared interpolation with the two ends swapped."""
        return flow.noisy_input(noise, latents, sigmas)

    def prediction_and_target(self, prediction, noisy, latents, noise, sigmas):
        return prediction, latents - noise

    def predict(self, models, noisy, timesteps, batch) -> torch.Tensor:
        text = self.conditioning(models, batch, noisy.device)
        return models["transformer"](hidden_states=noisy, encoder_hidden_states=text["encoder_hidden_states"],
                                     encoder_attention_mask=text["encoder_attention_mask"], timestep=timesteps / 1000,
                                     return_dict=False)[0]

    def configure(self, args) -> None:
        super().configure(args)
        self.system_prompt = args.system_prompt

    def pipeline_call_kwargs(self) -> dict:
        return {"max_sequence_length": self.max_sequence_length, "system_prompt": self.system_prompt}

    def write_single_file(self, path, transformer, models, dtype, metadata) -> None:
        """The transformer in Alpha-VLLM's layout (utils/families/lumina2_single_file.py), what ComfyUI's
        diffusion-model loader reads."""
        from utils.families.lumina2_single_file import save_lumina2_single_file

        save_lumina2_single_file(path, transformer, dtype, metadata)

    def other_layout_module(self, module, transformer) -> None:
        from utils.families.lumina2_comfy import block_of

        block_of(module)

    def save_other_layout(self, directory, denoiser, encoders, metadata, dtype) -> str:
        """The original model's layout ComfyUI reads (utils/families/lumina2_comfy.py)."""
        return save_lumina2_original_lora(directory, denoiser, metadata, dtype)


def save_lumina2_original_lora(directory: str, transformer, metadata: dict | None, dtype) -> str:
    """pytorch_lora_weights_kohya.safetensors: the adapters in the original model's names (ComfyUI's file)."""
    from peft.utils import get_peft_model_state_dict

    from utils.families.original_layout import one_scale, write_layout_file
    from utils.families.lumina2_comfy import lumina2_original_state_dict

    scale, config = one_scale(transformer, "The original Lumina-2 LoRA layout"), transformer.peft_config["default"]
    tensors = lumina2_original_state_dict(transformer, get_peft_model_state_dict(transformer), scale)
    return write_layout_file(directory, tensors, metadata, dtype,
                             {"ss_network_dim": config.r, "ss_network_alpha": config.lora_alpha})


def load_lumina2_single_file_models(source) -> dict:
    """The transformer from one file in Alpha-VLLM's layout, the rest from --model_config's Lumina-2 pipeline."""
    return flow.transformer_file_models(source, load_lumina2_single_file_transformer, load_lumina2_pipeline_models)


def load_lumina2_pipeline_models(source, transformer=None) -> dict:
    """From a Lumina2Pipeline folder or Hub id (--revision, --variant; the transformer at --non_ema_revision, or
    `transformer` given)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, Lumina2Transformer2DModel
    from transformers import AutoModel, AutoTokenizer

    path, rev, variant = source.pretrained_model_name_or_path, source.revision, source.variant
    flow.check_pipeline_folder(path, "Lumina-Image-2.0", ("scheduler", "tokenizer", "text_encoder", "vae", "transformer"))
    return dict(
        noise_scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler", revision=rev),
        tokenizer=AutoTokenizer.from_pretrained(path, subfolder="tokenizer", revision=rev),
        text_encoder=own_memory(AutoModel.from_pretrained(path, subfolder="text_encoder", revision=rev,
                                                          variant=variant)),
        vae=own_memory(AutoencoderKL.from_pretrained(path, subfolder="vae", revision=rev, variant=variant)),
        transformer=transformer or own_memory(Lumina2Transformer2DModel.from_pretrained(
            path, subfolder="transformer", revision=source.non_ema_revision, variant=variant)))
