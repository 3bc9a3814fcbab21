"""The denoising objective of text-to-image training (`diffusion_loss`) and its loss options, with
kohya-ss/sd-scripts' flag names and formulas.

- `--loss_type l2|l1|huber|smooth_l1`: per element, with c the Huber threshold,
      huber:     2c (sqrt((pred - target)^2 + c^2) - c)      (pseudo-Huber: ~(pred - target)^2 near 0, ~2c|.| far)
      smooth_l1: 2  (sqrt((pred - target)^2 + c^2) - c)
  (Khrapov & Popov, "Improving Diffusion Models's Data-Corruption Resistance using Scheduled Pseudo-Huber Loss",
  2024; the scheduled Huber loss of diffusers' research project and kohya's `conditional_loss`).
- `--huber_schedule constant|exponential|snr` (kohya's default: snr) gives c per sample from its timestep t:
      constant:    c = huber_c
      exponential: c = exp(-a t) with a = -ln(huber_c) / T           (1 at t = 0, huber_c at t = T)
      snr:         c = (1 - huber_c) / (1 + sigma_t)^2 + huber_c,  sigma_t = sqrt((1 - alphabar_t) / alphabar_t)
- `--debiased_estimation_loss`: weights each sample by 1/sqrt(SNR_t) (epsilon) or 1/(SNR_t + 1)
  (v-prediction), SNR clamped at 1000 (Yu et al., "Debias the Training of Diffusion Models", 2023; kohya's
  `apply_debiased_estimation`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_dream_and_update_latents, compute_snr

from utils.cache import sample_cached_latents
from utils.errors import UserError
from utils.latents import encode_latents, scale_latents
from utils.sd.controlnet import controlnet_residuals
from utils.sd.edm import edm_denoised, edm_inputs, edm_loss, is_edm_run
from utils.sd.masks import latent_mask
from utils.sd.sdxl import unet_conditioning
from utils.sd.vae_training import joint_vae, vae_losses

LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")


def add_loss_args(parser) -> None:
    parser.add_argument("--loss_type", type=str, default="l2", choices=LOSS_TYPES,
                        help="l2 (MSE, diffusers' default), l1, huber or smooth_l1 (pseudo-Huber with --huber_c).")
    parser.add_argument("--huber_schedule", type=str, default="snr", choices=HUBER_SCHEDULES,
                        help="How the Huber threshold follows the timestep (kohya's names; snr is its default).")
    parser.add_argument("--huber_c", type=float, default=0.1,
                        help="The Huber threshold (constant), or its value at the noisiest timestep (exponential, "
                             "snr). In (0, 1].")
    parser.add_argument("--debiased_estimation_loss", action="store_true",
                        help="Weight each sample by 1/sqrt(SNR) (v-prediction: 1/(SNR+1)), SNR clamped at 1000.")


def uses_loss_options(args) -> bool:
    return args.loss_type != "l2" or args.debiased_estimation_loss


def huber_threshold(schedule: str, huber_c: float, timesteps: torch.Tensor, noise_scheduler) -> torch.Tensor:
    """c per sample [B] (float32, on the timesteps' device)."""
    t = timesteps.float()
    if schedule == "constant":
        return torch.full_like(t, huber_c)
    if schedule == "exponential":
        alpha = -math.log(huber_c) / noise_scheduler.config.num_train_timesteps
        return torch.exp(-alpha * t)
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod) ** 0.5
    return (1.0 - huber_c) / (1.0 + sigmas) ** 2 + huber_c


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str, c: torch.Tensor | None,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """The element loss (times `mask` [B, 1, h, w] with --masked_loss) averaged over all but the batch dimension:
    [B]."""
    pred, target = pred.float(), target.float()
    if loss_type == "l2":
        element = F.mse_loss(pred, target, reduction="none")
    elif loss_type == "l1":
        element = F.l1_loss(pred, target, reduction="none")
    else:
        c = c.view(-1, *([1] * (pred.ndim - 1)))
        element = torch.sqrt((pred - target) ** 2 + c ** 2) - c
        element = 2 * c * element if loss_type == "huber" else 2 * element
    if mask is not None:
        element = element * mask
    return element.mean(dim=tuple(range(1, pred.ndim)))


