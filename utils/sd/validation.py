"""Validation for text-to-image runs: images (the training modules themselves sample the prompts, no second copy
of the UNet, with the EMA weights when there is an EMA) and the held-out loss of --validation_split."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from utils.cache import CacheSettings, offload_cached_encoders
from utils.data import held_out_position
from utils.ema import ema_weights
from utils.images import save_and_log_images
from utils.latents import encode_latents, scale_latents
from utils.speed import forward_autocast


def validation_prompts(args) -> list[str]:
    """--validation_prompts, or the LoRA/DreamBooth scripts' one --validation_prompt."""
    return args.validation_prompts or ([args.validation_prompt] if args.validation_prompt else [])


@dataclass(frozen=True)
class ValidationSettings:
    """What validation samples and how, typed (`from_args`: the flags of the same names, the prompts from
    `validation_prompts`, the resolved cache flags)."""

    prompts: tuple[str, ...]
    final_validation_prompt: str | None  # sampled at the end when there are no validation prompts
    num_validation_images: int  # per prompt
    validation_scheduler: str | None  # None: the training scheduler's inference counterpart
    validation_inference_steps: int
    validation_guidance_scale: float
    resolution: int
    seed: int | None
    output_dir: str  # the images go to <output_dir>/samples
    metrics_num_samples: int  # --validation_metrics: held-out rows sampled
    cache: CacheSettings  # the encoders the caches moved off the device come back for sampling

    @classmethod
    def from_args(cls, args) -> "ValidationSettings":
        plain = {f.name: getattr(args, f.name) for f in fields(cls) if f.name not in ("prompts", "cache")}
        return cls(prompts=tuple(validation_prompts(args)), cache=CacheSettings.from_args(args), **plain)


@torch.no_grad()
def sample_prompts(settings: ValidationSettings, family, accelerator, models, ema, prompts: list[str],
                   per_prompt: int, conditions: list[dict] | None = None) -> list:
    """`per_prompt` images of each prompt, sampled with the training modules themselves (no second copy; the EMA
    weights when there is an EMA, the training weights put back after) through the family's pipeline, seeded.
    `conditions`: per prompt, extra pipeline arguments (a ControlNet's conditioning image)."""
    denoiser = accelerator.unwrap_model(models[family.denoiser])
    with ema_weights(ema, denoiser.parameters()):
        components = {name: accelerator.unwrap_model(module) if isinstance(module, torch.nn.Module) else module
                      for name, module in models.items() if module is not None}
        pipeline = family.pipeline(dict(components, scheduler=models["noise_scheduler"]),
                                   settings.validation_scheduler)
        pipeline.to(accelerator.device)  # the VAE/text encoder are off the device when cached
        pipeline.set_progress_bar_config(disable=True)
        generator = torch.Generator(device=accelerator.device).manual_seed(settings.seed or 0)
        images = []
        was_training = denoiser.training
        denoiser.eval()
        for prompt, condition in zip(prompts, conditions or [{}] * len(prompts)):
            for _ in range(per_prompt):
                with forward_autocast(accelerator, everywhere=True):
                    images.append(pipeline(prompt, num_inference_steps=settings.validation_inference_steps,
                                           generator=generator, guidance_scale=settings.validation_guidance_scale,
                                           height=settings.resolution, width=settings.resolution,
                                           **condition, **family.pipeline_call_kwargs()).images[0])
        denoiser.train(was_training)
    del pipeline
    offload_cached_encoders(models, settings.cache)
    return images


def log_validation(settings: ValidationSettings, family, accelerator, models, ema, step, final: bool = False):
    """Sample the validation prompts (sample_prompts); the final one (`final`) samples --final_validation_prompt
    when there are no validation prompts."""
    final_prompt = settings.final_validation_prompt
    prompts = list(settings.prompts) or ([final_prompt] if final and final_prompt else [])
    if not prompts:
        return None
    prompts, conditions = family.validation_samples(prompts, settings.resolution)
    per_prompt = settings.num_validation_images
    images = sample_prompts(settings, family, accelerator, models, ema, prompts, per_prompt, conditions)
    captions = [prompt for prompt in prompts for _ in range(per_prompt)]
    return save_and_log_images(accelerator, images, settings.output_dir, "validation", step, captions,
                               columns=per_prompt if per_prompt > 1 else None)


def held_out_quality(settings: ValidationSettings, family, accelerator, models, held_out, quality) -> dict:
    """--validation_metrics on the first --metrics_num_samples held-out rows: their captions sampled once each,
    scored against the held-out images as the model sees them (centre crop); on the main process, shared
    (QualityMetrics.on_main_process)."""
    from utils.quality import to_uint8

    def samples():
        base = getattr(held_out, "base", held_out)  # (the cache's dataset wraps the image dataset)
        items = [base[index] for index in range(min(settings.metrics_num_samples, len(base)))]
        captions = [item["caption"] for item in items]
        generated = to_uint8(sample_prompts(settings, family, accelerator, models, None, captions, 1,
                                            family.conditions_of(items)))
        return generated, captions, to_uint8(torch.stack([item["pixel_values"] for item in items]))

    return quality.on_main_process(accelerator, samples)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def held_out_timestep(index: int, num_train_timesteps: int) -> int:
    """Held-out sample `index`'s fixed timestep: a low-discrepancy (golden-ratio) spread over [0, T)."""
    return int(held_out_position(index) * num_train_timesteps)


def held_out_noise(seed: int | None, index: int, shape) -> torch.Tensor:
    """Held-out sample `index`'s fixed noise (float32, CPU): from its own generator, never the global one."""
    generator = torch.Generator().manual_seed(((seed or 0) * 1_000_003 + index) % 2**63)
    return torch.randn(tuple(shape), generator=generator)


@torch.no_grad()
def held_out_loss(family, accelerator, models, held_out, collate, batch_size: int, seed: int | None) -> float:
    """val/loss: the mean squared error of the prediction target (the family's: epsilon, v, flow velocity) over the
    held-out samples, each scored at its fixed timestep with its fixed noise on the VAE posterior mean (no caption
    dropout, no weighting). Every rank scores the samples index = rank (mod processes) and the sums are
    all-reduced, so the value does not depend on the number of processes or the batch size, and no global random
    state is used (a resume stays bitwise). Call it on every rank."""
    unwrapped = {name: accelerator.unwrap_model(module) if isinstance(module, torch.nn.Module) else module
                 for name, module in models.items()}
    denoiser, vae, device = unwrapped[family.denoiser], models["vae"], accelerator.device
    indices = list(range(accelerator.process_index, len(held_out), accelerator.num_processes))
    total, count = torch.zeros((), device=device, dtype=torch.float64), torch.zeros((), device=device)
    was_training = denoiser.training
    denoiser.eval()
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        batch = collate([held_out[index] for index in chunk])
        latents = (scale_latents(batch["latent_mean"].to(device), vae.config) if "latent_mean" in batch
                   else encode_latents(vae, batch["pixel_values"].to(device), sample=False)).float()
        noise = torch.stack([held_out_noise(seed, index, latents.shape[1:]) for index in chunk]).to(device)
        per_sample = family.held_out_error(unwrapped, batch, latents, noise, chunk,
                                           lambda: forward_autocast(accelerator, everywhere=True))
        total, count = total + per_sample.double().sum(), count + len(chunk)
    denoiser.train(was_training)
    total, count = accelerator.reduce(total, "sum"), accelerator.reduce(count, "sum")
    return (total / count.clamp_min(1)).item()
