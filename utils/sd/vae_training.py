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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from utils.atomic import atomic_directory
from utils.checkpointing import own_memory
from utils.errors import UserError
from utils.loop import Checkpointing, StepBoundary
from utils.optim import apply_update
from utils.report import log_metrics
from utils.telemetry import NonFiniteGuard

logger = logging.getLogger(__name__)
STAGE_DIR = "vae_stage"
STAGE_CHECKPOINT = "vae_stage_checkpoint"  # a stopped stage, resumable


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


def joint_vae(args) -> bool:
    """--train_vae --vae_training_mode joint: the VAE trains with the UNet (else, with --train_vae, in a stage)."""
    return args.train_vae and args.vae_training_mode == "joint"


def check_vae_args(args) -> None:
    """Joint VAE training needs the pixels of every batch in one process."""
    multi_process = int(os.environ.get("WORLD_SIZE", 1)) > 1
    if joint_vae(args) and (args.cache_latents or multi_process):
        raise UserError(
            "--vae_training_mode joint runs in one process without --cache_latents; use the default 'stage' mode."
        )


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


@dataclass
class VaeStageSettings:
    """What the VAE stage reads of a run's flags (the script builds it; names: the flag each comes from)."""

    output_dir: str
    steps: int  # --vae_train_steps
    learning_rate: float  # --vae_learning_rate
    kl_weight: float  # --vae_kl_weight
    adam: tuple  # (--adam_beta1, --adam_beta2, --adam_epsilon)
    max_grad_norm: float
    logging_steps: int
    checkpointing_steps: int | None
    max_nonfinite_steps: int
    resume: bool  # --resume_from_checkpoint given: continue a saved stage checkpoint


class _ConstantLR:
    """The stage's learning rate is constant; apply_update steps a schedule."""

    def step(self) -> None:
        pass


def train_vae_stage(accelerator, vae, dataloader, settings: VaeStageSettings):
    """Train `vae` for `settings.steps` steps on `dataloader`, save it, and return it (frozen).

    A separate Accelerator instance prepares the stage's model and optimizer, so the main training state (what
    checkpoints save and resume) is not changed by the stage. The stage runs on the trainers' step boundary
    (utils/loop.py): the non-finite guard (--max_nonfinite_steps), a stage checkpoint every --checkpointing_steps
    and on a stop request (SIGTERM/SIGINT: saved, then exit 0 with the resume command), atomically in
    `output_dir/vae_stage_checkpoint/`. `--resume_from_checkpoint` continues the stage there exactly (same weights
    as an uninterrupted stage: the epoch's shuffle state and number are restored, the batches already trained on
    are replayed without training, the noise RNG is restored).
    """
    from accelerate import Accelerator

    stage = Accelerator(mixed_precision=accelerator.mixed_precision)
    vae.requires_grad_(True)
    vae.train()
    beta1, beta2, eps = settings.adam
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.learning_rate, betas=(beta1, beta2), weight_decay=0.0,
                                  eps=eps)
    resumed = load_stage_checkpoint(settings.output_dir, vae, optimizer, stage) if settings.resume else None
    vae_prepared, optimizer, loader = stage.prepare(vae, optimizer, dataloader)
    step, epoch, batches_done, history = (resumed["step"], resumed["epoch"], resumed["batches_in_epoch"],
                                          resumed["history"]) if resumed else (0, 0, 0, [])
    progress = tqdm(total=settings.steps, initial=step, desc="VAE stage", disable=not accelerator.is_local_main_process)
    order = getattr(dataloader, "generator", None)  # the shuffle's own generator (utils.data.make_train_dataloader)
    epoch_order_state, losses = None, {}

    def log_losses(at_step: int) -> None:
        logs = {f"vae/{name}": value.item() for name, value in losses.items()}
        history.append({"step": at_step, **logs})
        progress.set_postfix(rec=f"{logs['vae/reconstruction_loss']:.4f}")
        log_metrics(accelerator, logs, at_step)

    def save(at_step: int, report: bool) -> None:
        if report and at_step >= settings.steps:
            return  # the finished stage is saved below (a stop request at the last step still saves here)
        save_stage_checkpoint(settings.output_dir, stage, vae, optimizer, {
            "step": at_step, "epoch": epoch, "batches_in_epoch": batches_done, "history": history,
            "order_state": epoch_order_state, "rng_state": torch.get_rng_state()})

    boundary = StepBoundary(stage, step, settings.steps, Checkpointing(
        settings.output_dir, settings.checkpointing_steps, None, training_state=dict, write=save), progress,
        logging_steps=settings.logging_steps, log_health=log_losses, health_at_last_step=True,
        guard=NonFiniteGuard(settings.max_nonfinite_steps))
    while boundary.step < settings.steps and not boundary.stopped:
        if resumed is not None and order is not None:
            order.set_state(resumed["order_state"])  # the stopped epoch's shuffle, drawn again
        epoch_order_state = order.get_state() if order is not None else None
        loader.set_epoch(epoch)  # the per-sample randomness of epoch `epoch` (a new loader would start at 0)
        for batch in loader:
            if batches_done and resumed is not None:
                batches_done -= 1  # already trained on before the stop: replayed, not trained
                if not batches_done:
                    torch.set_rng_state(resumed["rng_state"])
                continue
            resumed = None
            with stage.autocast():
                loss, reconstruction, kl = vae_losses(vae_prepared if stage.num_processes > 1 else vae,
                                                      batch["pixel_values"], settings.kl_weight)
            stage.backward(loss)
            apply_update(stage, optimizer, _ConstantLR(), vae_prepared.parameters(), loss.detach(),
                         settings.max_grad_norm, boundary.guard)
            losses.update(loss=loss.detach(), reconstruction_loss=reconstruction.detach(), kl=kl.detach())
            batches_done += 1
            if boundary.step_done():
                break
        if not boundary.stopped:
            batches_done, resumed, epoch = 0, None, epoch + 1
    progress.close()
    if boundary.stopped:
        raise SystemExit(0)  # the stage checkpoint and the resume command are out
    vae = stage.unwrap_model(vae_prepared)
    vae.requires_grad_(False)
    vae.eval()
    scaling = latent_scaling_factor(vae, [b for _, b in zip(range(4), loader)], stage.device)
    vae.register_to_config(scaling_factor=scaling)
    if accelerator.is_main_process:
        save_stage(vae, settings.output_dir, {"steps": boundary.step, "scaling_factor": scaling, "history": history})
        shutil.rmtree(os.path.join(settings.output_dir, STAGE_CHECKPOINT), ignore_errors=True)
    accelerator.wait_for_everyone()
    del optimizer
    stage.free_memory()
    return vae