def debiased_weights(noise_scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    snr = compute_snr(noise_scheduler, timesteps).clamp(max=1000.0)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return 1.0 / (snr + 1.0)
    return 1.0 / snr.sqrt()


def check_loss_args(args) -> None:
    if not 0.0 < args.huber_c <= 1.0:
        raise UserError(f"--huber_c {args.huber_c} must be in (0, 1] (the exponential schedule takes its log).")


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weights (https://huggingface.co/papers/2303.09556, Section 3.4), as diffusers' scripts."""
    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.stack([snr, gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    return weights / snr if noise_scheduler.config.prediction_type == "epsilon" else weights / (snr + 1)


def weighted_loss(args, pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, noise_scheduler,
                  mask: torch.Tensor | None = None):
    """The batch loss under --loss_type/--huber_*, --snr_gamma, --debiased_estimation_loss and --masked_loss
    (`mask`: [B, 1, h, w] on the latent grid, utils/sd/masks.py)."""
    c = (huber_threshold(args.huber_schedule, args.huber_c, timesteps, noise_scheduler)
         if args.loss_type in ("huber", "smooth_l1") else None)
    loss = per_sample_loss(pred, target, args.loss_type, c, mask)
    if args.snr_gamma is not None:
        loss = loss * min_snr_weights(noise_scheduler, timesteps, args.snr_gamma)
    if args.debiased_estimation_loss:
        loss = loss * debiased_weights(noise_scheduler, timesteps)
    return loss.mean()


def timestep_weights(args, num_timesteps: int) -> torch.Tensor | None:
    """--timestep_bias_*: each training timestep's sampling probability (None: uniform), as diffusers' SDXL
    scripts define it: the biased timesteps' weight multiplied by --timestep_bias_multiplier, then normalised.
    earlier/later: the first/last int(portion * T) timesteps; range: [begin, end)."""
    strategy = args.timestep_bias_strategy
    if strategy == "none":
        return None
    weights = torch.ones(num_timesteps, dtype=torch.float64)
    count = int(args.timestep_bias_portion * num_timesteps)
    if strategy == "range":
        if args.timestep_bias_end > num_timesteps:
            raise UserError(f"--timestep_bias_end {args.timestep_bias_end} is past the scheduler's {num_timesteps} "
                            "timesteps.")
        biased = slice(args.timestep_bias_begin, args.timestep_bias_end)
    elif count == 0:  # diffusers' slice(-0, None) would bias every timestep, i.e. none relative to the others
        return None
    else:
        biased = slice(0, count) if strategy == "earlier" else slice(num_timesteps - count, None)
    weights[biased] *= args.timestep_bias_multiplier
    return (weights / weights.sum()).float()


def sample_timesteps(args, num_timesteps: int, batch_size: int, device) -> torch.Tensor:
    """Training timesteps: uniform (torch.randint, as diffusers' scripts), or drawn with --timestep_bias_* weights."""
    weights = timestep_weights(args, num_timesteps)
    if weights is None:
        return torch.randint(0, num_timesteps, (batch_size,), device=device).long()
    return torch.multinomial(weights.to(device), batch_size, replacement=True).long()


def prior_preservation_loss(loss_of, model_pred, target, timesteps, prior_loss_weight: float, monitor,
                            mask: torch.Tensor | None = None) -> torch.Tensor:
    """DreamBooth's loss (diffusers' train_dreambooth.py): `loss_of` on the instance half of the batch plus
    `prior_loss_weight` x `loss_of` on the class half; both halves also go to `monitor` (train/instance_loss,
    train/prior_loss). `loss_of(prediction, target, timesteps, mask)`: the run's loss (MSE, min-SNR, Huber, masked,
    ...) of a batch, applied to both halves (diffusers applies min-SNR to the instance half only)."""
    (pred, pred_prior), (wanted, wanted_prior), (steps, steps_prior) = (
        torch.chunk(x, 2, dim=0) for x in (model_pred, target, timesteps))
    mask, mask_prior = torch.chunk(mask, 2, dim=0) if mask is not None else (None, None)
    instance_loss = loss_of(pred, wanted, steps, mask)
    prior_loss = loss_of(pred_prior, wanted_prior, steps_prior, mask_prior)
    monitor.add(instance_loss=instance_loss.detach(), prior_loss=prior_loss.detach())
    return instance_loss + prior_loss_weight * prior_loss


def diffusion_loss(args, models: dict, batch: dict, monitor, family) -> torch.Tensor:
    """The denoising loss of one batch of train_text_to_image.py (epsilon or v target; min-SNR, the loss options
    above, offset noise, input perturbation, DREAM; with --vae_training_mode joint plus the VAE's own loss).
    `models`: the pipeline's modules by name; `monitor`: a utils.telemetry.HealthMonitor for the batch's
    statistics; `family`: the SD-like family (utils/families/sd.py), whose `unet_inputs` / `unet_output` adapt the
    UNet's call (DeepFloyd IF: class labels, stage II's second input, the learned-variance channels)."""
    unet, vae, noise_scheduler = (models[k] for k in ("unet", "vae", "noise_scheduler"))

    vae_loss = None
    if joint_vae(args):  # the VAE learns from its own loss only
        vae_loss, reconstruction, kl, raw_latents = vae_losses(
            vae, batch["pixel_values"], args.vae_kl_weight, return_latents=True
        )
        latents = scale_latents(raw_latents.detach(), vae.config)
        monitor.add(vae_reconstruction_loss=reconstruction, vae_kl=kl)
    else:
        latents = (sample_cached_latents(batch, vae.config) if "latent_mean" in batch
                   else encode_latents(vae, batch["pixel_values"])).float()
    noise = torch.randn_like(latents)
    if args.noise_offset:  # https://www.crosslabs.org//blog/diffusion-with-offset-noise
        noise += args.noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), device=latents.device)
    model_noise = noise + args.input_perturbation * torch.randn_like(noise) if args.input_perturbation else noise
    edm = is_edm_run(noise_scheduler)  # --do_edm_style_training (utils/sd/edm.py: preconditioned, target x0)
    if edm:
        timesteps, sigmas, noisy_latents, model_input = edm_inputs(noise_scheduler, latents, model_noise)
    else:
        timesteps = sample_timesteps(args, noise_scheduler.config.num_train_timesteps, latents.shape[0], latents.device)
        noisy_latents = model_input = noise_scheduler.add_noise(latents, model_noise, timesteps)
    encoder_hidden_states, added_conditions = unet_conditioning(models, batch, latents, latents.device)
    if edm:
        target = latents
    elif noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    elif noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"Unknown prediction type {noise_scheduler.config.prediction_type}")
    if args.dream_training:
        noisy_latents, target = compute_dream_and_update_latents(
            unet, noise_scheduler, timesteps, noise, noisy_latents, target, encoder_hidden_states,
            args.dream_detail_preservation)
    unet_input, unet_extra = family.unet_inputs(models, model_input, latents, timesteps)
    model_pred = family.unet_output(unet(
        unet_input, timesteps, encoder_hidden_states, added_cond_kwargs=added_conditions, **unet_extra,
        **controlnet_residuals(models, batch, model_input, timesteps, encoder_hidden_states, added_conditions),
        return_dict=False)[0])
    if edm:
        model_pred = edm_denoised(noise_scheduler, model_pred, noisy_latents, sigmas)

    def loss_of(prediction, wanted, steps, weights):
        if edm:  # `steps`: the sigmas (the loss weights), in the timesteps' place
            return edm_loss(prediction, wanted, steps)
        if weights is None and args.snr_gamma is None and not uses_loss_options(args):
            return F.mse_loss(prediction.float(), wanted.float(), reduction="mean")
        return weighted_loss(args, prediction, wanted, steps, noise_scheduler, weights)  # min-SNR, Huber, masks...

    mask = latent_mask(batch["mask"], latents) if "mask" in batch else None  # --masked_loss
    steps = sigmas if edm else timesteps
    if args.with_prior_preservation:  # DreamBooth: instance half, then class half (utils.data.PairedBatchSampler)
        loss = prior_preservation_loss(loss_of, model_pred, target, steps, args.prior_loss_weight, monitor, mask)
    else:
        loss = loss_of(model_pred, target, steps, mask)
    monitor.add(timestep_mean=timesteps.float().mean(),
                timestep_std=timesteps.float().std(correction=0),  # (batch 1: 0, not NaN)
                latent_std=latents.std(), noise_std=noise.std())
    return loss if vae_loss is None else loss + vae_loss
