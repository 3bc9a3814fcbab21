"""Rectified-flow training for the transformer families (SD3/3.5 now; FLUX.1 and Lumina-2 take the same pieces):
the flags of diffusers' `train_dreambooth_lora_sd3.py` / `_flux.py` / `_lumina2.py`, the timestep draw, the noisy
input and target, the loss weighting and the held-out error, in diffusers' convention

    sigma in [0, 1], 1 = pure noise:   x_sigma = (1 - sigma) x + sigma noise,   velocity target noise - x

(the mask DiT's `utils/mask_dit/flow_matching.py` writes the same transport with t = 1 - sigma). The sigmas are the
training scheduler's own (`FlowMatchEulerDiscreteScheduler.sigmas`, so SD3.5's `shift` is honoured) at the index
diffusers' `compute_density_for_timestep_sampling` draws, and the loss weights are
`compute_loss_weighting_for_sd3`'s: the ecosystem's functions, called, not copied."""

from __future__ import annotations

import torch

from utils.data import held_out_position
from utils.errors import UserError

WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")


def add_flow_matching_args(parser) -> None:
    """diffusers' SD3/FLUX/Lumina-2 DreamBooth flags (a default of None: the family's, e.g. SD3 logit_normal)."""
    flow = parser.add_argument_group("flow matching (SD3, FLUX, Lumina-2)")
    flow.add_argument("--weighting_scheme", type=str, default=None, choices=WEIGHTING_SCHEMES,
                      help="Timestep density (logit_normal, mode: drawn non-uniformly) or loss weighting (sigma_sqrt, "
                           "cosmap: drawn uniformly, the loss weighted), as SD3's paper. Default: the family's "
                           "(SD3: logit_normal, as diffusers' SD3 scripts).")
    add_timestep_density_args(flow)
    flow.add_argument("--precondition_outputs", type=int, default=1,
                      help="1: the prediction is turned into a denoised sample, x_sigma - sigma * prediction, and "
                           "compared with the clean latents (EDM's preconditioning, diffusers' SD3 default); 0: the "
                           "prediction is compared with the velocity noise - x.")
    flow.add_argument("--max_sequence_length", type=int, default=None,
                      help="Tokens of the T5 (or Gemma) prompt. Default: the family's (SD3: 77, as diffusers' SD3 "
                           "scripts).")
    flow.add_argument("--lora_layers", type=str, default=None,
                      help="Comma-separated transformer modules that get LoRA (default: the family's attention "
                           "projections), e.g. attn.to_k,attn.to_q,attn.to_v,attn.to_out.0.")
    flow.add_argument("--lora_blocks", type=str, default=None,
                      help="SD3: comma-separated transformer block numbers to put LoRA in (default: all), e.g. 12,30.")
    flow.add_argument("--upcast_before_saving", action="store_true",
                      help="Save the trained LoRA weights in float32; without it they are saved in the training "
                           "precision (--mixed_precision), as diffusers' flow-matching LoRA scripts do.")


def add_timestep_density_args(group) -> None:
    """SD3's timestep densities' parameters (Esser et al. 2024, eqs. 19-20), one definition for every flow trainer
    (text-to-image's transformer families, the mask DiT's --timestep_sampling)."""
    group.add_argument("--logit_mean", type=float, default=0.0, help="Mean of the logit-normal timestep density.")
    group.add_argument("--logit_std", type=float, default=1.0, help="Std of the logit-normal timestep density.")
    group.add_argument("--mode_scale", type=float, default=1.29,
                       help="Scale of the `mode` timestep density (with weighting scheme / timestep sampling mode).")


# Flags of the UNet/DDPM objective that have no meaning for a rectified flow (refused, not ignored).
DDPM_ONLY_FLAGS = {"--snr_gamma": lambda a: a.snr_gamma is not None, "--noise_offset": lambda a: bool(a.noise_offset),
                   "--input_perturbation": lambda a: bool(a.input_perturbation),
                   "--dream_training": lambda a: a.dream_training,
                   "--timestep_bias_strategy": lambda a: a.timestep_bias_strategy != "none",
                   "--debiased_estimation_loss": lambda a: a.debiased_estimation_loss,
                   "--loss_type": lambda a: a.loss_type != "l2", "--train_vae": lambda a: a.train_vae}


def check_flow_matching_args(args, family: str) -> None:
    """One-block errors for what a flow-matching family cannot take."""
    if args.prediction_type is not None:
        raise UserError(f"--prediction_type {args.prediction_type}: a {family} model predicts the flow velocity "
                        "(rectified flow), not epsilon or v; drop --prediction_type.")
    for flag, given in DDPM_ONLY_FLAGS.items():
        if given(args):
            raise UserError(f"{flag} belongs to the UNet (DDPM) objective of SD 1.x/2.x/XL; a {family} model trains "
                            "a rectified flow: drop it (--weighting_scheme / --logit_mean / --mode_scale shape the "
                            "timesteps instead).")
    if args.max_sequence_length is not None and args.max_sequence_length < 1:
        raise UserError(f"--max_sequence_length {args.max_sequence_length} must be at least 1.")


def sample_sigmas(args, scheduler, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas [B], timesteps [B]) of a training batch: u from --weighting_scheme's density, the scheduler's sigma
    and timestep at index int(u * num_train_timesteps), as diffusers' SD3/FLUX scripts (global RNG: a resume
    restores it)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling(weighting_scheme=args.weighting_scheme, batch_size=batch_size,
                                              logit_mean=args.logit_mean, logit_std=args.logit_std,
                                              mode_scale=args.mode_scale)
    indices = (u * scheduler.config.num_train_timesteps).long()
    return scheduler.sigmas[indices].to(device), scheduler.timesteps[indices].to(device)


def held_out_sigmas(scheduler, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed (sigmas, timesteps) of held-out samples `indices`: the golden-ratio spread over the schedule."""
    steps = torch.tensor([int(held_out_position(i) * scheduler.config.num_train_timesteps) for i in indices])
    return scheduler.sigmas[steps], scheduler.timesteps[steps]


def noisy_input(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_sigma = (1 - sigma) x + sigma noise, sigma [B] broadcast over [B, ...]."""
    sigma = sigmas.view(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
    return (1.0 - sigma) * latents + sigma * noise


def prediction_and_target(prediction: torch.Tensor, noisy: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor,
                          sigmas: torch.Tensor, precondition: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """What the loss compares: with preconditioning the denoised estimate x_sigma - sigma * v against x, else the
    velocity v against noise - x (diffusers' SD3 scripts, --precondition_outputs)."""
    if precondition:
        sigma = sigmas.view(-1, *([1] * (latents.ndim - 1))).to(prediction.dtype)
        return prediction * (-sigma) + noisy, latents
    return prediction, noise - latents


def loss_weights(args, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weights [B] (float32) of --weighting_scheme (sigma_sqrt, cosmap; 1 for the others)."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    return compute_loss_weighting_for_sd3(weighting_scheme=args.weighting_scheme, sigmas=sigmas.float()).float()
