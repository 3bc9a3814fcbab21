#!/usr/bin/env python
"""Train a mask-conditioned NextDiT (Lumina-Next family) with flow matching.

The model draws an image that follows a segmentation mask (vessels, lesions, ...) and, with a
text encoder, a caption. Pixel space by default; latent space with --vae_model_name_or_path.

    python -m utils.mask_dit.data --output_dir data/fundus --num_images 256 --resolution 64
    accelerate launch train_mask_dit.py --train_data_dir data/fundus --model_size tiny \
        --resolution 64 --mask_channels 2 --output_dir outputs/mask_dit

Or with one of guide 003's planning points: --config configs/mask_dit_fast_512.yaml.
The output folder holds transformer/ (+ vae/, tokenizer/, text_encoder/) and mask_dit_config.json;
generate.py detects it and generates from masks. See docs/MASK_DIT.md.
"""

from __future__ import annotations

import gc

if __name__ == "__main__":  # a command, not an import: no cyclic GC until its imports are done (user_entry_point)
    gc.disable()

import argparse
import logging
import math
import os

import utils  # noqa: F401  (first: its log filter must be in place before diffusers/peft import bitsandbytes)

# isort: split

import datasets
import torch
from accelerate.utils import DataLoaderConfiguration

from utils.auto_batch import add_auto_batch_args, resolve_auto_batch_size_for
from utils.buckets import add_bucket_args, check_bucket_args, record_buckets
from utils.cache import (CacheSettings, add_cache_args, cached_encoders_on, collate_cached, offload_cached_encoders,
                         resolve_cache_args)
from utils.checkpointing import check_finite_before_saving, register_checkpoint_hooks, resume_position
from utils.config import parse_args_with_config
from utils.data import (add_data_source_args, add_image_caption_args, epoch_batches, held_out_position,
                        make_train_dataloader, split_train_validation)
from utils.ema import add_ema_args, create_ema, ema_checkpoint_hooks, place_ema
from utils.evaluation import Evaluation, add_evaluation_args
from utils.errors import UserError, oom_hint, user_entry_point
from utils.latents import vae_scale_factor
from utils.families.flow_matching import add_timestep_density_args
from utils.mask_dit.cache import CaptionEncoding, cache_paired_datasets, paired_rows_fingerprint
from utils.mask_dit.conditioning import Conditioner
from utils.mask_dit.data import (PairedImageMaskDataset, assign_pair_buckets, collate_pairs, hub_records,
                                 scan_paired_folder, select_fraction, usable_records)
from utils.mask_dit.flow_matching import (LOSS_WEIGHTING, SAMPLERS, TIMESTEP_SAMPLING, flow_matching_loss, interpolate,
                                          loss_weights, sample_timesteps)
from utils.mask_dit.metrics import MaskSampling, held_out_quality, log_samples
from utils.mask_dit.nextdit import MODEL_PRESETS, build_mask_nextdit, load_pretrained_nextdit
from utils.mask_dit.pipeline import MaskDiTPipeline, caption_width, load_vae, save_mask_dit_pipeline
from utils.optim import (add_adam_args, add_lr_schedule_args, add_optimizer_args, apply_update, create_optimizer,
                         evaluation_weights, parse_optimizer_args, warmup_cosine)
from utils.preflight import add_preflight_args
from utils.report import log_metrics
from utils.loop import Checkpointing, StepBoundary
from utils.run import (add_run_args, claim_output_dir, create_accelerator, epoch_validation_due, is_due, progress_bar,
                       tracker_config, weight_dtype, write_rank_checksums)
from utils.plan import add_plan_args, plan_training
from utils.run_record import RunRecord
from utils.quality import HIGHER_IS_BETTER, add_quality_args, check_quality_args, quality_for
from utils.speed import add_speed_args, apply_speedups, forward_autocast
from utils.stopping import EarlyStopping
from utils.telemetry import HealthMonitor, NonFiniteGuard, batch_size_of, log_training_health
from utils.text_encoders import load_text_encoder

