#!/usr/bin/env python
"""Fine-tune (full or LoRA) or train from scratch a text-to-image model: Stable Diffusion 1.x/2.x, XL or 3/3.5.

A drop-in for diffusers' examples/text_to_image/train_text_to_image.py, train_text_to_image_lora.py,
train_text_to_image_sdxl.py and train_text_to_image_lora_sdxl.py: every flag of the four, same names, defaults
and output layout (`checkpoint-N/`, the final pipeline or `pytorch_lora_weights.safetensors` in --output_dir).
The model family is read from model_index.json (utils/families/): an SDXL pipeline trains with both text
encoders, the pooled prompt and the time ids; an SD3 pipeline (StableDiffusion3Pipeline) as diffusers'
train_dreambooth(_lora)_sd3.py trains it (rectified flow, --weighting_scheme, its flags and LoRA file).
Adds: from-scratch models (--model_preset / --unet_config / --vae_config, a VAE stage,
text-encoder training, caption dropout), --config YAML, step-based validation with
DPM-Solver++, training-health logs, atomic checkpoints, SIGTERM-safe stops.

    accelerate launch train_text_to_image.py --pretrained_model_name_or_path PATH \
        --dataset_name lambdalabs/naruto-blip-captions --resolution 512 --output_dir out
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

import torch
from accelerate.utils import DataLoaderConfiguration
from diffusers.optimization import get_scheduler

from utils.auto_batch import add_auto_batch_args, resolve_auto_batch_size_for
from utils.buckets import add_bucket_args, check_bucket_args, check_bucket_combinations, record_buckets
from utils.cache import CacheSettings, add_cache_args, collate_cached, offload_cached_encoders, resolve_cache_args
from utils.checkpointing import resume_position
from utils.config import parse_args_with_config
from utils.data import epoch_batches, make_train_dataloader
from utils.ema import add_ema_args, create_ema, place_ema
from utils.evaluation import Evaluation
from utils.errors import UserError, oom_hint, user_entry_point
from utils.hub import add_hub_args, check_hub_args, push_output_dir, redact_args, write_model_card
from utils.latents import vae_scale_factor
from utils.families import family_for
from utils.families.flow_matching import add_flow_matching_args
from utils.optim import (apply_update, create_optimizer, evaluation_weights, parse_optimizer_args, prodigy_kwargs,
                         restart_lr_schedule)
from utils.report import log_metrics
from utils.loop import Checkpointing, StepBoundary
from utils.run import (add_run_args, claim_output_dir, create_accelerator, epoch_validation_due, is_due, progress_bar,
                       save_run_args, tracker_config, weight_dtype, write_rank_checksums)
from utils.plan import plan_training
from utils.run_record import RunRecord
from utils.sd.args import (add_model_args, add_training_args, add_validation_args, check_model_args,
                           check_training_args, check_validation_args)
from utils.sd.cache import cache_text_image_dataset, rows_fingerprint
from utils.sd.data import (TextImageSettings, add_image_data_args, assign_dataset_buckets, build_held_out_dataset,
                           build_text_image_dataset, caption_tags, captions_for_new_tokenizer, check_data_source_args,
                           collate_text_image, split_held_out, usable_rows)
from utils.sd.dreambooth import (add_dreambooth_args, check_dreambooth_args, dreambooth_aliases, dreambooth_defaults,
                                 load_training_rows)
from utils.sd.losses import add_loss_args, check_loss_args
from utils.sd.lora import add_lora_args, check_lora_args, lora_checkpoint_check
from utils.sd.models import ModelSource
from utils.sd.model_kind import family_name
from utils.sd.saving import WeightsOutput, save_weights
from utils.sd.single_file import add_single_file_args
from utils.sd.vae_training import (VaeStageSettings, add_vae_args, check_vae_args, joint_vae, latent_scaling_factor,
                                  load_finished_stage, train_vae_stage)
from utils.sd.validation import (ValidationSettings, held_out_loss, held_out_quality, log_validation,
                                 validation_prompts)
from utils.quality import HIGHER_IS_BETTER, quality_for
from utils.speed import add_speed_args, apply_speedups, forward_autocast
from utils.stopping import EarlyStopping
from utils.trained_modules import (configure_training, prepare, register_hooks, trained_networks,
                                   trained_text_encoders)
from utils.telemetry import HealthMonitor, NonFiniteGuard, batch_size_of, global_norm, log_training_health

logger = logging.getLogger("train_text_to_image")


def parse_args(argv=None):
    return resolve_args(build_parser(__doc__.split("\n\n")[0]), argv)


def build_parser(description: str) -> argparse.ArgumentParser:
    """Every flag of the text-to-image trainer (train_controlnet.py adds its own to these)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(parser)
    add_vae_args(parser)
    add_lora_args(parser)
    add_image_data_args(parser)
    add_bucket_args(parser)
    add_training_args(parser)
    add_loss_args(parser)
    add_validation_args(parser)
    add_run_args(parser, output_dir_default=None)
    add_ema_args(parser)
    add_single_file_args(parser)
    add_hub_args(parser)
    add_cache_args(parser)
    add_auto_batch_args(parser)
    add_speed_args(parser, gradient_checkpointing=True)
    add_dreambooth_args(parser)
    add_flow_matching_args(parser)
    return parser


