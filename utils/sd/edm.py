"""EDM-style training of an SD/SDXL UNet (`--do_edm_style_training`, diffusers' train_dreambooth_lora_sdxl.py; Karras et
al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models", section 5).

As diffusers' script: the noise scheduler is an EulerDiscreteScheduler on the pipeline's scheduler config; a sample's
noise level is one of its training timesteps (a uniformly drawn index into `scheduler.timesteps`, continuous values,
with its sigma); the latents are noised as x + sigma n, the UNet sees them scaled by 1 / sqrt(sigma^2 + 1) and the
timestep; its output is turned into a denoised estimate (epsilon: x_noisy - sigma eps; v: the v-parametrisation's
c_skip x_noisy + c_out v), compared with the clean latents, each sample's squared error weighted by sigma^-2.
Pipelines whose own scheduler is an EDM one (Playground v2.5: EDMEulerScheduler, a VAE with latents_mean/std) are
refused: their latent scaling is not what this trainer applies.
"""

from __future__ import annotations

import torch

from utils.errors import UserError


def edm_noise_scheduler(config):
    """The training scheduler of an EDM-style run: EulerDiscreteScheduler on the pipeline's scheduler config."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_config(config)


def check_not_edm_pipeline(path: str | None, scheduler_class: str | None) -> None:
    """An EDM pipeline (its own scheduler an EDM one) is refused: its VAE scaling is not this trainer's."""
    if scheduler_class and "EDM" in scheduler_class:
        raise UserError(f"--pretrained_model_name_or_path {path}: its scheduler is {scheduler_class}, an EDM "
                        "pipeline (Playground v2.5 style, whose VAE scales latents by latents_mean/std); training it "
                        "is not available yet. Use an SD/SDXL pipeline (with --do_edm_style_training for EDM-style "
                        "training of it).")


def check_edm_args(args) -> None:
    """--do_edm_style_training with what belongs to the DDPM objective: one-block errors."""
    if not args.do_edm_style_training:
        return
    refused = {"--snr_gamma": args.snr_gamma is not None, "--loss_type other than l2": args.loss_type != "l2",
               "--debiased_estimation_loss": args.debiased_estimation_loss, "--dream_training": args.dream_training,
               "--input_perturbation": bool(args.input_perturbation), "--masked_loss": args.masked_loss,
               "--timestep_bias_strategy": args.timestep_bias_strategy != "none"}
    given = [flag for flag, value in refused.items() if value]
    if given:
        raise UserError(f"--do_edm_style_training weighs each sample by sigma^-2 on a denoised estimate (diffusers' "
                        f"formulation); {given[0]} is for the DDPM objective: drop one of them.")


def is_edm_run(noise_scheduler) -> bool:
    """Whether the training scheduler is an EDM-style run's (edm_noise_scheduler's; DDPM otherwise)."""
    return type(noise_scheduler).__name__ == "EulerDiscreteScheduler"


def edm_inputs(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor):
    """(timesteps [B], sigmas [B, 1, 1, 1], noisy latents, the UNet's preconditioned input) of one batch."""
    indices = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],))
    timesteps = noise_scheduler.timesteps[indices].to(device=latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    # (diffusers' get_sigmas looks each timestep up in scheduler.timesteps; they are distinct, so the drawn index
    # is that position)
    sigmas = noise_scheduler.sigmas.to(device=latents.device, dtype=noisy.dtype)[indices.to(latents.device)]
    sigmas = sigmas.view(-1, *([1] * (latents.ndim - 1)))
    return timesteps, sigmas, noisy, noisy / (sigmas ** 2 + 1) ** 0.5


def edm_denoised(noise_scheduler, prediction: torch.Tensor, noisy: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The UNet's output as an estimate of the clean latents (its preconditioned output)."""
    if noise_scheduler.config.prediction_type == "epsilon":
        return prediction * (-sigmas) + noisy
    if noise_scheduler.config.prediction_type == "v_prediction":
        return prediction * (-sigmas / (sigmas ** 2 + 1) ** 0.5) + noisy / (sigmas ** 2 + 1)
    raise UserError(f"--do_edm_style_training: prediction type {noise_scheduler.config.prediction_type} is neither "
                    "epsilon nor v_prediction.")


def edm_loss(prediction: torch.Tensor, target: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Each sample's mean squared error weighted by sigma^-2, averaged over the batch (diffusers' lines)."""
    per_sample = (prediction.float() - target.float()).pow(2).reshape(target.shape[0], -1).mean(dim=1)
    return (sigmas.float().reshape(-1) ** -2.0 * per_sample).mean()