logger = logging.getLogger(__name__)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model = parser.add_argument_group("model")
    model.add_argument("--model_size", default="ultrafast", choices=sorted(MODEL_PRESETS),
                       help="Size preset (docs/MASK_DIT.md lists real parameter counts).")
    model.add_argument("--model_config", default=None,
                       help="JSON of MaskNextDiT2DModel config keys; overrides the preset.")
    model.add_argument("--pretrained_model_name_or_path", default=None,
                       help="Fine-tune from NextDiT weights: a diffusers LuminaNextDiT2DModel "
                            "folder, a folder of ours, "
                            "or an original Lumina-Next consolidated.pth. Mask columns start at zero.")
    model.add_argument("--pretrained_subfolder", default=None, help='e.g. "transformer" for a whole Lumina pipeline.')
    model.add_argument("--mask_channels", type=int, default=1, help="1 for binary masks, K for K-class index masks.")
    model.add_argument("--vae_model_name_or_path", default=None,
                       help="Train in this VAE's latent space (folder or Hub id).")
    model.add_argument("--text_encoder_name_or_path", default=None,
                       help="Caption conditioning: a folder/Hub id with a tokenizer and a CLIP / "
                            "T5 / Gemma-style encoder.")
    model.add_argument("--max_caption_length", type=int, default=77)
    model.add_argument("--caption_hidden_layer", type=int, default=-1,
                       help="-1: the encoder's last hidden state; e.g. -2 for Lumina-Next's Gemma features.")
    data = parser.add_argument_group("data")
    add_data_source_args(data, train_data_dir_help="Folder with images/, masks/ and optional metadata.jsonl.",
                         dataset_name_help="Hub dataset id, or a datasets.save_to_disk folder.")
    add_image_caption_args(data, caption_dropout_prob=0.1)
    data.add_argument("--mask_column", default="mask")
    data.add_argument("--validation_data_dir", default=None,
                      help="Held-out pairs; default: --validation_split of the data.")
    data.add_argument("--validation_split", type=float, default=0.05,
                      help="Fraction held out (seeded) for validation loss, metrics and early stopping.")
    data.add_argument("--sample_ratio", type=float, default=1.0,
                      help="Train on this seeded random fraction of the pairs.")
    data.add_argument("--resolution", type=int, default=256)
    data.add_argument("--random_crop", action="store_true",
                      help="Random instead of centre crops (same for image and mask).")
    flow = parser.add_argument_group("flow matching")
    flow.add_argument("--timestep_sampling", default="uniform", choices=TIMESTEP_SAMPLING)
    add_timestep_density_args(flow)  # --logit_mean --logit_std --mode_scale, shared with SD3's
    flow.add_argument("--loss_weighting", default="uniform", choices=LOSS_WEIGHTING)
    flow.add_argument("--mask_dropout_prob", type=float, default=0.1,
                      help="Masks replaced by 'no mask' (for mask CFG).")
    optim = parser.add_argument_group("optimizer")
    add_plan_args(parser, batch_size=16, epochs=20, learning_rate=1e-4)
    add_optimizer_args(optim, default="adamw")
    add_adam_args(optim, weight_decay=0.0)
    add_lr_schedule_args(optim, scheduler="cosine", warmup_steps=200, choices=["cosine", "constant"],
                         scheduler_help="Linear warmup, then cosine decay to --min_lr (or constant).")
    optim.add_argument("--min_lr", type=float, default=0.0)
    schedule = parser.add_argument_group("intervals and validation")
    schedule.add_argument("--checkpointing_epochs", type=int, default=None,
                          help="Also save a checkpoint every N epochs (guide 003's save_every).")
    add_evaluation_args(schedule, validation_epochs=1, num_validation_images=4,
                        images_help="Held-out masks to generate from and score (PSNR, SSIM, mask IoU).")
    add_quality_args(schedule)  # --validation_metrics clip_score,fid,kid (utils/quality.py)
    schedule.add_argument("--num_inference_steps", type=int, default=30)
    schedule.add_argument("--sampler", default="euler", choices=SAMPLERS)
    schedule.add_argument("--time_shift", type=float, default=1.0,
                          help="Sampling time shift (>1: more steps near noise).")
    schedule.add_argument("--guidance_scale", type=float, default=4.0, help="Caption CFG scale.")
    schedule.add_argument("--mask_guidance_scale", type=float, default=1.0, help="Mask CFG scale (1 = no mask CFG).")
    add_run_args(parser, output_dir_default="mask-dit-model")
    add_preflight_args(parser)
    add_ema_args(parser)
    add_cache_args(parser)
    add_auto_batch_args(parser)
    add_speed_args(parser, gradient_checkpointing=True)
    add_bucket_args(parser)
    args = parse_args_with_config(parser, argv)
    if (args.train_data_dir is None) == (args.dataset_name is None):
        parser.error("give exactly one of --train_data_dir or --dataset_name")
    parse_optimizer_args(args.optimizer_args)  # a malformed KEY=VALUE is refused before anything runs
    vars(args).update(resolve_cache_args(  # --precompute = both caches the model can use
        args, has_vae=bool(args.vae_model_name_or_path), has_text_encoder=bool(args.text_encoder_name_or_path)))
    if args.enable_bucket and args.train_batch_size == "auto":
        raise UserError("--enable_bucket trains on batches of different shapes: give --train_batch_size a number "
                        "(not auto).")
    check_quality_args(args)
    return args