def save_stage_checkpoint(output_dir: str, stage, vae, optimizer, state: dict) -> None:
    """The stage as far as it got (weights, optimizer, step, epoch and position in it, the epoch's shuffle state,
    each process's noise RNG), atomically in `output_dir/vae_stage_checkpoint/`."""
    final = os.path.join(output_dir, STAGE_CHECKPOINT)
    rank_states = stage.gather_for_metrics([state], use_gather_object=True) if stage.num_processes > 1 else [state]
    if stage.is_main_process:
        with atomic_directory(final) as temp:
            stage.unwrap_model(vae).save_pretrained(os.path.join(temp, "vae"))
            torch.save(optimizer.state_dict(), os.path.join(temp, "optimizer.pt"))
            for rank, rank_state in enumerate(rank_states):
                torch.save(rank_state, os.path.join(temp, f"state_{rank}.pt"))
        logger.info(f"Saved the VAE stage at step {state['step']} to {final}")
    stage.wait_for_everyone()


def load_stage_checkpoint(output_dir: str, vae, optimizer, stage) -> dict | None:
    """Load a stopped stage's checkpoint into `vae` and `optimizer` (before `prepare`); its state, or None."""
    from diffusers import AutoencoderKL

    path = os.path.join(output_dir, STAGE_CHECKPOINT)
    if not os.path.isdir(path):
        return None
    vae.load_state_dict(AutoencoderKL.from_pretrained(os.path.join(path, "vae")).state_dict())
    optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), weights_only=True))
    state = torch.load(os.path.join(path, f"state_{stage.process_index}.pt"), weights_only=True)
    logger.info(f"Resuming the VAE stage from {path} at step {state['step']}")
    return state


def save_stage(vae, output_dir: str, info: dict) -> None:
    final = os.path.join(output_dir, STAGE_DIR)
    with atomic_directory(final) as temp:  # a kill while saving leaves the old stage or the new one
        vae.save_pretrained(temp)
        with open(os.path.join(temp, "stage.json"), "w", encoding="utf-8") as handle:
            json.dump(info, handle, indent=2)
    logger.info(f"VAE stage finished: {final} (latent scaling factor {info['scaling_factor']:.4f})")