def resolve_args(parser, argv=None, family_of=family_name):
    """Parse, then fill the defaults the model family decides and check every flag (one-block errors).
    `family_of(args)`: the run's family name (train_controlnet.py: the ControlNet variant of it)."""
    args = parse_args_with_config(parser, argv, mode_defaults=dreambooth_defaults)  # a DreamBooth run: its defaults
    vars(args).update(dreambooth_aliases(args))

    env_local_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_local_rank != -1 and env_local_rank != args.local_rank:
        args.local_rank = env_local_rank
    # The model family (utils/families/) decides the defaults the diffusers scripts differ in.
    args.family = family_of(args)
    family = family_for(args.family)
    args.sdxl = family.sdxl
    vars(args).update({name: value for name, value in family.defaults(args).items() if getattr(args, name) is None})
    vars(args).update(family.implied(args))
    if args.proportion_empty_prompts is not None:  # the SDXL scripts' name for caption dropout
        if args.caption_dropout_prob not in (0.0, args.proportion_empty_prompts):
            raise UserError("--proportion_empty_prompts and --caption_dropout_prob are the same setting; give one.")
        args.caption_dropout_prob = args.proportion_empty_prompts
    if args.non_ema_revision is None:
        args.non_ema_revision = args.revision
    validate_args(args, family)
    vars(args).update(resolve_cache_args(args, train_text_encoder=args.train_text_encoder))  # --precompute = both
    caption_tags(args)  # refused with --cache_text_embeddings (resolved just above), before anything runs
    return args


def validate_args(args, family) -> None:
    """Each module checks the flags it reads (one-block errors, before anything runs)."""
    if args.use_8bit_adam and args.optimizer not in ("adamw", "adamw8bit"):
        raise UserError(f"--use_8bit_adam means --optimizer adamw8bit; it cannot go with --optimizer {args.optimizer}.")
    args.optimizer = "adamw8bit" if args.use_8bit_adam else args.optimizer
    parse_optimizer_args(args.optimizer_args)  # a malformed KEY=VALUE is refused before anything runs
    for check in (check_loss_args, check_model_args, check_training_args, check_bucket_combinations, check_lora_args,
                  check_dreambooth_args, check_data_source_args, check_vae_args, check_validation_args, check_hub_args,
                  family.check_args):
        check(args)




def check_resolution(args, family, models) -> None:
    factor = vae_scale_factor(models["vae"])
    if args.resolution % factor:  # else the pipeline refuses it at the first validation, hours in
        raise UserError(f"--resolution {args.resolution} must be a multiple of {factor} "
                        f"(the VAE downsamples by {factor}).")
    check_bucket_args(args, family.latent_multiple(models))


def prepare_vae(args, accelerator, models, train_dataloader) -> None:
    """From scratch: fit the VAE first (or reuse a finished stage), then freeze it; or, joint, fix the latent
    scale from the initial VAE's statistics for the whole run."""
    if args.train_vae and not joint_vae(args):
        finished = load_finished_stage(args.output_dir)
        models["vae"] = finished if finished is not None else train_vae_stage(
            accelerator, models["vae"], train_dataloader, VaeStageSettings(
                args.output_dir, args.vae_train_steps, args.vae_learning_rate, args.vae_kl_weight,
                (args.adam_beta1, args.adam_beta2, args.adam_epsilon), args.max_grad_norm, args.logging_steps,
                args.checkpointing_steps, args.max_nonfinite_steps, bool(args.resume_from_checkpoint)))
    elif joint_vae(args):
        first_batches = [batch for _, batch in zip(range(4), train_dataloader)]
        models["vae"].register_to_config(scaling_factor=latent_scaling_factor(models["vae"], first_batches, "cpu"))