# ---------------------------------------------------------------------------------------------- build


def build_records(args, folder=None):
    """The pairs of a folder (or --train_data_dir / --dataset_name), checked by the pre-flight scan."""
    if folder or args.train_data_dir:
        return usable_records(args, scan_paired_folder(folder or args.train_data_dir, args.caption_column),
                              folder or args.train_data_dir)
    if os.path.isdir(args.dataset_name) and os.path.isfile(os.path.join(args.dataset_name, "dataset_info.json")):
        dataset = datasets.load_from_disk(args.dataset_name)
    else:
        dataset = datasets.load_dataset(args.dataset_name, split="train")
    return usable_records(args, hub_records(dataset, args.image_column, args.mask_column, args.caption_column),
                          args.dataset_name)


def build_datasets(args):
    """(train, held-out or None); the held-out set is never augmented."""
    records = build_records(args)
    if args.validation_data_dir:
        train_indices, validation = list(range(len(records))), build_records(args, args.validation_data_dir)
        validation_indices = list(range(len(validation)))
    else:
        train_indices, validation_indices = split_train_validation(len(records), args.validation_split, args.seed)
        validation = records
    keep = select_fraction(len(train_indices), args.sample_ratio, args.seed)
    train_indices = [train_indices[i] for i in keep]
    train = PairedImageMaskDataset(records, args.resolution, args.mask_channels, args.random_crop, args.random_flip,
                                   train_indices, args.seed, skip_bad_samples=args.skip_bad_samples)
    held_out = (PairedImageMaskDataset(validation, args.resolution, args.mask_channels, indices=validation_indices)
                if validation_indices else None)
    return train, held_out


