#!/usr/bin/env python
"""Train or evaluate MSHNet (infrared small-target segmentation) with Accelerate: CPU, GPUs or TPU.

The same script runs everywhere; the accelerate config picks the hardware::

    # CPU / one or many GPUs
    accelerate launch train_segmentation_tpu.py --dataset_dir datasets/IRSTD-1k
    # TPU (8 cores of a v2/v3-8, bf16): see docs/TPU.md
    accelerate launch --config_file accelerate_configs/tpu.yaml train_segmentation_tpu.py \
        --dataset-dir datasets/IRSTD-1k --batch-size 32 --epochs 400 --lr 0.05
    # guide 004's command line still works (spawns one process per TPU core)
    python train_segmentation_tpu.py --dataset-dir datasets/IRSTD-1k --batch-size 32 --use-tpu --num-cores 8
    # evaluation: metrics JSON + predicted masks as PNGs
    python train_segmentation_tpu.py --mode test --dataset-dir datasets/IRSTD-1k --weight_path outputs/mshnet/best

Training follows the MSHNet reference: Adagrad (lr 0.05), epochs 0..--warm_epoch train only
the main head with the soft-IoU loss, later epochs all heads with the SLS loss; evaluation on
the test split after every epoch; the weights with the best mIoU go to `output_dir/best/`.
Shapes are fixed (random crops of --crop_size, drop_last, evaluation at --base_size) so XLA
compiles each graph once; on XLA the loop reads values back only every --logging_steps steps.
"""

from __future__ import annotations

import gc

if __name__ == "__main__":  # a command, not an import: no cyclic GC until its imports are done (user_entry_point)
    gc.disable()

import argparse
import json
import logging
import math
import os

import utils  # noqa: F401  (first: its log filter must be in place before diffusers/peft import bitsandbytes)

# isort: split

from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, DistributedType, PrepareForLaunch
from diffusers.optimization import get_scheduler
from torch.utils.data import DataLoader, default_collate

from utils.auto_batch import add_auto_batch_args, resolve_auto_batch_size_for
from utils.cache import fingerprint
from utils.atomic import atomic_directory, write_json_atomic
from utils.checkpointing import check_finite_before_saving, register_checkpoint_hooks, resume_position, save_module
from utils.config import add_hyphen_aliases, parse_args_with_config
from utils.data import add_data_source_args, epoch_batches, make_train_dataloader
from utils.ema import add_ema_args, create_ema, ema_checkpoint_hooks, place_ema, save_ema
from utils.evaluation import Evaluation
from utils.stopping import EarlyStopping
from utils.errors import MissingPackageError, UserError, oom_hint, user_entry_point
from utils.optim import (add_lr_schedule_args, add_optimizer_args, apply_update, create_optimizer, evaluation_weights,
                         parse_optimizer_args)
from utils.preflight import add_preflight_args
from utils.report import log_metrics
from utils.run import (add_run_args, claim_output_dir, create_accelerator, end_training, is_due, progress_bar,
                       tracker_config, write_rank_checksums)
from utils.loop import Checkpointing, StepBoundary
from utils.plan import add_plan_args, plan_training
from utils.run_record import RunRecord
from utils.segmentation.data import (SPLIT_FILES, IRSTDDataset, canonical_dataset_name, list_split, native_eval_size,
                                     usable_samples)
from utils.segmentation.evaluation import evaluate, prediction_grid, table_rows
from utils.segmentation.mshnet import HEADS, MSHNet, multiscale_sls_loss
from utils.segmentation.weights import load_weights, recorded_head
from utils.speed import add_speed_args, apply_speedups
from utils.telemetry import HealthMonitor, NonFiniteGuard, batch_size_of, log_training_health
from utils.xla import log_xla_metrics, patch_accelerate_xla_loader, xla_compilation_count

