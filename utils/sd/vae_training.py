"""The VAE stage of from-scratch training: an AutoencoderKL fitted to the training images.

Stage design (measured choice, see README "Training from scratch"): the VAE is trained first,
alone, then frozen for the UNet stage, so the diffusion model never chases a moving latent
space. The stage's result is written atomically to `output_dir/vae_stage/` and reused by a
resumed or repeated run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from utils.checkpointing import own_memory
from utils.report import log_metrics

logger = logging.getLogger(__name__)
STAGE_DIR = "vae_stage"


def add_vae_args(parser) -> None:
    parser.add_argument("--train_vae", action="store_true",
                        help="Train the VAE first (reconstruction + KL), then freeze it for the UNet stage. For from-scratch models.")
    parser.add_argument("--vae_train_steps", type=int, default=2000, help="Optimizer steps of the VAE stage.")
    parser.add_argument("--vae_learning_rate", type=float, default=1e-4,
                        help="VAE learning rate (guide 001's kanji setup: VAE 1e-4 against UNet 1e-5).")
    parser.add_argument("--vae_kl_weight", type=float, default=1e-6,
                        help="KL weight against the summed reconstruction error (LDM's 1e-6 convention).")
    parser.add_argument("--vae_training_mode", type=str, default="stage", choices=["stage", "joint"],
                        help="stage: --vae_train_steps of VAE alone, then frozen (default, measured better: README). "
                             "joint: VAE and UNet trained together, the diffusion loss on detached latents (one process only).")


def vae_losses(vae, pixel_values: torch.Tensor, kl_weight: float, generator=None, return_latents: bool = False):
    """Reconstruction (MSE per pixel) and KL (LDM weighting) of a batch [B, 3, H, W] in [-1, 1].

    Returns (total, reconstruction, kl) scalars (+ the sampled, unscaled latents with
    `return_latents`). KL is the posterior's sum over latent elements
    divided by the number of pixel elements, so `kl_weight` means what it does in LDM, where both
    terms are sums.
    """
    posterior = vae.encode(pixel_values).latent_dist
    latents = posterior.sample(generator=generator)
    reconstruction = vae.decode(latents).sample
    reconstruction_loss = F.mse_loss(reconstruction.float(), pixel_values.float())
    kl = posterior.kl().mean() / pixel_values[0].numel()
    losses = (reconstruction_loss + kl_weight * kl, reconstruction_loss, kl)
    return losses + (latents,) if return_latents else losses


@torch.no_grad()
def latent_scaling_factor(vae, batches, device) -> float:
    """1 / std of the latents over `batches`, so scaled latents have unit variance (as SD's 0.18215 does)."""
    latents = [vae.encode(batch["pixel_values"].to(device, vae.dtype)).latent_dist.sample() for batch in batches]
    return float(1.0 / torch.cat(latents).float().std())


def load_finished_stage(output_dir: str):
    """The VAE of a finished stage in `output_dir`, or None."""
    from diffusers import AutoencoderKL

    path = os.path.join(output_dir, STAGE_DIR)
    if os.path.isfile(os.path.join(path, "stage.json")):
        return own_memory(AutoencoderKL.from_pretrained(path))
    return None


def train_vae_stage(accelerator, vae, dataloader, args):
    """Train `vae` for `args.vae_train_steps` steps on `dataloader`, save it, and return it (frozen).

    A separate Accelerator instance prepares the stage's model and optimizer, so the main
    training state (what checkpoints save and resume) is not changed by the stage.
    """
    from accelerate import Accelerator

    stage = Accelerator(mixed_precision=accelerator.mixed_precision)
    vae.requires_grad_(True)
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=0.0, eps=args.adam_epsilon)
    vae_prepared, optimizer, loader = stage.prepare(vae, optimizer, dataloader)
    progress = tqdm(total=args.vae_train_steps, desc="VAE stage", disable=not accelerator.is_local_main_process)
    step, history = 0, []
    while step < args.vae_train_steps:
        for batch in loader:
            with stage.autocast():
                loss, reconstruction, kl = vae_losses(vae_prepared if stage.num_processes > 1 else vae,
                                                      batch["pixel_values"], args.vae_kl_weight)
            stage.backward(loss)
            stage.clip_grad_norm_(vae_prepared.parameters(), args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            progress.update(1)
            if step % args.logging_steps == 0 or step == args.vae_train_steps:
                logs = {"vae/loss": loss.item(), "vae/reconstruction_loss": reconstruction.item(), "vae/kl": kl.item()}
                history.append({"step": step, **logs})
                progress.set_postfix(rec=f"{logs['vae/reconstruction_loss']:.4f}")
                log_metrics(accelerator, logs, step)
            if step >= args.vae_train_steps:
                break
    progress.close()
    vae = stage.unwrap_model(vae_prepared)
    vae.requires_grad_(False)
    vae.eval()
    scaling = latent_scaling_factor(vae, [b for _, b in zip(range(4), loader)], stage.device)
    vae.register_to_config(scaling_factor=scaling)
    if accelerator.is_main_process:
        save_stage(vae, args.output_dir, {"steps": step, "scaling_factor": scaling, "history": history})
    accelerator.wait_for_everyone()
    del optimizer
    stage.free_memory()
    return vae


def save_stage(vae, output_dir: str, info: dict) -> None:
    final = os.path.join(output_dir, STAGE_DIR)
    temp = final + ".tmp"
    shutil.rmtree(temp, ignore_errors=True)
    vae.save_pretrained(temp)
    with open(os.path.join(temp, "stage.json"), "w", encoding="utf-8") as handle:
        json.dump(info, handle, indent=2)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(temp, final)
    logger.info(f"VAE stage finished: {final} (latent scaling factor {info['scaling_factor']:.4f})")