def build_transformer(args, in_channels: int, vae_downsample: int, caption_dim: int | None):
    """The NextDiT to train (loaded or built from --model_size), checked against the data, in train mode."""
    sample_size = args.resolution // vae_downsample
    if args.pretrained_model_name_or_path:
        model = load_pretrained_nextdit(args.pretrained_model_name_or_path, args.mask_channels,
                                        subfolder=args.pretrained_subfolder, sample_size=sample_size)
        if (model.config.caption_dim or None) != caption_dim:
            raise UserError(f"--pretrained_model_name_or_path has caption_dim {model.config.caption_dim} but the text "
                            f"encoder gives {caption_dim}; use the text encoder the model was trained with")
        if model.config.in_channels != in_channels:
            raise UserError(f"--pretrained_model_name_or_path takes {model.config.in_channels} input channels, the "
                            f"data gives {in_channels} (pixel space: 3; latent: the VAE's latent_channels)")
    else:
        model = build_mask_nextdit(args.model_size, args.model_config, in_channels=in_channels,
                                   mask_channels=args.mask_channels, caption_dim=caption_dim, sample_size=sample_size)
    if args.resolution % (vae_downsample * model.config.patch_size):
        raise UserError(f"--resolution {args.resolution} must be a multiple of "
                        f"{vae_downsample * model.config.patch_size}")
    # Buckets of about --resolution² pixels = a token budget of (resolution / (VAE factor x patch))² tokens.
    check_bucket_args(args, vae_downsample * model.config.patch_size)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    logger.info(f"MaskNextDiT2DModel: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    return model


# ---------------------------------------------------------------------------------------------- training


def flow_step_loss(model, conditioner, batch, generator, args, timesteps=None, train=True):
    """The flow-matching loss of one batch; `timesteps` fixed for validation, sampled otherwise."""
    target_x, mask, mask_keep, caption, caption_mask = conditioner(batch, generator, train)
    batch_size = target_x.shape[0]
    if timesteps is None:
        timesteps = sample_timesteps(batch_size, args.timestep_sampling, args.logit_mean, args.logit_std,
                                     args.mode_scale, device=target_x.device, generator=generator)
    noise = torch.randn(target_x.shape, generator=generator, device=target_x.device)
    noisy, velocity = interpolate(target_x, noise, timesteps)
    unwrapped = getattr(model, "module", model)
    mask_input = unwrapped.prepare_mask(mask, noisy) * mask_keep.view(-1, 1, 1, 1)  # dropped mask = all zeros
    prediction = model(noisy, timesteps, mask_input, caption, caption_mask, mask_is_prepared=True)
    return flow_matching_loss(prediction, velocity, loss_weights(timesteps, args.loss_weighting))


def step_generator(seed, step, micro_step, process_index, device):
    """The randomness of one micro-batch as a pure function of the step: resumes replay it exactly."""
    return torch.Generator(device=device).manual_seed(
        ((seed or 0) * 1_000_003 + step * 1009 + micro_step * 31 + process_index) % (2**63)
    )


@torch.no_grad()
def validation_loss(accelerator, model, conditioner, dataloader, args) -> float:
    """Held-out loss with fixed noise and evenly spread timesteps, so successive values compare."""
    model.eval()
    total, count = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
    for index, batch in enumerate(dataloader):
        generator = step_generator(args.seed, 10**6 + index, 0, accelerator.process_index, accelerator.device)
        size = batch["mask"].shape[0]
        positions = torch.arange(size, device=accelerator.device, dtype=torch.float64) + index * size
        timesteps = held_out_position(positions).float()  # each sample's fixed flow time
        with forward_autocast(accelerator):
            loss = flow_step_loss(model, conditioner, batch, generator, args, timesteps, train=False)
        total, count = total + loss * size, count + size
    model.train()
    total, count = accelerator.reduce(total, "sum"), accelerator.reduce(count, "sum")
    return (total / count.clamp_min(1)).item()




def build_encoders(args, accelerator, dtype):
    """The frozen helpers: (tokenizer, text encoder) for captions and the VAE for latent space, each optional;
    and the VAE's downsampling factor (1 in pixel space)."""
    tokenizer = text_encoder = vae = None
    if args.text_encoder_name_or_path:
        tokenizer, text_encoder = load_text_encoder(args.text_encoder_name_or_path)
        text_encoder.to(accelerator.device, dtype=dtype)
    vae_downsample = 1
    if args.vae_model_name_or_path:
        vae = load_vae(args.vae_model_name_or_path).to(accelerator.device, dtype=torch.float32)
        vae_downsample = vae_scale_factor(vae)
    return tokenizer, text_encoder, vae, vae_downsample


def pipeline_settings(args, vae_downsample: int) -> dict:
    """What generation needs besides the weights (mask_dit_config.json)."""
    return dict(resolution=args.resolution, mask_channels=args.mask_channels, vae_downsample=vae_downsample,
                time_shift=args.time_shift, max_caption_length=args.max_caption_length,
                caption_hidden_layer=args.caption_hidden_layer, num_inference_steps=args.num_inference_steps,
                sampler=args.sampler, guidance_scale=args.guidance_scale, mask_guidance_scale=args.mask_guidance_scale)


def evaluation_for(args, accelerator, model, pipeline, conditioner, held_out, held_out_dataloader, ema, encoders,
                   resumed_state: dict, optimizer) -> Evaluation:
    """The held-out loss and --validation_metrics (best/, --early_stopping_patience follow --early_stopping_metric)
    and, on the main process, the sample metrics, from the weights that would be saved (utils/evaluation.py)."""
    transformer = pipeline.transformer
    quality, key = quality_for(args), args.early_stopping_metric

    def score(step: int) -> dict:
        if held_out_dataloader is None:
            return {}
        metrics = {"val/loss": validation_loss(accelerator, model, conditioner, held_out_dataloader, args)}
        if quality is not None:
            transformer.eval()
            with cached_encoders_on(accelerator.device, encoders, CacheSettings.from_args(args)):
                metrics.update(held_out_quality(accelerator, pipeline, held_out, MaskSampling.from_args(args),
                                                quality))
            transformer.train()
        return metrics

    def report(step: int, metrics: dict, improved: bool, final: bool) -> None:
        if accelerator.is_main_process and held_out is not None and args.num_validation_images > 0:
            transformer.eval()
            with cached_encoders_on(accelerator.device, encoders, CacheSettings.from_args(args)):
                metrics = {**metrics, **log_samples(accelerator, pipeline, held_out, MaskSampling.from_args(args),
                                                    step)}
            transformer.train()
        if metrics:
            logger.info(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            log_metrics(accelerator, metrics, step)

    return Evaluation(accelerator, args.output_dir, score, key,
                      lambda directory, _: save_mask_dit_pipeline(directory, pipeline), ema, transformer.parameters,
                      optimizer, EarlyStopping(args.early_stopping_patience, args.early_stopping_min_delta,
                                               resumed_state, higher_is_better=key in HIGHER_IS_BETTER), report)


def save_final(args, accelerator, pipeline, ema) -> None:
    """The pipeline folder in --output_dir, with the EMA weights when there is an EMA."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if ema is not None:
            ema.copy_to(pipeline.transformer.parameters())
        check_finite_before_saving(accelerator, args.output_dir, f"the final model in {args.output_dir}",
                                   [pipeline.transformer])
        save_mask_dit_pipeline(args.output_dir, pipeline)
        logger.info(f"Saved the mask DiT to {args.output_dir}")


def cache_datasets(args, accelerator, datasets: list, vae, tokenizer, text_encoder):
    """--cache_latents / --cache_text_embeddings: the datasets read from their caches (built first where missing),
    the empty caption's cached embedding, and the encoders by name (those the caches replace leave the device)."""
    cache = CacheSettings.from_args(args)
    datasets, empty_caption = cache_paired_datasets(datasets, vae, tokenizer, text_encoder, cache,
                                                    CaptionEncoding.from_args(args), accelerator)
    encoders = {"vae": vae, "text_encoder": text_encoder}
    offload_cached_encoders(encoders, cache)
    return datasets, empty_caption, encoders


def main(args):
    accelerator = create_accelerator(args, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    claim_output_dir(args, accelerator)  # created, locked for this run, a restarted run's checkpoints discarded

    # Frozen helpers, then the transformer.
    tokenizer, text_encoder, vae, vae_downsample = build_encoders(args, accelerator, weight_dtype(accelerator))
    transformer = build_transformer(args, vae.config.latent_channels if vae is not None else 3, vae_downsample,
                                    caption_width(text_encoder) if text_encoder else None)
    ema = create_ema(transformer, args) if args.use_ema else None

    # Data: images, or the VAE latents / caption embeddings cached on disk (then the encoders leave the device).
    train_dataset, held_out = build_datasets(args)
    buckets = assign_pair_buckets(args, train_dataset)  # --enable_bucket (held-out pairs stay square)
    (train_dataset, held_out_for_loss), empty_caption, encoders = cache_datasets(
        args, accelerator, [train_dataset, held_out], vae, tokenizer, text_encoder)
    collate = collate_cached if args.cache_latents or args.cache_text_embeddings else collate_pairs
    conditioner = Conditioner(args, vae, tokenizer, text_encoder, empty_caption)
    # --train_batch_size auto: probe real steps of this loss (its randomness from a generator of its own).
    probe_generator = torch.Generator(device=accelerator.device)
    batch_size, accumulation = resolve_auto_batch_size_for(args, accelerator, lambda batch: flow_step_loss(
        transformer, conditioner, batch, probe_generator.manual_seed(0), args), train_dataset, collate, [transformer])
    apply_speedups(transformer, args)
    train_dataloader = make_train_dataloader(train_dataset, batch_size, args.dataloader_num_workers, collate,
                                             buckets=getattr(train_dataset, "base", train_dataset).buckets,
                                             seed=args.seed)
    held_out_dataloader = (torch.utils.data.DataLoader(held_out_for_loss, batch_size=batch_size,
                                                       collate_fn=collate) if held_out else None)
    plan = plan_training(batch_size, accumulation, accelerator.num_processes,
                         math.ceil(len(train_dataloader) / accelerator.num_processes), args.max_train_steps,
                         args.num_train_epochs, args.learning_rate)
    logger.info(f"{len(train_dataset)} training pairs, {len(held_out) if held_out else 0} held out")

    # Optimizer and schedule (per process: accelerate.prepare shards the batches; the scheduler steps per process).
    optimizer = create_optimizer(args.optimizer, transformer.parameters(), accelerator.device, lr=args.learning_rate,
                                 betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
                                 eps=args.adam_epsilon, extra=parse_optimizer_args(args.optimizer_args))
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(
        args.lr_warmup_steps * accelerator.num_processes, plan.max_train_steps * accelerator.num_processes,
        args.min_lr / args.learning_rate, cosine=args.lr_scheduler == "cosine"))

    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(transformer, optimizer, train_dataloader,
                                                                           lr_scheduler)
    held_out_dataloader = accelerator.prepare(held_out_dataloader) if held_out_dataloader is not None else None
    register_checkpoint_hooks(accelerator, {"transformer": transformer}, **ema_checkpoint_hooks(ema, "transformer_ema"))
    place_ema(ema, accelerator.device, args.offload_ema)
    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_project_name or "train_mask_dit", config=tracker_config(args))

    position = resume_position(accelerator, args, plan)
    record = RunRecord(args, accelerator, "train_mask_dit.py",
                       paired_rows_fingerprint(getattr(train_dataset, "base", train_dataset)), position, plan)
    if buckets is not None:
        base = getattr(train_dataset, "base", train_dataset)
        record_buckets(record, buckets, accelerator, args.output_dir,
                       [base.records[i].name for i in base.indices], base.buckets)
    pipeline = MaskDiTPipeline(transformer, vae, tokenizer, text_encoder, pipeline_settings(args, vae_downsample))
    validate = evaluation_for(args, accelerator, model, pipeline, conditioner, held_out, held_out_dataloader, ema,
                              encoders, position.state, optimizer)
    monitor, guard = HealthMonitor(), NonFiniteGuard(args.max_nonfinite_steps)
    logger.info(f"***** Running training *****  {plan.describe(len(train_dataset), position.global_step)}")
    progress = progress_bar(accelerator, plan.max_train_steps, position.global_step)
    boundary = StepBoundary(
        accelerator, position.global_step, plan.max_train_steps, Checkpointing(
            args.output_dir, args.checkpointing_steps, args.checkpoints_total_limit, lambda: dict(validate.state),
            record),
        progress, monitor, args.logging_steps,
        log_health=lambda step: log_training_health(accelerator, monitor, progress, step, lr_scheduler.get_last_lr()[0],
                                                    guard, {"epoch": epoch}, echo=True),
        ema=ema, ema_parameters=transformer.parameters, offload_ema=args.offload_ema,
        validate_step=lambda step: is_due(step, args.validation_steps) and validate(step), guard=guard)
    for epoch in range(position.first_epoch, plan.num_epochs):
        if boundary.step >= plan.max_train_steps:  # resumed from the last step's checkpoint
            break
        micro_step = 0
        for batch in epoch_batches(accelerator, train_dataloader, train_dataset, epoch, position):
            with accelerator.accumulate(model):
                generator = step_generator(
                    args.seed, boundary.step, micro_step, accelerator.process_index, accelerator.device
                )
                micro_step = (micro_step + 1) % plan.gradient_accumulation_steps
                with oom_hint():
                    with forward_autocast(accelerator):
                        loss = flow_step_loss(model, conditioner, batch, generator, args)
                    accelerator.backward(loss)
                grad_norm = apply_update(accelerator, optimizer, lr_scheduler, model.parameters(), loss.detach(),
                                         args.max_grad_norm, guard)
            monitor.add(loss=loss.detach(), grad_norm=grad_norm)  # grad_norm: once per optimizer step
            monitor.count_samples(batch_size_of(batch))
            if accelerator.sync_gradients and boundary.step_done():
                break
        epoch_end = boundary.step % plan.updates_per_epoch == 0 or boundary.step >= plan.max_train_steps
        if boundary.epoch_done(lambda: epoch_end and epoch_validation_due(epoch, args.validation_epochs)
                               and validate(boundary.step),
                               checkpoint=epoch_end and is_due(epoch + 1, args.checkpointing_epochs)):
            break

    write_rank_checksums(accelerator, transformer)  # debug hook for the multi-process tests (no-op unless set)
    boundary.finish(lambda: finish_training(args, accelerator, pipeline, ema, optimizer))


def finish_training(args, accelerator, pipeline, ema, optimizer) -> None:
    with evaluation_weights(optimizer):  # schedule-free: save the averaged weights
        save_final(args, accelerator, pipeline, ema)


if __name__ == "__main__":
    user_entry_point(main, parse_args)
