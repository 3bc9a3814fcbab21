"""Validation images for text-to-image runs: the training modules themselves sample the prompts (no second
copy of the UNet), with the EMA weights when there is an EMA."""

from __future__ import annotations

import torch

from utils.cache import offload_cached_encoders
from utils.ema import ema_weights
from utils.images import save_and_log_images
from utils.sd.builder import assemble_pipeline
from utils.sd.schedulers import make_scheduler


@torch.no_grad()
def log_validation(args, accelerator, models, ema, step, weight_dtype):
    """Sample the validation prompts with the training modules themselves (no second copy)."""
    prompts = args.validation_prompts or ([args.validation_prompt] if args.validation_prompt else [])
    if not prompts:
        return None
    unet = accelerator.unwrap_model(models["unet"])
    with ema_weights(ema, unet.parameters()):  # sample with the EMA weights, then put the training weights back
        pipeline = assemble_pipeline(dict(
            unet=unet, vae=models["vae"], text_encoder=accelerator.unwrap_model(models["text_encoder"]),
            tokenizer=models["tokenizer"], scheduler=make_scheduler("dpm++", models["noise_scheduler"].config)))
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
                                     guidance_scale=args.validation_guidance_scale, height=args.resolution,
                                     width=args.resolution).images[0]
                images.append(image)
                captions.append(prompt)
        unet.train(was_training)
    path = save_and_log_images(accelerator, images, args.output_dir, "validation", step, captions,
                               columns=args.num_validation_images if args.num_validation_images > 1 else None)
    del pipeline
    offload_cached_encoders(models, args)
    return path


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