logger = logging.getLogger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train or evaluate MSHNet on an IRSTD-1k-layout data set.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_data_source_args(parser, aliases={"train_data_dir": ["--dataset_dir"]}, train_data_dir_required=True,
                         train_data_dir_help="Folder with images/, masks/ and trainval.txt + test.txt (MSHNet's IRSTD-1k "
                                             "layout) or img_idx/train_<name>.txt + test_<name>.txt (BasicIRSTD's), or "
                                             "the folder above it with --dataset_name (docs/SEGMENTATION.md).",
                         dataset_name_help="IRSTD-1K, NUAA-SIRST, NUDT-SIRST, NUDT-SIRST-Sea, or SIRST3 (train on the "
                                           "union of the first three, score each one's test split). Default: the "
                                           "folder's name. A known data set without split files uses its standard "
                                           "split (utils/segmentation/splits).")
    parser.add_argument("--eval_size", type=str, default="auto", choices=["auto", "base", "native"],
                        help="Score at --base_size (frames resized, MSHNet's protocol) or at each frame's own size "
                             "(BasicIRSTD's). auto: base for the MSHNet layout, native for BasicIRSTD/standard "
                             "splits.")
    parser.add_argument("--eval_head", type=str, default="auto", choices=["auto", "main", "fused"],
                        help="--mode test: the output to score. auto: the one the weights were selected with "
                             "(recorded next to them: main during warm-up, fused after), else fused (the "
                             "reference's test mode, and what its released weights are scored with).")
    parser.add_argument("--metric_compat", type=str, default="corrected", choices=["corrected", "mshnet"],
                        help="mshnet: Fa as the MSHNet repository computes it (false alarms matched by area value; "
                             "for comparison with its published numbers). Default: the corrected count.")
    parser.add_argument("--roc_bins", type=int, default=10,
                        help="--mode test: thresholds 0, 1/N, ..., 1 of the Pd-Fa curve (roc.csv, roc.png); 0: none.")
    parser.add_argument("--mode", type=str, default="train", choices=["train", "test"],
                        help="train: train and evaluate every epoch. test: evaluate "
                             "--weight_path, write metrics and masks.")
    parser.add_argument("--weight_path", type=str, default=None,
                        help="Weights to evaluate (--mode test) or start from: a best/ or checkpoint-N/ folder, a "
                             ".safetensors file, or a reference MSHNet .pkl/.tar state dict.")
    add_plan_args(parser, batch_size=4, epochs=400, learning_rate=0.05,  # MSHNet's; guide 004's names as aliases
                  aliases={"train_batch_size": ["--batch_size"], "num_train_epochs": ["--epochs"],
                           "learning_rate": ["--lr"]})
    parser.add_argument("--cache_images", action="store_true",
                        help="Decode every image and mask once and keep them in (shared) memory: about half of a "
                             "sample's loading time (IRSTD-1k: ~1 GB). Same augmentation, same results.")
    parser.add_argument("--eval_batch_size", type=int, default=None,
                        help="Evaluation batch size per device (default: --batch_size).")
    parser.add_argument("--warm_epoch", type=int, default=5,
                        help="Epochs 0..warm_epoch train only the main head with the soft-IoU loss (as the reference).")
    parser.add_argument("--base_size", type=int, default=256,
                        help="Evaluation size, and the centre of the training rescale range.")
    parser.add_argument("--crop_size", type=int, default=256, help="Training crop size (a multiple of 16).")
    add_optimizer_args(parser, default="adagrad")  # Adagrad is the reference's
    parser.add_argument("--weight_decay", type=float, default=0.0, help="Weight decay (AdamW: decoupled).")
    add_lr_schedule_args(parser, scheduler="constant", warmup_steps=0)
    parser.add_argument("--eval_epochs", type=int, default=1,
                        help="Evaluate every N epochs and after the last (0: after the last only).")
    parser.add_argument("--num_grid_images", type=int, default=8,
                        help="Test images in the TensorBoard prediction grid.")
    parser.add_argument("--use_tpu", action="store_true",
                        help="Run on TPU. With `python`, spawns --num_cores processes; with `accelerate "
                             "launch` the config decides.")
    parser.add_argument("--num_cores", type=int, default=8,
                        help="TPU cores to use with --use_tpu when started with `python`.")
    add_run_args(parser, output_dir_default="outputs/mshnet")
    add_preflight_args(parser)
    add_ema_args(parser)
    add_speed_args(parser)
    add_auto_batch_args(parser)
    # The reference trains without gradient clipping; 0 turns it off.
    parser.set_defaults(max_grad_norm=0.0, checkpointing_steps=1000, checkpoints_total_limit=2)
    add_hyphen_aliases(parser)
    args = parse_args_with_config(parser, argv)
    for flag in ("base_size", "crop_size"):
        if getattr(args, flag) < 16 or getattr(args, flag) % 16:
            raise UserError(f"--{flag} {getattr(args, flag)} must be a multiple of 16 (MSHNet pools four times)")
    if args.mode == "test" and not args.weight_path:
        raise UserError("--mode test needs --weight_path (e.g. outputs/mshnet/best)")
    parse_optimizer_args(args.optimizer_args)  # a malformed KEY=VALUE is refused before anything runs
    if args.train_batch_size == "auto" and args.mode == "test" and not args.eval_batch_size:
        raise UserError(
            "--mode test with --batch_size auto: give --eval_batch_size (nothing is trained to size it on)"
        )
    if args.train_batch_size != "auto":
        args.eval_batch_size = args.eval_batch_size or args.train_batch_size
    return args



