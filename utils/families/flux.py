"""FLUX.1 (dev, schnell) behind the family interface, through diffusers' own classes: FluxTransformer2DModel (double-
and single-stream blocks, RoPE over image and text ids, a guidance embedding on dev), CLIP-L (its pooled output) +
T5 (the token states), a VAE with a shift, FlowMatchEulerDiscreteScheduler, FluxPipeline for sampling, saving and the
LoRA file. Latents are packed into 2x2 patches as FluxPipeline does (`_pack_latents`, `_prepare_latent_image_ids`,
`_unpack_latents`: called, not copied). Prompt encoding, targets, guidance, LoRA layers and flag defaults are those
of diffusers' train_dreambooth_flux.py and train_dreambooth_lora_flux.py (main, 2026-12, commit 58eb52c0)."""

from __future__ import annotations

import os

import torch

import utils.families.flow_matching as flow
from utils.checkpointing import own_memory
from utils.errors import UserError
from utils.families.flow_matching import FlowMatchingFamily
from utils.families.flux_single_file import check_single_file_width, load_flux_single_file_transformer
from utils.latents import vae_scale_factor


CLIP_LENGTH = 77
# diffusers' FLUX LoRA script's default targets: attention and feed-forward of the double-stream blocks
DEFAULT_TRANSFORMER_TARGETS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj",
                               "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
                               "ff_context.net.0.proj", "ff_context.net.2")


def build_tiny_flux(texts=None, seed: int = 0, tokenizer_dir: str | None = None,
                    transformer_config: dict | None = None, guidance_embeds: bool = True,
                    vae_config: dict | None = None) -> dict:
    """Fresh components of the tiny FLUX pipeline of diffusers' own tests (tests/pipelines/flux/test_pipeline_flux.py,
    get_dummy_components; T5 sized as hf-internal-testing/tiny-random-t5), tokenizers generated offline; with a
    guidance embedding (dev) unless `guidance_embeds` is False (schnell). `transformer_config` / `vae_config`:
    FluxTransformer2DModel / AutoencoderKL overrides."""
    import tempfile

    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel

    from utils.sd.builder import (build_clip_tokenizer, build_t5_tokenizer, tiny_clip_config, tiny_flow_vae,
                                  tiny_t5_encoder)

    root = tokenizer_dir or tempfile.mkdtemp(prefix="tokenizers-")
    tokenizer = build_clip_tokenizer(os.path.join(root, "tokenizer"), texts, 500, model_max_length=CLIP_LENGTH)
    tokenizer_2 = build_t5_tokenizer(os.path.join(root, "tokenizer_2"), texts)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**{**dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                                   pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
                                                   guidance_embeds=guidance_embeds),
                                            **(transformer_config or {})})
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(tiny_clip_config(tokenizer, CLIP_LENGTH))
    text_encoder_2, vae = tiny_t5_encoder(tokenizer_2, seed), tiny_flow_vae(1, vae_config, seed)
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, scheduler=FlowMatchEulerDiscreteScheduler())


def build_tiny_flux_pipeline(output_dir: str, texts=None, seed: int = 0, guidance_embeds: bool = True,
                             transformer_config: dict | None = None, vae_config: dict | None = None) -> str:
    """A loadable tiny FluxPipeline folder (the offline stand-in of hf-internal-testing/tiny-flux-pipe)."""
    from diffusers import FluxPipeline

    components = build_tiny_flux(texts, seed, output_dir, transformer_config, guidance_embeds, vae_config)
    FluxPipeline(**components).save_pretrained(output_dir)
    return output_dir