def build_optimizer(args, family, accelerator, models, learning_rate: float):
    """The --optimizer over the trained weights, a param group per module; returns it and the groups'
    learning rates from this run's flags (what --resume_override_lr restarts at)."""
    param_groups = [{"params": [p for p in models[family.denoiser].parameters() if p.requires_grad],
                     "lr": learning_rate}]
    for name in trained_text_encoders(args, family, models):
        param_groups.append({"params": [p for p in models[name].parameters() if p.requires_grad],
                             "lr": args.text_encoder_learning_rate or learning_rate,
                             "weight_decay": args.adam_weight_decay if args.adam_weight_decay_text_encoder is None
                             else args.adam_weight_decay_text_encoder})
    if joint_vae(args):
        param_groups.append(
            {"params": list(models["vae"].parameters()), "lr": args.vae_learning_rate, "weight_decay": 0.0}
        )
    optimizer = make_optimizer(args, param_groups, accelerator.device)
    return optimizer, [group["lr"] for group in param_groups]


def make_optimizer(args, param_groups, device):
    return create_optimizer(args.optimizer, param_groups, device, betas=(args.adam_beta1, args.adam_beta2),
                            weight_decay=args.adam_weight_decay, eps=args.adam_epsilon,
                            extra={**prodigy_kwargs(args.optimizer, args.prodigy_beta3, args.prodigy_decouple,
                                                    args.prodigy_use_bias_correction, args.prodigy_safeguard_warmup),
                                   **parse_optimizer_args(args.optimizer_args)})


def cache_datasets(args, family, accelerator, models, *datasets) -> list:
    """--cache_latents / --cache_text_embeddings: the datasets (None stays None) read from their caches, built
    first where missing; the encoders the caches replace then leave the device."""
    text_encoders = [models[name] for name in family.text_encoder_names(models)]
    cache = CacheSettings.from_args(args)
    cached = [cache_text_image_dataset(data, models["vae"], text_encoders, cache, accelerator,
                                       lambda ids, mask: family.encode_text(models, ids, mask))
              if data is not None else None for data in datasets]
    offload_cached_encoders(models, cache)
    return cached