def build_datasets(args):
    # Without --seed, augmentation still needs one seed shared by all processes and kept on resume.
    augment_seed = args.seed if args.seed is not None else 0
    listings = {}
    for split in ("trainval", "test"):
        listing = list_split(args.train_data_dir, split, args.dataset_name)
        listings[split] = usable_samples(args, listing, " + ".join(listing.files))
    native = args.eval_size == "native" or args.eval_size == "auto" and not listings["test"].files[0].endswith(
        SPLIT_FILES["test"])
    native_size = native_eval_size(listings["test"]) if native else None
    train_set = IRSTDDataset(args.train_data_dir, "trainval", train=True, base_size=args.base_size,
                             crop_size=args.crop_size, augment_seed=augment_seed, cache_in_memory=args.cache_images,
                             listing=listings["trainval"], skip_bad_samples=args.skip_bad_samples)
    eval_set = IRSTDDataset(args.train_data_dir, "test", train=False, base_size=args.base_size, crop_size=args.crop_size,
                            cache_in_memory=args.cache_images, listing=listings["test"], native_size=native_size)
    parts = sorted(set(eval_set.sources))
    logger.info(f"Data: {len(train_set)} training frames from {', '.join(listings['trainval'].files)}; "
                f"{len(eval_set)} test frames ({', '.join(parts)}) scored at "
                + (f"their native size (padded to {native_size[1]}x{native_size[0]})" if native_size
                   else f"{args.base_size}x{args.base_size}"))
    if args.cache_images:
        logger.info(
            f"--cache_images: {(train_set.frames.nbytes + eval_set.frames.nbytes) / 2**20:.0f} MiB "
            "of decoded frames in memory"
        )
    return train_set, eval_set


def build_dataloaders(args, train_set, eval_set, batch_size: int):
    # drop_last keeps every training batch the same shape (one XLA compilation).
    train_loader = make_train_dataloader(train_set, batch_size, args.dataloader_num_workers, drop_last=True)
    eval_loader = DataLoader(eval_set, batch_size=args.eval_batch_size or batch_size, shuffle=False, drop_last=False,
                             num_workers=args.dataloader_num_workers)
    return train_loader, eval_loader



def save_best(model, directory: str, metrics: dict, epoch: int, global_step: int) -> None:
    """Write weights + metrics to `directory` atomically (a temp folder, then renamed into place)."""
    with atomic_directory(directory) as temp:
        save_module(model, temp)
        write_json_atomic(os.path.join(temp, "metrics.json"), {**metrics, "epoch": epoch, "global_step": global_step})


def build_model(args, device) -> MSHNet:
    model = MSHNet(input_channels=3)
    if args.weight_path:
        load_weights(model, args.weight_path)
    return model.to(device)


def check_one_batch(args, accelerator, train_set, batch_size: int) -> None:
    if len(train_set) < batch_size * accelerator.num_processes:
        raise UserError(f"{args.train_data_dir}/trainval.txt lists {len(train_set)} samples, fewer than one batch "
                        f"({batch_size} x {accelerator.num_processes} processes); lower --train_batch_size "
                        "(--batch-size).")