class Flux(FlowMatchingFamily):
    name = "flux"
    model_card_tags = ["flux", "flux-diffusers", "text-to-image", "diffusers"]
    pipeline_class = "FluxPipeline"
    pipeline_components = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    default_lora_targets = DEFAULT_TRANSFORMER_TARGETS
    architecture = "flux1"
    other_layout = "kohya's FLUX layout"
    guidance_scale, guidance_embeds = 3.5, True  # configure() / load_models() set the run's

    def configure(self, args) -> None:
        super().configure(args)
        self.guidance_scale = args.guidance_scale

    def defaults(self, args) -> dict:
        return {"resolution": 512, "weighting_scheme": "none", "max_sequence_length": 512, "precondition_outputs": 0,
                "output_dir": "flux-model-finetuned-lora" if args.use_lora else "flux-model-finetuned",
                "validation_epochs": 1, "num_validation_images": 4, "tracker_project_name": "text2image-fine-tune-flux"}

    def check_args(self, args) -> None:
        flow.check_transformer_family_args(args, "FLUX.1", "tiny-flux", kohya=True, single_file=True)
        if args.lora_blocks:
            raise UserError("--lora_blocks is SD3's (diffusers' FLUX scripts have no such flag): name the modules "
                            "with --lora_layers, e.g. transformer_blocks.0.attn.to_q.")

    def load_models(self, source, captions_for_tokenizer) -> dict:
        models = self.load_base_models(source, captions_for_tokenizer, build_tiny_flux, load_flux_pipeline_models,
                                       load_flux_single_file_models)
        flow.check_sequence_length(self.max_sequence_length, models["tokenizer_2"])
        self.guidance_embeds = models["transformer"].config.guidance_embeds  # (read before DDP wraps it)
        return models

    def check_single_file(self, transformer) -> None:
        check_single_file_width(transformer)

    def latent_multiple(self, models) -> int:
        return vae_scale_factor(models["vae"]) * 2 * models["transformer"].config.patch_size  # 2x2 packing

    def trainable_text_encoder_names(self, models) -> list[str]:
        return ["text_encoder"]  # CLIP (diffusers' FLUX scripts leave T5 frozen)

    def encode_text(self, models, input_ids, attention_mask) -> dict:
        """[B, 2, L] (CLIP row, T5 row) -> T5's last hidden state [B, max_sequence_length, D] and CLIP's pooled
        output [B, P], as FluxPipeline.encode_prompt."""
        pooled = models["text_encoder"](input_ids[:, 0, :CLIP_LENGTH], output_hidden_states=False).pooler_output
        prompt = models["text_encoder_2"](input_ids[:, 1, :self.max_sequence_length], output_hidden_states=False)[0]
        return {"encoder_hidden_states": prompt.to(pooled.dtype), "pooled_prompt_embeds": pooled}

    def predict(self, models, noisy, timesteps, batch) -> torch.Tensor:
        """FluxPipeline's call of the transformer: 2x2-packed latents with their position ids, text ids of zeros,
        the timestep / 1000 and, on dev, the distilled guidance --guidance_scale; the output unpacked."""
        from diffusers import FluxPipeline

        text = self.conditioning(models, batch, noisy.device)
        batch_size, channels, height, width = noisy.shape
        image_ids = FluxPipeline._prepare_latent_image_ids(batch_size, height // 2, width // 2, noisy.device,
                                                           noisy.dtype)
        text_ids = torch.zeros(text["encoder_hidden_states"].shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        guidance = (torch.full((batch_size,), self.guidance_scale, device=noisy.device)
                    if self.guidance_embeds else None)
        packed = FluxPipeline._pack_latents(noisy, batch_size, channels, height, width)
        prediction = models["transformer"](hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                                           pooled_projections=text["pooled_prompt_embeds"],
                                           encoder_hidden_states=text["encoder_hidden_states"], txt_ids=text_ids,
                                           img_ids=image_ids, return_dict=False)[0]
        return FluxPipeline._unpack_latents(prediction, height, width, 1)  # (sizes in latent pixels: factor 1)

    def pipeline_call_kwargs(self) -> dict:
        return {"max_sequence_length": self.max_sequence_length}

    def write_single_file(self, path, transformer, models, dtype, metadata) -> None:
        """The transformer in Black Forest Labs' layout (utils/families/flux_single_file.py), what ComfyUI's
        diffusion-model loader reads."""
        from utils.families.flux_single_file import save_flux_single_file

        save_flux_single_file(path, transformer, dtype, metadata)

    def other_layout_module(self, module, transformer) -> None:
        from utils.families.flux_kohya import kohya_module

        kohya_module(module)

    def save_other_layout(self, directory, denoiser, encoders, metadata, dtype) -> str:
        return save_flux_kohya_lora(directory, denoiser, encoders.get("text_encoder"), metadata, dtype)


def save_flux_kohya_lora(directory: str, transformer, text_encoder, metadata: dict | None, dtype) -> str:
    """pytorch_lora_weights_kohya.safetensors (utils/families/flux_kohya.py) with kohya's ss_network_* keys."""
    from peft.utils import get_peft_model_state_dict

    from utils.families.flux_kohya import flux_kohya_state_dict
    from utils.families.original_layout import one_scale, write_layout_file

    scale, config = one_scale(transformer, "kohya's FLUX layout"), transformer.peft_config["default"]
    text = (get_peft_model_state_dict(text_encoder), text_encoder.peft_config["default"].lora_alpha) \
        if text_encoder is not None else (None, None)
    tensors = flux_kohya_state_dict(get_peft_model_state_dict(transformer), scale, *text)
    if any(key.startswith("lora_unet_final_layer_") for key in tensors):
        flow.logger.warning("The kohya file holds LoRA on the final layer (norm_out.linear / proj_out): ComfyUI and "
                            "sd-scripts apply it, but diffusers' FluxPipeline.load_lora_weights drops it from kohya "
                            "files (its converter names those keys without the transformer prefix); with diffusers, "
                            "load pytorch_lora_weights.safetensors.")
    return write_layout_file(directory, tensors, metadata, dtype, {
        "ss_network_module": "networks.lora_flux", "ss_network_dim": config.r, "ss_network_alpha": config.lora_alpha})


def load_flux_single_file_models(source) -> dict:
    """The transformer from one file in BFL's layout, the other components from --model_config's FLUX pipeline."""
    return flow.transformer_file_models(source, load_flux_single_file_transformer, load_flux_pipeline_models)


def load_flux_pipeline_models(source, transformer=None) -> dict:
    """From a FluxPipeline folder or Hub id (--revision, --variant; the transformer at --non_ema_revision, or
    `transformer` given). FLUX needs its T5: a pipeline without one is refused."""
    import json

    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

    path, rev, variant = source.pretrained_model_name_or_path, source.revision, source.variant
    flow.check_pipeline_folder(path, "FLUX.1", ("scheduler", "tokenizer", "vae"))
    index_path = os.path.join(path, "model_index.json")
    if os.path.isfile(index_path):
        index = json.load(open(index_path, encoding="utf-8"))
        missing = [name for name in ("text_encoder_2", "tokenizer_2", "transformer", "vae", "text_encoder")
                   if (index.get(name) or [None])[0] is None]
        if missing:
            raise UserError(f"--pretrained_model_name_or_path {path}: a FLUX pipeline without {', '.join(missing)} "
                            "(FLUX reads its prompt through T5 and CLIP); give the complete pipeline folder.")
    return dict(
        noise_scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler", revision=rev),
        tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=rev),
        tokenizer_2=AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2", revision=rev),
        text_encoder=own_memory(CLIPTextModel.from_pretrained(path, subfolder="text_encoder", revision=rev,
                                                              variant=variant)),
        text_encoder_2=own_memory(T5EncoderModel.from_pretrained(path, subfolder="text_encoder_2", revision=rev,
                                                                 variant=variant)),
        vae=own_memory(AutoencoderKL.from_pretrained(path, subfolder="vae", revision=rev, variant=variant)),
        transformer=transformer or own_memory(FluxTransformer2DModel.from_pretrained(
            path, subfolder="transformer", revision=source.non_ema_revision, variant=variant)))
