#!/usr/bin/env python
"""Fine-tune (full or LoRA) or train from scratch a Stable Diffusion text-to-image model.

A drop-in for diffusers' examples/text_to_image/train_text_to_image.py and
train_text_to_image_lora.py: every flag of both, same names, defaults and output layout
(`checkpoint-N/`, the final pipeline or `pytorch_lora_weights.safetensors` in --output_dir).
Adds: from-scratch models (--model_preset / --unet_config / --vae_config, a VAE stage,
text-encoder training, caption dropout), --config YAML, step-based validation with
DPM-Solver++, training-health logs, atomic checkpoints, SIGTERM-safe stops.

    accelerate launch train_text_to_image.py --pretrained_model_name_or_path PATH \
        --dataset_name lambdalabs/naruto-blip-captions --resolution 512 --output_dir out
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os

import torch
import torch.nn.functional as F

from utils.checkpointing import (own_memory, read_training_state, register_checkpoint_hooks, resolve_resume_checkpoint,
                                save_checkpoint)
from utils.config import parse_args_with_config
from utils.auto_batch import add_auto_batch_args, batch_size_arg, resolve_auto_batch_size_for
from utils.sd.data import (ImageTransform, TextImageDataset, add_image_data_args, collate_text_image,
                           load_text_image_dataset)
from utils.data import make_train_dataloader
from utils.ema import add_ema_args, create_ema, load_ema, save_ema
from utils.hub import add_hub_args, check_hub_args, push_output_dir, redact_args, write_model_card
from utils.cache import add_cache_args, resolve_cache_args
from utils.sd.cache import cache_text_image_dataset, collate_cached, offload_cached_encoders, sample_cached_latents
from utils.sd.lora import (DEFAULT_TEXT_ENCODER_TARGETS, DEFAULT_UNET_TARGETS, add_lora_adapter, add_lora_args,
                           check_text_encoder_lora_support, load_lora_into, save_lora)
from utils.telemetry import HealthMonitor, NonFiniteGuard, global_norm
from utils.stopping import StopSignal
from utils.run import (add_run_args, create_accelerator, progress_bar, steps_per_epoch, tracker_config,
                       write_rank_checksums)
from utils.speed import add_speed_args, apply_speedups
from utils.optim import apply_update, fused_kwargs
from utils.errors import oom_hint
from utils.sd.vae_training import add_vae_args, latent_scaling_factor, load_finished_stage, train_vae_stage, vae_losses

logger = logging.getLogger("train_text_to_image")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                       help="Path to pretrained model or model identifier from huggingface.co/models. Omit with --model_preset to train from scratch.")
    model.add_argument("--revision", type=str, default=None, help="Revision of pretrained model identifier from huggingface.co/models.")
    model.add_argument("--variant", type=str, default=None, help="Variant of the model files of the pretrained model identifier, e.g. fp16")
    model.add_argument("--non_ema_revision", type=str, default=None,
                       help="Revision of pretrained non-ema model identifier. Must be a branch, tag or git identifier of the local or remote repository specified with --pretrained_model_name_or_path.")
    model.add_argument("--model_preset", type=str, default=None, choices=["tiny", "small", "base"],
                       help="Build fresh (random) models of this size instead of loading a pretrained pipeline.")
    model.add_argument("--unet_config", type=str, default=None, help="JSON file of UNet2DConditionModel config overrides (from scratch).")
    model.add_argument("--vae_config", type=str, default=None, help="JSON file of AutoencoderKL config overrides (from scratch).")
    model.add_argument("--text_encoder_name_or_path", type=str, default=None,
                       help="Load the tokenizer and CLIP text encoder from this path/Hub id (subfolders tokenizer/ and text_encoder/ if present).")
    model.add_argument("--prediction_type", type=str, default=None,
                       help="The prediction_type that shall be used for training. Choose between 'epsilon' or 'v_prediction' or leave `None`. If left to `None` the default prediction type of the scheduler: `noise_scheduler.config.prediction_type` is chosen.")
    add_vae_args(parser)
    add_lora_args(parser)
    add_image_data_args(parser)

    train = parser.add_argument_group("training")
    train.add_argument("--train_batch_size", type=batch_size_arg, default=16,
                       help="Batch size (per device) for the training dataloader, or 'auto': the largest that fits (see --effective_batch_size).")
    train.add_argument("--num_train_epochs", type=int, default=100)
    train.add_argument("--max_train_steps", type=int, default=None,
                       help="Total number of training steps to perform.  If provided, overrides num_train_epochs.")
    train.add_argument("--gradient_checkpointing", action="store_true",
                       help="Whether or not to use gradient checkpointing to save memory at the expense of slower backward pass.")
    train.add_argument("--learning_rate", type=float, default=1e-4, help="Initial learning rate (after the potential warmup period) to use.")
    train.add_argument("--scale_lr", action="store_true", default=False,
                       help="Scale the learning rate by the number of GPUs, gradient accumulation steps, and batch size.")
    train.add_argument("--lr_scheduler", type=str, default="constant",
                       help='The scheduler type to use. Choose between ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"]')
    train.add_argument("--lr_warmup_steps", type=int, default=500, help="Number of steps for the warmup in the lr scheduler.")
    train.add_argument("--resume_override_lr", action="store_true",
                       help="After --resume_from_checkpoint, restart the LR schedule (warmup included) at the current --learning_rate.")
    train.add_argument("--snr_gamma", type=float, default=None,
                       help="SNR weighting gamma to be used if rebalancing the loss. Recommended value is 5.0. More details here: https://huggingface.co/papers/2303.09556.")
    train.add_argument("--dream_training", action="store_true",
                       help="Use the DREAM training method, which makes training more efficient and accurate at the expense of doing an extra forward pass. See: https://huggingface.co/papers/2312.00210")
    train.add_argument("--dream_detail_preservation", type=float, default=1.0, help="Dream detail preservation factor p (should be greater than 0; default=1.0, as suggested in the paper)")
    train.add_argument("--use_8bit_adam", action="store_true", help="Whether or not to use 8-bit Adam from bitsandbytes.")
    train.add_argument("--adam_beta1", type=float, default=0.9, help="The beta1 parameter for the Adam optimizer.")
    train.add_argument("--adam_beta2", type=float, default=0.999, help="The beta2 parameter for the Adam optimizer.")
    train.add_argument("--adam_weight_decay", type=float, default=1e-2, help="Weight decay to use.")
    train.add_argument("--adam_epsilon", type=float, default=1e-08, help="Epsilon value for the Adam optimizer")
    train.add_argument("--noise_offset", type=float, default=0, help="The scale of noise offset.")
    train.add_argument("--input_perturbation", type=float, default=0, help="The scale of input perturbation. Recommended 0.1.")
    train.add_argument("--enable_xformers_memory_efficient_attention", action="store_true", help="Whether or not to use xformers.")
    train.add_argument("--train_text_encoder", action="store_true",
                       help="Train the text encoder too (fully when training from scratch or fine-tuning; its LoRA with --use_lora).")
    train.add_argument("--text_encoder_learning_rate", type=float, default=None, help="Text encoder LR (default: --learning_rate).")
    train.add_argument("--caption_dropout_prob", type=float, default=0.0,
                       help="Replace a caption by the empty prompt with this probability, so classifier-free guidance works.")

    val = parser.add_argument_group("validation")
    val.add_argument("--validation_prompts", type=str, default=None, nargs="+",
                     help="A set of prompts evaluated every `--validation_epochs` and logged to `--report_to`.")
    val.add_argument("--validation_prompt", type=str, default=None,
                     help="A prompt that is sampled --num_validation_images times during validation (LoRA script's flag).")
    val.add_argument("--num_validation_images", type=int, default=None,
                     help="Images per validation prompt (default: 1 per prompt for full training, 4 with --use_lora).")
    val.add_argument("--validation_epochs", type=int, default=None,
                     help="Run validation every X epochs (default 5; 1 with --use_lora, as in diffusers).")
    val.add_argument("--validation_steps", type=int, default=None, help="Also run validation every X optimizer steps.")
    val.add_argument("--validation_inference_steps", type=int, default=20, help="DPM-Solver++ steps for validation images.")
    val.add_argument("--validation_guidance_scale", type=float, default=7.5, help="Classifier-free guidance for validation images.")
    add_run_args(parser, output_dir_default=None)
    add_ema_args(parser)
    add_hub_args(parser)
    add_cache_args(parser)
    add_auto_batch_args(parser)
    add_speed_args(parser)
    args = parse_args_with_config(parser, argv)

    env_local_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_local_rank != -1 and env_local_rank != args.local_rank:
        args.local_rank = env_local_rank
    # The two diffusers scripts differ in these defaults; we follow whichever one the run is.
    if args.output_dir is None:
        args.output_dir = "sd-model-finetuned-lora" if args.use_lora else "sd-model-finetuned"
    if args.validation_epochs is None:
        args.validation_epochs = 1 if args.use_lora else 5
    if args.num_validation_images is None:
        args.num_validation_images = 4 if args.use_lora else 1
    if args.tracker_project_name is None:
        args.tracker_project_name = "text2image-fine-tune"
    if args.non_ema_revision is None:
        args.non_ema_revision = args.revision
    validate_args(args)
    resolve_cache_args(args, train_text_encoder=args.train_text_encoder)
    return args


def validate_args(args) -> None:
    if not args.pretrained_model_name_or_path and not args.model_preset:
        raise ValueError("Give --pretrained_model_name_or_path (fine-tune) or --model_preset tiny|small|base (train from scratch).")
    if args.pretrained_model_name_or_path and args.model_preset:
        raise ValueError("--pretrained_model_name_or_path and --model_preset are exclusive: load a model or build a fresh one.")
    if args.dataset_name is None and args.train_data_dir is None and args.train_data_file is None:
        raise ValueError("Need either a dataset name or a training folder (--dataset_name, --train_data_dir or --train_data_file).")
    if args.dream_training and args.prediction_type == "v_prediction":
        raise ValueError("--dream_training is only implemented for epsilon prediction; drop --prediction_type v_prediction.")
    if args.prediction_type not in (None, "epsilon", "v_prediction"):
        raise ValueError(f"--prediction_type {args.prediction_type}: choose 'epsilon' or 'v_prediction'.")
    if args.use_lora and args.use_ema:
        raise ValueError("--use_ema with --use_lora is not supported: EMA of LoRA adapters is not what diffusers' scripts do.")
    if args.use_lora and args.train_text_encoder:
        check_text_encoder_lora_support()
    if args.use_lora and args.train_vae:
        raise ValueError("--train_vae trains a VAE from scratch; it cannot be combined with --use_lora.")
    if args.train_vae and args.vae_training_mode == "joint" and (args.cache_latents or int(os.environ.get("WORLD_SIZE", 1)) > 1):
        raise ValueError("--vae_training_mode joint runs in one process without --cache_latents; use the default 'stage' mode.")
    if not 0.0 <= args.caption_dropout_prob < 1.0:
        raise ValueError("--caption_dropout_prob must be in [0, 1).")
    if args.enable_xformers_memory_efficient_attention:
        from diffusers.utils.import_utils import is_xformers_available

        if not is_xformers_available():
            raise ValueError("--enable_xformers_memory_efficient_attention: xformers is not installed "
                             "(pip install xformers, CUDA only). PyTorch's SDPA attention is used by default and needs nothing.")
    check_hub_args(args)


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------

def load_models(args, captions_for_tokenizer):
    """tokenizer, text_encoder, vae, unet and noise_scheduler: loaded, or built fresh from a preset."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if args.pretrained_model_name_or_path:
        path, rev = args.pretrained_model_name_or_path, args.revision
        models = dict(
            noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler"),
            tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=rev),
            text_encoder=own_memory(CLIPTextModel.from_pretrained(path, subfolder="text_encoder", revision=rev,
                                                                  variant=args.variant)),
            vae=own_memory(AutoencoderKL.from_pretrained(path, subfolder="vae", revision=rev, variant=args.variant)),
            unet=own_memory(UNet2DConditionModel.from_pretrained(path, subfolder="unet", revision=args.non_ema_revision)),
        )
    else:
        from utils.sd.builder import build_components

        read_json = lambda p: json.load(open(p, encoding="utf-8")) if p else None  # noqa: E731
        tokenizer = text_encoder = None
        if args.text_encoder_name_or_path:
            tokenizer, text_encoder = load_text_encoder(args.text_encoder_name_or_path)
        components = build_components(args.model_preset, texts=captions_for_tokenizer, resolution=args.resolution,
                                      seed=args.seed or 0, unet_config=read_json(args.unet_config),
                                      vae_config=read_json(args.vae_config), tokenizer=tokenizer,
                                      tokenizer_dir=os.path.join(args.output_dir, "tokenizer"))
        if text_encoder is not None:
            components["text_encoder"] = text_encoder
        models = dict(noise_scheduler=components.pop("scheduler"), **components)
    if args.prediction_type is not None:
        models["noise_scheduler"].register_to_config(prediction_type=args.prediction_type)
    return models