def save_final(args, accelerator, raw_model, ema, info: dict) -> None:
    """output_dir/last (the trained weights) and output_dir/last_ema, each replaced atomically, with
    model_info.json (epoch, step, and the head --mode test scores them with)."""
    check_finite_before_saving(accelerator, args.output_dir, f"{args.output_dir}/last", [raw_model])
    if accelerator.is_main_process:
        with atomic_directory(os.path.join(args.output_dir, "last")) as temp:
            save_module(raw_model, temp)
            write_json_atomic(os.path.join(temp, "model_info.json"), info)
        if ema is not None:
            with atomic_directory(os.path.join(args.output_dir, "last_ema")) as temp:
                save_ema(ema, temp)
                write_json_atomic(os.path.join(temp, "model_info.json"), info)


# The MSHNet README's results (mIoU x1e-2, Pd x1e-2, Fa x1e-6; scored at --base_size 256 with its own Fa),
# to compare a --mode test of the released weights with.

def run_test(args, accelerator, model, eval_loader, eval_set):
    """--mode test: score --weight_path (the head it was selected with, else fused), test_metrics.json, the
    predicted masks, the Pd-Fa curve and the result as a table row."""
    model, eval_loader = accelerator.prepare(model, eval_loader)
    predictions_dir = os.path.join(args.output_dir, "predictions")
    if accelerator.is_main_process:
        os.makedirs(predictions_dir, exist_ok=True)
    head = args.eval_head if args.eval_head != "auto" else recorded_head(args.weight_path) or "fused"
    metrics, result, _ = evaluate(accelerator, model, eval_loader, eval_set, head == "fused", args.metric_compat,
                                  args.base_size, predictions_dir=predictions_dir, roc_bins=args.roc_bins or None)
    if accelerator.is_main_process:
        dataset = canonical_dataset_name(args.dataset_name or os.path.basename(os.path.normpath(args.train_data_dir)))
        write_json_atomic(os.path.join(args.output_dir, "test_metrics.json"),
                          {**metrics, "weight_path": args.weight_path, "dataset": dataset})
        if result.curve is not None:
            result.curve.write(args.output_dir, title=f"MSHNet on {dataset}")
        rows = table_rows(metrics, dataset)
        with open(os.path.join(args.output_dir, "table_row.md"), "w", encoding="utf-8") as handle:
            handle.write("\n".join(rows) + "\n")
        logger.info(f"Test metrics ({head} head, {metrics['metric_compat']} Fa): {metrics}; masks in "
                    f"{predictions_dir}")
        print("\n".join(rows))
    end_training(accelerator)
    return metrics


def select_xla(args, accelerator) -> bool:
    """Whether Accelerate chose XLA; --use_tpu without it is an error. Fixes accelerate's XLA loader wrapper."""
    on_xla = accelerator.distributed_type == DistributedType.XLA
    if args.use_tpu and not on_xla:
        raise RuntimeError(
            "--use_tpu given but Accelerate did not select XLA (torch_xla missing or no TPU). Install torch-xla "
            "matching your torch and launch with `accelerate launch --config_file "
            "accelerate_configs/tpu.yaml` (docs/TPU.md)."
        )
    if on_xla:
        patch_accelerate_xla_loader()
    logger.info(f"Distributed type: {accelerator.distributed_type}, processes: {accelerator.num_processes}, "
                f"device: {accelerator.device}, mixed precision: {accelerator.mixed_precision}")
    return on_xla