def validation_due(args, plan, step: int, epoch: int | None = None) -> bool:
    """Step validations every --validation_steps, else epoch ones every --validation_epochs; never at the last
    step (the end of training validates there, once)."""
    asked = validation_prompts(args) or args.validation_split
    if not asked or step >= plan.max_train_steps:
        return False
    if epoch is None:
        return is_due(step, args.validation_steps)
    return not args.validation_steps and epoch_validation_due(epoch, args.validation_epochs)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def main(args):
    accelerator = create_accelerator(args, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    family = family_for(args.family, args)  # SD, SDXL, SD3: what the model is (utils/families/)
    claim_output_dir(args, accelerator)  # created, locked for this run, a restarted run's checkpoints discarded
    dtype = weight_dtype(accelerator)

    # Data first: a from-scratch tokenizer learns its vocabulary from the captions.
    rows, held_out_rows = split_held_out(args, usable_rows(args, load_training_rows(args, accelerator)))
    with accelerator.main_process_first():
        models = family.load_models(ModelSource.from_args(args), captions_for_new_tokenizer(args, rows))
    check_resolution(args, family, models)
    settings = TextImageSettings.from_args(args, family.conditioning_images)  # (ControlNet: + conditioning images)
    dataset = build_text_image_dataset(settings, rows, family.tokenizers(models))
    held_out = build_held_out_dataset(settings, held_out_rows, family.tokenizers(models))  # (None: no held-out rows)
    buckets = assign_dataset_buckets(args, dataset, family.token_pixels(models))  # --enable_bucket (image headers)
    train_dataloader = make_train_dataloader(dataset, 16 if args.train_batch_size == "auto" else args.train_batch_size,
                                             args.dataloader_num_workers, collate_text_image, buckets=dataset.buckets,
                                             seed=args.seed)
    if accelerator.is_main_process:  # before the VAE stage, so its losses are logged too
        accelerator.init_trackers(args.tracker_project_name, tracker_config(args))
    prepare_vae(args, accelerator, models, train_dataloader)
    configure_training(args, family, accelerator, models, dtype)

    # Speed: train from cached latents/embeddings, size the batch (--train_batch_size auto), compile.
    dataset, held_out = cache_datasets(args, family, accelerator, models, dataset, held_out)
    collate = collate_cached if args.cache_latents or args.cache_text_embeddings else collate_text_image
    batch_size, accumulation = resolve_auto_batch_size_for(
        args, accelerator, lambda batch: family.training_loss(args, models, batch, HealthMonitor()), dataset, collate,
        trained_networks(args, family, models))
    train_dataloader = make_train_dataloader(dataset, batch_size, args.dataloader_num_workers, collate,
                                             buckets=getattr(dataset, "base", dataset).buckets, seed=args.seed)
    plan = plan_training(batch_size, accumulation, accelerator.num_processes,
                         math.ceil(len(train_dataloader) / accelerator.num_processes), args.max_train_steps,
                         args.num_train_epochs, args.learning_rate, args.scale_lr)
    denoiser = models[family.denoiser]  # the UNet or transformer
    apply_speedups(denoiser, args)
    ema = place_ema(create_ema(denoiser, args) if args.use_ema else None, accelerator.device, args.offload_ema)
    register_hooks(args, family, accelerator, models, ema)

    # Optimizer and schedule (the prepared scheduler steps once per process, hence the factors).
    optimizer, initial_lrs = build_optimizer(args, family, accelerator, models, plan.learning_rate)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_cycles=args.lr_num_cycles, power=args.lr_power,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=plan.max_train_steps * accelerator.num_processes)
    trained, optimizer, train_dataloader, lr_scheduler = prepare(accelerator, args, family, models, optimizer,
                                                                  train_dataloader, lr_scheduler)

    position = resume_position(accelerator, args, plan, check=lora_checkpoint_check(args))
    if accelerator.is_main_process:  # only once every check has passed: a refused run changes nothing
        save_run_args(args, plan)
    record = RunRecord(args, accelerator, "train_text_to_image.py",
                       rows_fingerprint(rows, args.image_column, args.caption_column), position, plan)
    if buckets is not None:
        base = getattr(dataset, "base", dataset)
        record_buckets(record, buckets, accelerator, args.output_dir,
                       [base.file_name(i) for i in range(len(base))], base.buckets)
    evaluation = evaluation_for(args, family, plan, accelerator, models, ema, held_out, collate, optimizer,
                                position.state)
    if position.path and args.resume_override_lr:
        restart_lr_schedule(lr_scheduler, optimizer, initial_lrs)
    logger.info(f"***** Running training *****  {plan.describe(len(dataset), position.global_step)}")
    monitor, guard = HealthMonitor(), NonFiniteGuard(args.max_nonfinite_steps)
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    progress = progress_bar(accelerator, plan.max_train_steps, position.global_step)
    epoch = position.first_epoch
    boundary = StepBoundary(
        accelerator, position.global_step, plan.max_train_steps, Checkpointing(
            args.output_dir, args.checkpointing_steps, args.checkpoints_total_limit, record=record,
            training_state=lambda: {"epoch": epoch, "skipped_nonfinite_steps": guard.total_skipped,
                                    **evaluation.state}),
        progress, monitor, args.logging_steps, health_at_last_step=True,
        log_health=lambda step: log_training_health(accelerator, monitor, progress, step, lr_scheduler.get_last_lr()[0],
                                                    guard, {"param_norm": global_norm(trainable).item()}),
        ema=ema, ema_parameters=lambda: accelerator.unwrap_model(models[family.denoiser]).parameters(),
        offload_ema=args.offload_ema, guard=guard,
        validate_step=lambda step: validation_due(args, plan, step) and evaluation(step))

    with oom_hint():
        for epoch in range(position.first_epoch, plan.num_epochs):
            for module in trained[:len(trained) - joint_vae(args)]:  # (the joint VAE's mode is its own)
                module.train()
            for batch in epoch_batches(accelerator, train_dataloader, dataset, epoch, position):
                with accelerator.accumulate(*trained):
                    with forward_autocast(accelerator):  # (DeepSpeed's; accelerate's own elsewhere)
                        loss = family.training_loss(args, models, batch, monitor)
                    accelerator.backward(loss)
                    grad_norm = apply_update(accelerator, optimizer, lr_scheduler, trainable, loss, args.max_grad_norm,
                                             guard)
                monitor.add(loss=loss, grad_norm=grad_norm)  # grad_norm: once per optimizer step (None otherwise)
                if args.debug_loss:  # diffusers' SDXL LoRA script: the batch's loss under each of its file names
                    log_metrics(accelerator, {f"loss_for_{n}": loss.item() for n in batch["names"]}, boundary.step)
                monitor.count_samples(batch_size_of(batch))
                if accelerator.sync_gradients and boundary.step_done():
                    break
            if boundary.epoch_done(lambda: validation_due(args, plan, boundary.step, epoch)
                                   and evaluation(boundary.step)):
                break
    write_rank_checksums(accelerator, models[family.denoiser])  # debug hook for the multi-process tests
    boundary.finish(lambda: finish_training(args, family, plan, accelerator, models, ema, optimizer, evaluation,
                                             boundary.step))