def load_text_encoder(path):
    from transformers import CLIPTextModel, CLIPTokenizer

    def sub(name):
        return dict(subfolder=name) if os.path.isdir(os.path.join(path, name)) else {}
    return CLIPTokenizer.from_pretrained(path, **sub("tokenizer")), CLIPTextModel.from_pretrained(path, **sub("text_encoder"))


def weight_dtype_of(accelerator) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def encode_latents(vae, pixel_values: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, H, W] in [-1, 1] -> scaled latents [B, C, H/f, W/f] (SD's scaling/shift convention)."""
    latents = vae.encode(pixel_values.to(vae.dtype)).latent_dist.sample()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def diffusion_loss(args, unet, text_encoder, vae, noise_scheduler, batch, monitor: HealthMonitor):
    """The denoising loss of one batch (epsilon or v target; min-SNR, offset noise, input perturbation, DREAM)."""
    from diffusers.training_utils import compute_dream_and_update_latents, compute_snr

    vae_loss = None
    if args.train_vae and args.vae_training_mode == "joint":  # VAE learns from its own loss only
        vae_loss, reconstruction, kl, raw_latents = vae_losses(vae, batch["pixel_values"], args.vae_kl_weight, return_latents=True)
        latents = raw_latents.detach() * vae.config.scaling_factor
        monitor.add(vae_reconstruction_loss=reconstruction, vae_kl=kl)
    else:
        latents = (sample_cached_latents(batch, vae.config) if "latent_mean" in batch
                   else encode_latents(vae, batch["pixel_values"])).float()
    noise = torch.randn_like(latents)
    if args.noise_offset:  # https://www.crosslabs.org//blog/diffusion-with-offset-noise
        noise += args.noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), device=latents.device)
    model_noise = noise + args.input_perturbation * torch.randn_like(noise) if args.input_perturbation else noise
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device).long()
    noisy_latents = noise_scheduler.add_noise(latents, model_noise, timesteps)
    encoder_hidden_states = batch["encoder_hidden_states"] if "encoder_hidden_states" in batch \
        else text_encoder(batch["input_ids"], return_dict=False)[0]
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    elif noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"Unknown prediction type {noise_scheduler.config.prediction_type}")
    if args.dream_training:
        noisy_latents, target = compute_dream_and_update_latents(
            unet, noise_scheduler, timesteps, noise, noisy_latents, target, encoder_hidden_states, args.dream_detail_preservation)
    model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
    if args.snr_gamma is None:
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    else:  # Min-SNR weighting, https://huggingface.co/papers/2303.09556 (Section 3.4)
        snr = compute_snr(noise_scheduler, timesteps)
        weights = torch.stack([snr, args.snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
        weights = weights / snr if noise_scheduler.config.prediction_type == "epsilon" else weights / (snr + 1)
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        loss = (loss * weights).mean()
    monitor.add(timestep_mean=timesteps.float().mean(), timestep_std=timesteps.float().std(correction=0),  # (batch 1: 0, not NaN)
                latent_std=latents.std(), noise_std=noise.std())
    return loss if vae_loss is None else loss + vae_loss


@torch.no_grad()
def log_validation(args, accelerator, models, ema, step, weight_dtype):
    """Sample the validation prompts with the training modules themselves (no second copy)."""
    from utils.sd.schedulers import make_scheduler
    from utils.sd.builder import assemble_pipeline
    from utils.images import save_and_log_images

    prompts = args.validation_prompts or ([args.validation_prompt] if args.validation_prompt else [])
    if not prompts:
        return None
    unet = accelerator.unwrap_model(models["unet"])
    if ema is not None:  # sample with the EMA weights, then put the training weights back
        ema.store(unet.parameters())
        ema.copy_to(unet.parameters())
    pipeline = assemble_pipeline(dict(
        unet=unet, vae=models["vae"], text_encoder=accelerator.unwrap_model(models["text_encoder"]),
        tokenizer=models["tokenizer"],
        scheduler=make_scheduler("dpm++", models["noise_scheduler"].config)))
    pipeline.to(accelerator.device)  # the VAE/text encoder are off the device when cached
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator(device=accelerator.device).manual_seed(args.seed or 0)
    images, captions = [], []
    was_training = unet.training
    unet.eval()
    for prompt in prompts:
        for _ in range(args.num_validation_images):
            with accelerator.autocast():
                image = pipeline(prompt, num_inference_steps=args.validation_inference_steps, generator=generator,
                                 guidance_scale=args.validation_guidance_scale, height=args.resolution, width=args.resolution).images[0]
            images.append(image)
            captions.append(prompt)
    unet.train(was_training)
    if ema is not None:
        ema.restore(unet.parameters())
    path = save_and_log_images(accelerator, images, args.output_dir, "validation", step, captions,
                               columns=args.num_validation_images if args.num_validation_images > 1 else None)
    del pipeline
    offload_cached_encoders(models, args)
    return path


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def main(args):
    from accelerate.utils import DataLoaderConfiguration
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params

    accelerator = create_accelerator(args, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    weight_dtype = weight_dtype_of(accelerator)

    # Data first: a from-scratch tokenizer learns its vocabulary from the captions.
    rows = load_text_image_dataset(args)
    captions = [c if isinstance(c, str) else " ".join(map(str, c)) for c in rows[args.caption_column] if c is not None] \
        if args.model_preset and not args.text_encoder_name_or_path else None
    with accelerator.main_process_first():
        models = load_models(args, captions)
    unet, vae, text_encoder, tokenizer = models["unet"], models["vae"], models["text_encoder"], models["tokenizer"]
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if args.resolution % vae_scale_factor:  # else the pipeline refuses it at the first validation, hours in
        raise ValueError(f"--resolution {args.resolution} must be a multiple of {vae_scale_factor} (the VAE downsamples by {vae_scale_factor}).")

    @functools.lru_cache(maxsize=1 << 16)  # captions repeat every epoch: tokenize each once (ids are only read)
    def tokenize(caption: str) -> torch.Tensor:
        return tokenizer(caption, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                         return_tensors="pt").input_ids[0]

    dataset = TextImageDataset(rows, args.image_column, args.caption_column,
                               ImageTransform(args.resolution, args.image_interpolation_mode, args.center_crop, args.random_flip),
                               tokenize, seed=args.seed, caption_dropout_prob=args.caption_dropout_prob,
                               skip_bad_samples=args.skip_bad_samples,
                               source_name=args.dataset_name or args.train_data_dir or args.train_data_file)
    train_dataloader = make_train_dataloader(dataset, 16 if args.train_batch_size == "auto" else args.train_batch_size,
                                             args.dataloader_num_workers, collate_text_image)

    if accelerator.is_main_process:  # before the VAE stage, so its losses are logged too
        accelerator.init_trackers(args.tracker_project_name, tracker_config(args))

    # From scratch: fit the VAE first (or reuse a finished stage), then freeze it.
    joint_vae = args.train_vae and args.vae_training_mode == "joint"
    if args.train_vae and not joint_vae:
        finished = load_finished_stage(args.output_dir)
        vae = finished if finished is not None else train_vae_stage(accelerator, vae, train_dataloader, args)
        models["vae"] = vae
    elif joint_vae:  # the UNet sees latents scaled by the initial VAE's statistics, fixed for the run
        vae.register_to_config(scaling_factor=latent_scaling_factor(vae, [b for _, b in zip(range(4), train_dataloader)], "cpu"))

    # Which weights train.
    vae.requires_grad_(joint_vae)
    train_text_encoder_fully = args.train_text_encoder and not args.use_lora
    text_encoder.requires_grad_(train_text_encoder_fully)
    unet.requires_grad_(not args.use_lora)
    vae.to(accelerator.device, dtype=torch.float32 if args.train_vae else weight_dtype)
    if args.use_lora:
        unet.to(accelerator.device, dtype=weight_dtype)
        add_lora_adapter(unet, args, args.lora_target_modules or DEFAULT_UNET_TARGETS)
        if args.train_text_encoder:
            text_encoder.requires_grad_(False)
            add_lora_adapter(text_encoder, args, DEFAULT_TEXT_ENCODER_TARGETS)
    if not train_text_encoder_fully:
        text_encoder.to(accelerator.device, dtype=weight_dtype if not args.train_text_encoder else torch.float32)
    if args.use_lora and accelerator.mixed_precision == "fp16":
        # Trainable LoRA weights must be fp32 for the grad scaler, however fp16 was chosen
        # (flag or accelerate config): otherwise "Attempting to unscale FP16 gradients".
        cast_training_params([unet] + ([text_encoder] if args.train_text_encoder else []), dtype=torch.float32)
    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            text_encoder.gradient_checkpointing_enable()

    # Speed: train from cached latents/embeddings, size the batch (--train_batch_size auto), compile.
    dataset = cache_text_image_dataset(dataset, vae, text_encoder, args, accelerator)
    offload_cached_encoders(models, args)
    collate = collate_cached if args.cache_latents or args.cache_text_embeddings else collate_text_image
    resolve_auto_batch_size_for(args, accelerator, lambda batch: diffusion_loss(args, unet, text_encoder, vae, models["noise_scheduler"],
                                                                                batch, HealthMonitor(1)),
                                dataset, collate, [unet] + ([text_encoder] if args.train_text_encoder else []))
    train_dataloader = make_train_dataloader(dataset, args.train_batch_size, args.dataloader_num_workers, collate)
    apply_speedups(unet, args)

    ema = None
    if args.use_ema:
        ema = create_ema(unet, args)
        ema.to("cpu" if args.offload_ema else accelerator.device)
        if args.offload_ema and torch.cuda.is_available():
            ema.pin_memory()

    # Checkpoints store each trained module in diffusers format (checkpoint-N/unet, unet_ema, ...).
    trained = {"unet": unet, **({"text_encoder": text_encoder} if args.train_text_encoder else {}), **({"vae": vae} if joint_vae else {})}
    if args.use_lora:
        lora_te = text_encoder if args.train_text_encoder else None
        save_fns = {"unet": lambda m, d: save_lora(os.path.dirname(d), m, lora_te), "text_encoder": lambda m, d: None}
        load_fns = {"unet": lambda m, d: load_lora_into(os.path.dirname(d), m, lora_te), "text_encoder": lambda m, d: None}
    else:
        save_fns = load_fns = None
    register_checkpoint_hooks(accelerator, trained, save_fns=save_fns, load_fns=load_fns,
                              extra_savers={"unet_ema": lambda d: save_ema(ema, d)} if ema else None,
                              extra_loaders={"unet_ema": lambda d: load_ema(ema, d)} if ema else None)

    # Optimizer and schedule.
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    param_groups = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": args.learning_rate}]
    if args.train_text_encoder:
        param_groups.append({"params": [p for p in text_encoder.parameters() if p.requires_grad],
                             "lr": args.text_encoder_learning_rate or args.learning_rate})
    if joint_vae:
        param_groups.append({"params": list(vae.parameters()), "lr": args.vae_learning_rate, "weight_decay": 0.0})
    initial_lrs = [group["lr"] for group in param_groups]  # from this run's flags (what --resume_override_lr restarts at)
    optimizer = make_optimizer(args, param_groups, accelerator.device)
    num_update_steps_per_epoch = steps_per_epoch(math.ceil(len(dataset) / (args.train_batch_size * accelerator.num_processes)),
                                                 args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * num_update_steps_per_epoch
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)

    to_prepare = [unet] + ([text_encoder] if args.train_text_encoder else []) + ([vae] if joint_vae else [])
    prepared = accelerator.prepare(*to_prepare, optimizer, train_dataloader, lr_scheduler)
    unet = prepared[0]
    text_encoder = prepared[1] if args.train_text_encoder else text_encoder
    optimizer, train_dataloader, lr_scheduler = prepared[-3:]
    models.update(unet=unet, text_encoder=text_encoder)
    to_prepare = list(prepared[:len(to_prepare)])  # the prepared (wrapped) modules accumulate gradients
    args.num_train_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)

    if accelerator.is_main_process:
        save_run_args(args)

    global_step, first_epoch, resume_batches = 0, 0, 0
    resume_path = resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if resume_path:
        accelerator.print(f"Resuming from checkpoint {resume_path}")
        accelerator.load_state(resume_path)
        global_step = read_training_state(resume_path)["global_step"]
        first_epoch = global_step // num_update_steps_per_epoch
        resume_batches = (global_step % num_update_steps_per_epoch) * args.gradient_accumulation_steps
        if args.resume_override_lr:
            restart_lr_schedule(lr_scheduler, optimizer, initial_lrs)

    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(f"***** Running training *****  examples={len(dataset)} epochs={args.num_train_epochs} "
                f"batch/device={args.train_batch_size} total batch={total_batch_size} "
                f"accumulation={args.gradient_accumulation_steps} steps={args.max_train_steps} (from {global_step})")
    monitor = HealthMonitor(samples_per_step=total_batch_size)
    guard = NonFiniteGuard(args.max_nonfinite_steps, check_every=args.logging_steps)
    stop = StopSignal(check_every=args.logging_steps)
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    progress = progress_bar(accelerator, args.max_train_steps, global_step)

    def checkpoint():
        save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit,
                        {"epoch": epoch, "skipped_nonfinite_steps": guard.total_skipped})

    epoch = first_epoch
    with oom_hint():
        for epoch in range(first_epoch, args.num_train_epochs):
            unet.train()
            if args.train_text_encoder:
                text_encoder.train()
            train_dataloader.set_epoch(epoch)
            dataset.set_epoch(epoch)
            loader = train_dataloader
            if epoch == first_epoch and resume_batches:
                loader = accelerator.skip_first_batches(train_dataloader, resume_batches)
            for batch in loader:
                with accelerator.accumulate(*to_prepare):
                    loss = diffusion_loss(args, unet, text_encoder, models["vae"], models["noise_scheduler"], batch, monitor)
                    accelerator.backward(loss)
                    grad_norm = apply_update(accelerator, optimizer, lr_scheduler, trainable, loss, args.max_grad_norm, guard)
                    if grad_norm is not None:
                        monitor.add(loss=loss, grad_norm=grad_norm)
                if not accelerator.sync_gradients:
                    continue
                if ema is not None:
                    if args.offload_ema:
                        ema.to(accelerator.device, non_blocking=True)
                    ema.step(accelerator.unwrap_model(unet).parameters())
                    if args.offload_ema:
                        ema.to("cpu", non_blocking=True)
                global_step += 1
                progress.update(1)
                monitor.step_done()
                if global_step % args.logging_steps == 0 or global_step == args.max_train_steps:
                    logs = monitor.collect()
                    logs.update(lr=lr_scheduler.get_last_lr()[0], param_norm=global_norm(trainable).item(),
                                skipped_nonfinite_steps=guard.total_skipped)
                    accelerator.log({f"train/{k}" if k != "loss" else "train_loss": v for k, v in logs.items()}, step=global_step)
                    progress.set_postfix(loss=f"{logs.get('loss', float('nan')):.4f}", lr=f"{logs['lr']:.2e}")
                if global_step % args.checkpointing_steps == 0:
                    checkpoint()
                # The last step's validation is the final one, made by save_final: not twice.
                if args.validation_steps and global_step % args.validation_steps == 0 and global_step < args.max_train_steps \
                        and accelerator.is_main_process:
                    log_validation(args, accelerator, models, ema, global_step, weight_dtype)
                if stop.should_stop(accelerator):
                    checkpoint()
                    accelerator.print(f"Stopped by {stop.signal_name or 'a signal'} at step {global_step}. Resume with: "
                                      f"--resume_from_checkpoint latest --output_dir {args.output_dir}")
                    accelerator.end_training()
                    return
                if global_step >= args.max_train_steps:
                    break
            if accelerator.is_main_process and (args.validation_prompts or args.validation_prompt) \
                    and epoch % args.validation_epochs == 0 and not args.validation_steps and global_step < args.max_train_steps:
                log_validation(args, accelerator, models, ema, global_step, weight_dtype)
            if global_step >= args.max_train_steps:
                break
    progress.close()
    write_rank_checksums(accelerator, unet)  # debug hook for the multi-process tests (no-op unless its env var is set)
    save_final(args, accelerator, models, ema)
    accelerator.end_training()


def make_optimizer(args, param_groups, device):
    kwargs = dict(betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise ImportError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from error
        return bnb.optim.AdamW8bit(param_groups, **kwargs)
    # The fused kernel is the fastest AdamW on CUDA and on CPU (measured on CPU for the 'small' UNet:
    # 11 ms a step against 31 ms for the for-loop and 40 ms for the foreach implementation).
    return torch.optim.AdamW(param_groups, **fused_kwargs(device), **kwargs)


def restart_lr_schedule(lr_scheduler, optimizer, learning_rates) -> None:
    """--resume_override_lr: base LRs from the current flags and the schedule back at step 0."""
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)
    for group, lr in zip(optimizer.param_groups, learning_rates):
        group["initial_lr"] = lr
    scheduler.base_lrs = list(learning_rates)
    scheduler.last_epoch = -1
    if hasattr(scheduler, "_initial_step"):
        scheduler._initial_step()
    else:
        scheduler.step()
    logger.info(f"--resume_override_lr: LR schedule restarted at {learning_rates}")


def save_run_args(args) -> None:
    """The run's arguments (without secrets) next to its outputs, for reproducibility."""
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "training_args.json"), "w", encoding="utf-8") as handle:
        json.dump(redact_args(args), handle, indent=2, default=str)