def log_health(args, accelerator, monitor, lr_scheduler, progress, step, epoch, on_xla, guard) -> None:
    """utils/telemetry.py's health logging (on XLA the only host read in the loop), plus train_log.jsonl."""
    logs = log_training_health(accelerator, monitor, progress, step, lr_scheduler.get_last_lr()[0], guard, {
        "epoch": epoch, "warm": float(epoch <= args.warm_epoch), **({"xla_compilations": xla_compilation_count()}
                                                                   if on_xla else {})}, echo=True)
    if not math.isfinite(logs.get("loss", 0.0)):
        raise FloatingPointError(f"Non-finite mean loss at step {step}; try a lower --learning_rate.")
    if accelerator.is_main_process:
        with open(os.path.join(args.output_dir, "train_log.jsonl"), "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, **logs}) + "\n")


def evaluation_for(args, accelerator, model, eval_loader, eval_set, ema, optimizer, resumed_state: dict,
                   epoch_now) -> Evaluation:
    """mIoU on the test split, the scored head as training is at `epoch_now()` (higher is better: best/ with
    metrics.json), logged to eval_metrics.jsonl, the trackers and the prediction grid; from the weights that would
    be saved (the EMA's with --use_ema; utils/evaluation.py)."""
    raw_model, predictions = accelerator.unwrap_model(model), {}

    def score(step: int) -> dict:
        epoch = epoch_now()
        metrics, _, kept = evaluate(accelerator, model, eval_loader, eval_set, epoch > args.warm_epoch,
                                    args.metric_compat, args.base_size)
        predictions.clear()
        predictions.update(kept)
        return {"epoch": epoch, "global_step": step, **metrics}

    def report(step: int, metrics: dict, improved: bool, final: bool) -> None:
        if accelerator.is_main_process:
            with open(os.path.join(args.output_dir, "eval_metrics.jsonl"), "a", encoding="utf-8") as handle:
                handle.write(json.dumps({**metrics, "best_mIoU": evaluation.state["best_miou"]}) + "\n")
            log_metrics(accelerator, {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))
                                      and k not in ("epoch", "global_step")}, step)
            log_prediction_grid(accelerator, eval_set, predictions, args.num_grid_images, step)
            logger.info(f"epoch {metrics['epoch']} eval: {metrics}")

    def save_best(directory: str, metrics: dict) -> None:
        save_module(raw_model, directory)
        write_json_atomic(os.path.join(directory, "metrics.json"), metrics)

    evaluation = Evaluation(accelerator, args.output_dir, score, "mIoU", save_best, ema, raw_model.parameters,
                            optimizer, EarlyStopping(None, 0.0, resumed_state, "best_miou", higher_is_better=True),
                            report)
    return evaluation


def main(args=None):
    """Entry point for `python` and for `accelerate launch` (whose TPU launcher calls main() with no arguments)."""
    args = parse_args() if args is None else args

    accelerator = create_accelerator(
        args,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        # During warm-up the side heads get no gradient; DDP must be told they are unused.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    claim_output_dir(args, accelerator)  # created, locked for this run, a restarted run's checkpoints discarded
    on_xla = select_xla(args, accelerator)
    model = build_model(args, accelerator.device)
    train_set, eval_set = build_datasets(args)
    batch_size, accumulation = args.train_batch_size, args.gradient_accumulation_steps
    if args.mode == "train":  # --batch_size auto: probe the full multi-scale loss (all heads: the most memory)
        batch_size, accumulation = resolve_auto_batch_size_for(args, accelerator, lambda batch: multiscale_sls_loss(
            *model(batch["pixel_values"], True), batch["mask"], in_warmup=False), train_set, default_collate, [model])
    train_loader, eval_loader = build_dataloaders(args, train_set, eval_set, batch_size)

    if args.mode == "test":
        return run_test(args, accelerator, model, eval_loader, eval_set)
    check_one_batch(args, accelerator, train_set, batch_size)
    apply_speedups(model, args)
    # Built after the model is on its device (see create_optimizer); the prepared scheduler steps per process.
    optimizer = create_optimizer(args.optimizer, model.parameters(), accelerator.device, lr=args.learning_rate,
                                 weight_decay=args.weight_decay, extra=parse_optimizer_args(args.optimizer_args))
    plan = plan_training(batch_size, accumulation, accelerator.num_processes,
                         len(train_set) // (batch_size * accelerator.num_processes), args.max_train_steps,
                         args.num_train_epochs, args.learning_rate)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=plan.max_train_steps * accelerator.num_processes)
    model, optimizer, train_loader, eval_loader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, lr_scheduler)
    raw_model = accelerator.unwrap_model(model)
    ema = place_ema(create_ema(raw_model, args) if args.use_ema else None, accelerator.device, args.offload_ema)
    register_checkpoint_hooks(accelerator, {"mshnet": raw_model}, **ema_checkpoint_hooks(ema, "mshnet_ema"))
    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_project_name or "mshnet", config=tracker_config(args))

    position = resume_position(accelerator, args, plan)
    record = RunRecord(args, accelerator, "train_segmentation_tpu.py", fingerprint(train_set.names), position, plan)
    evaluation = evaluation_for(args, accelerator, model, eval_loader, eval_set, ema, optimizer, position.state,
                                lambda: epoch)
    best = evaluation.state["best_miou"]
    logger.info(f"***** Running training *****  {plan.describe(len(train_set), position.global_step)}; "
                f"{len(eval_set)} test samples, warm-up epochs 0..{args.warm_epoch}, best mIoU so far "
                + ("none" if best is None else f"{best:.4f}"))
    monitor = HealthMonitor()
    # On XLA no fused optimizer can take the guard's device-side verdict, so it would read the loss on
    # the host every step and stall the device: no guard there.
    guard = None if on_xla else NonFiniteGuard(args.max_nonfinite_steps)
    epoch = position.first_epoch
    progress = progress_bar(accelerator, plan.max_train_steps, position.global_step)
    boundary = StepBoundary(
        accelerator, position.global_step, plan.max_train_steps, Checkpointing(
            args.output_dir, args.checkpointing_steps, args.checkpoints_total_limit, record=record,
            training_state=lambda: {"epoch": epoch, "head": HEADS[epoch > args.warm_epoch], **evaluation.state}),
        progress, monitor, args.logging_steps, ema=ema, ema_parameters=raw_model.parameters,
        offload_ema=args.offload_ema, guard=guard,
        log_health=lambda step: log_health(args, accelerator, monitor, lr_scheduler, progress, step, epoch, on_xla,
                                           guard))
    for epoch in range(position.first_epoch, plan.num_epochs):
        warm_flag = epoch > args.warm_epoch  # the reference's switch: multi-scale heads + SLS after warm-up
        model.train()
        for batch in epoch_batches(accelerator, train_loader, train_set, epoch, position):
            with accelerator.accumulate(model):
                with oom_hint("--batch_size"):
                    side_masks, mask = model(batch["pixel_values"], warm_flag)
                    loss = multiscale_sls_loss(side_masks, mask, batch["mask"], in_warmup=not warm_flag)
                    accelerator.backward(loss)
                grad_norm = apply_update(
                    accelerator, optimizer, lr_scheduler, model.parameters(), loss, args.max_grad_norm, guard
                )
            monitor.add(loss=loss.detach(), grad_norm=grad_norm)  # grad_norm: once per optimizer step
            monitor.count_samples(batch_size_of(batch))
            if accelerator.sync_gradients and boundary.step_done():
                break
        done = boundary.step >= plan.max_train_steps
        if not boundary.stopped and (done or is_due(epoch + 1, args.eval_epochs)):
            evaluation(boundary.step)
        if boundary.epoch_done():
            break

    if args.checkpointing_steps and not boundary.stopped:  # the last step's checkpoint (None: never)
        boundary.checkpoint()
    write_rank_checksums(accelerator, raw_model)  # debug hook for the multi-process tests (no-op unless set)
    boundary.finish(lambda: finish_training(args, accelerator, raw_model, ema, optimizer, epoch, boundary.step, on_xla))
    return None if boundary.stopped else evaluation.state["best_miou"]