def finish_training(args, family, plan, accelerator, models, ema, optimizer, evaluation, step: int) -> None:
    """The final weights (scored first: best/ too when they are the lowest val/loss), then the optional extras."""
    with evaluation_weights(optimizer):  # schedule-free: save (and score) the averaged weights
        evaluation(step, final=True)
        save_final(args, family, plan, accelerator, models, ema, evaluation if evaluation.improved else None)


def evaluation_for(args, family, plan, accelerator, models, ema, held_out, collate, optimizer,
                   resumed_state) -> Evaluation:
    """val/loss (and --validation_metrics) on the --validation_split data (best/, --early_stopping_patience follow
    --early_stopping_metric), then the validation images, all from the weights that would be saved
    (utils/evaluation.py)."""
    quality, key, sampling = quality_for(args), args.early_stopping_metric, ValidationSettings.from_args(args)

    def score(step: int) -> dict:
        if held_out is None:
            return {}
        metrics = {"val/loss": held_out_loss(family, accelerator, models, held_out, collate, plan.batch_size,
                                             args.seed)}
        return {**metrics, **(held_out_quality(sampling, family, accelerator, models, held_out, quality)
                              if quality else {})}

    def report(step: int, metrics: dict, improved: bool, final: bool) -> None:
        if metrics:
            best = "val/best_loss" if key == "val/loss" else key.replace("val/", "val/best_")
            log_metrics(accelerator, {**metrics, best: evaluation.state["best_validation_loss"]}, step)
            logger.info(f"step {step}: " + ", ".join(f"{k} {v:.6f}" for k, v in metrics.items())
                        + (f" (best {key} so far)" if improved else ""))
        if accelerator.is_main_process and not final:  # (the EMA weights are in already; the final ones: save_final)
            log_validation(sampling, family, accelerator, models, None, step)

    evaluation = Evaluation(
        accelerator, args.output_dir, score, key, lambda directory, _: save_weights_to(
            args, family, plan, accelerator, models, directory), ema,
        accelerator.unwrap_model(models[family.denoiser]).parameters,
        optimizer, EarlyStopping(args.early_stopping_patience, args.early_stopping_min_delta, resumed_state,
                                 higher_is_better=key in HIGHER_IS_BETTER), report)
    return evaluation


def save_final(args, family, plan, accelerator, models, ema, best: Evaluation | None = None) -> None:
    """Final pipeline (or LoRA weights) in --output_dir, EMA weights copied in (and in best/ too when they scored
    the lowest val/loss); then the optional extras (validation images, model card, Hub push), so none of them can
    cost the trained weights."""
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    if ema is not None:
        ema.copy_to(accelerator.unwrap_model(models[family.denoiser]).parameters())
    save_weights_to(args, family, plan, accelerator, models, args.output_dir)
    if best is not None:  # the final weights scored the lowest val/loss
        best.write_best({})
    grid = log_validation(ValidationSettings.from_args(args), family, accelerator, models, None,
                          plan.max_train_steps, final=True)
    base = args.pretrained_model_name_or_path or f"from scratch ({args.model_preset} preset)"
    write_model_card(args.output_dir, base_model=base, datasets=[args.dataset_name] if args.dataset_name else None,
                     hyperparameters={**redact_args(args), **plan.as_dict()}, validation_grid=grid,
                     lora=args.use_lora, tags=family.model_card_tags, **family.model_card_text(base))
    if args.push_to_hub:
        push_output_dir(args.output_dir, args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir)),
                        token=args.hub_token, private=args.hub_private_repo)


def save_weights_to(args, family, plan, accelerator, models, directory: str) -> None:
    """The pipeline or LoRA weights in `directory` (utils/sd/saving.py), as the flags ask."""
    output = WeightsOutput(args.output_dir, args.pretrained_model_name_or_path,
                           args.pretrained_model_name_or_path or args.model_preset, args.revision, args.variant,
                           args.sdxl, args.resolution, plan.max_train_steps,
                           args.lora_format if args.use_lora else None,
                           args.single_file_dtype if args.save_single_file else None, args.skip_save_text_encoder,
                           torch.float32 if args.upcast_before_saving else weight_dtype(accelerator))
    save_weights(output, family, accelerator, models, family.text_encoder_names(models),
                 trained_text_encoders(args, family, models), directory)


if __name__ == "__main__":
    user_entry_point(main, parse_args)