def save_final(args, accelerator, models, ema) -> None:
    """Final pipeline (or LoRA weights) in --output_dir, EMA weights copied in; model card; Hub push."""
    from diffusers import StableDiffusionPipeline

    from utils.sd.builder import assemble_pipeline

    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    unet = accelerator.unwrap_model(models["unet"])
    text_encoder = accelerator.unwrap_model(models["text_encoder"])
    grid = log_validation(args, accelerator, models, ema, args.max_train_steps, weight_dtype_of(accelerator))
    if args.use_lora:
        save_lora(args.output_dir, unet, text_encoder if args.train_text_encoder else None)
    else:
        if ema is not None:
            ema.copy_to(unet.parameters())
        trained = dict(unet=unet, text_encoder=text_encoder, vae=models["vae"])
        if args.pretrained_model_name_or_path:
            pipeline = StableDiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, revision=args.revision,
                                                               variant=args.variant, **trained)
            # Inference must use the target the UNet was trained for (diffusers' script keeps the base's).
            pipeline.scheduler.register_to_config(prediction_type=models["noise_scheduler"].config.prediction_type)
        else:
            pipeline = assemble_pipeline(dict(trained, tokenizer=models["tokenizer"], scheduler=models["noise_scheduler"]))
        pipeline.save_pretrained(args.output_dir)
    write_model_card(args.output_dir, base_model=args.pretrained_model_name_or_path or f"from scratch ({args.model_preset} preset)",
                     datasets=[args.dataset_name] if args.dataset_name else None, hyperparameters=redact_args(args),
                     validation_grid=grid, lora=args.use_lora)
    logger.info(f"Saved the final {'LoRA weights' if args.use_lora else 'pipeline'} to {args.output_dir}")
    if args.push_to_hub:
        push_output_dir(args.output_dir, args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir)),
                        token=args.hub_token, private=args.hub_private_repo)


if __name__ == "__main__":
    main(parse_args())