def finish_training(args, accelerator, raw_model, ema, optimizer, epoch: int, step: int, on_xla: bool) -> None:
    with evaluation_weights(optimizer):
        save_final(args, accelerator, raw_model, ema,
                   {"epoch": epoch, "global_step": step, "head": HEADS[epoch > args.warm_epoch]})
    log_xla_metrics(on_xla, args.output_dir, accelerator)


def log_prediction_grid(accelerator, eval_set, predictions, num_images, step):
    grid = prediction_grid(eval_set, predictions, num_images)
    if grid is None:
        return
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("eval/image_truth_prediction", grid, global_step=step, dataformats="HWC")


def launch_on_tpu(args) -> None:
    """guide 004's `python train_segmentation_tpu.py --use-tpu --num-cores 8`: one process per TPU core."""
    try:
        import torch_xla.distributed.xla_multiprocessing as xmp
    except ImportError as error:
        raise MissingPackageError(
            "--use_tpu needs torch_xla: pip install torch-xla==<your torch version> (docs/TPU.md)"
        ) from error

    if args.mixed_precision == "bf16":  # what `accelerate launch` does for a bf16 TPU config
        os.environ.setdefault("XLA_USE_BF16", "1")
    # PJRT uses every local TPU core when nprocs is None; 1 runs in this process.
    xmp.spawn(PrepareForLaunch(main, distributed_type="XLA"), args=(args,), nprocs=None if args.num_cores > 1 else 1)


def cli() -> None:
    args = parse_args()
    return launch_on_tpu(args) if args.use_tpu else main(args)


if __name__ == "__main__":
    user_entry_point(cli)
