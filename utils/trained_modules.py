"""Which of a text-to-image run's modules train and how, for any family (utils/families/): the denoiser (UNet or
transformer), full or LoRA, the text encoders --train_text_encoder trains, the joint VAE; their devices and dtypes,
`accelerator.prepare`'s order and the checkpoint hooks (checkpoint-N/<denoiser>/,
LoRA as the adapter file only)."""

from __future__ import annotations

import os

import torch

from utils.checkpointing import register_checkpoint_hooks
from utils.ema import ema_checkpoint_hooks
from utils.sd.lora import add_lora_adapter
from utils.sd.vae_training import joint_vae


def trained_text_encoders(args, family, models) -> list[str]:
    """The text encoders this run trains (--train_text_encoder: those the family lets train)."""
    return family.trainable_text_encoder_names(models) if args.train_text_encoder else []


def trained_modules(args, family, models) -> list:
    """The modules the optimizer updates, in `accelerator.prepare` order: denoiser, text encoder(s), joint VAE."""
    return [models[family.denoiser]] + [models[name] for name in trained_text_encoders(args, family, models)] + \
        ([models["vae"]] if joint_vae(args) else [])


def trained_networks(args, family, models) -> list:
    """The denoiser and the trained text encoders (what --train_batch_size auto probes)."""
    return [models[family.denoiser]] + [models[name] for name in trained_text_encoders(args, family, models)]


def configure_training(args, family, accelerator, models, weight_dtype) -> None:
    """Which weights train (full, LoRA, text encoders, joint VAE), their devices and dtypes, memory savers."""
    from diffusers.training_utils import cast_training_params

    denoiser, vae = models[family.denoiser], models["vae"]
    text_encoders = [models[name] for name in family.text_encoder_names(models)]
    trained_encoders = [models[name] for name in trained_text_encoders(args, family, models)]
    vae.requires_grad_(joint_vae(args))
    frozen = [models[name] for name in family.frozen_networks(models)]  # ControlNet: the UNet it steers
    for network in frozen:
        network.requires_grad_(False).to(accelerator.device, dtype=weight_dtype)
    train_text_encoder_fully = args.train_text_encoder and not args.use_lora
    for text_encoder in text_encoders:
        text_encoder.requires_grad_(train_text_encoder_fully and text_encoder in trained_encoders)
    denoiser.requires_grad_(not args.use_lora)
    vae.to(accelerator.device, dtype=torch.float32 if args.train_vae or family.vae_in_float32(args) else weight_dtype)
    if args.use_lora:
        denoiser.to(accelerator.device, dtype=weight_dtype)
        add_lora_adapter(denoiser, args, family.lora_targets(args))
        family.check_lora_layout(denoiser)
        for text_encoder in trained_encoders:
            add_lora_adapter(text_encoder, args, family.text_encoder_lora_targets)
    for text_encoder in text_encoders:
        if not (train_text_encoder_fully and text_encoder in trained_encoders):
            text_encoder.to(accelerator.device, dtype=torch.float32 if text_encoder in trained_encoders else weight_dtype)
    if args.use_lora and accelerator.mixed_precision == "fp16":
        # Trainable LoRA weights must be fp32 for the grad scaler, however fp16 was chosen
        # (flag or accelerate config): otherwise "Attempting to unscale FP16 gradients".
        cast_training_params([denoiser] + trained_encoders, dtype=torch.float32)
    for network in [denoiser] + frozen:
        if args.enable_xformers_memory_efficient_attention:
            network.enable_xformers_memory_efficient_attention()
        if args.enable_npu_flash_attention:
            network.enable_npu_flash_attention()
    if args.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
        for text_encoder in trained_encoders:
            text_encoder.gradient_checkpointing_enable()


def register_hooks(args, family, accelerator, models, ema) -> None:
    """Checkpoints store each trained module in diffusers format (checkpoint-N/unet, unet_ema, transformer, ...),
    LoRA as the family's adapter file only."""
    encoders = {name: models[name] for name in trained_text_encoders(args, family, models)}
    name = family.denoiser
    trained = {name: models[name], **encoders, **({"vae": models["vae"]} if joint_vae(args) else {})}
    save_fns = load_fns = None
    if args.use_lora:  # one file holds the denoiser's and the text encoders' adapters
        save_fns = {name: lambda m, d: family.save_lora(os.path.dirname(d), m, encoders),
                    **{encoder: lambda m, d: None for encoder in encoders}}
        load_fns = {name: lambda m, d: family.load_lora_into(os.path.dirname(d), m, encoders),
                    **{encoder: lambda m, d: None for encoder in encoders}}
    register_checkpoint_hooks(accelerator, trained, save_fns=save_fns, load_fns=load_fns,
                              **ema_checkpoint_hooks(ema, f"{name}_ema"))


def prepare(accelerator, args, family, models, optimizer, train_dataloader, lr_scheduler):
    """`accelerator.prepare` the trained modules with the optimizer, data and schedule; `models` gets the
    prepared (wrapped) denoiser / text encoders. Returns the prepared trained modules (they accumulate gradients)."""
    trained = trained_modules(args, family, models)
    prepared = accelerator.prepare(*trained, optimizer, train_dataloader, lr_scheduler)
    models[family.denoiser] = prepared[0]
    for index, name in enumerate(trained_text_encoders(args, family, models), start=1):
        models[name] = prepared[index]
    return list(prepared[:len(trained)]), *prepared[-3:]
