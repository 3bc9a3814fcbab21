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
compiles each graph once, and the loop never reads a value back to the host except every
--logging_steps steps.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os

import utils  # noqa: F401  (first: its log filter must be in place before diffusers/peft import bitsandbytes)

# isort: split

import numpy as np
import torch
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, DistributedType, PrepareForLaunch
from diffusers.optimization import get_scheduler
from PIL import Image
from safetensors.torch import load_file
from scipy.special import expit
from torch.utils.data import DataLoader, default_collate

from utils.auto_batch import add_auto_batch_args, batch_size_arg, resolve_auto_batch_size_for
from utils.cache import fingerprint
from utils.atomic import atomic_directory, write_json_atomic
from utils.checkpointing import (STATE_FILE, check_finite_before_saving, register_checkpoint_hooks, resume_position,
                                 save_module)
from utils.config import add_hyphen_aliases, parse_args_with_config
from utils.data import epoch_batches, make_train_dataloader
from utils.ema import add_ema_args, create_ema, ema_checkpoint_hooks, ema_weights, place_ema, save_ema
from utils.errors import MissingPackageError, UserError, UserFileNotFoundError, oom_hint, run_script
from utils.optim import add_optimizer_args, apply_update, create_optimizer, evaluation_weights, parse_optimizer_args
from utils.preflight import add_preflight_args
from utils.report import log_metrics
from utils.run import (add_run_args, create_accelerator, end_training, progress_bar, steps_per_epoch, tracker_config,
                       write_rank_checksums)
from utils.loop import Checkpointing, StepBoundary
from utils.run_record import RunRecord
from utils.segmentation.data import (SPLIT_FILES, IRSTDDataset, canonical_dataset_name, list_split, native_eval_size,
                                     tensor_to_image, usable_samples)
from utils.segmentation.metrics import PdFaCurve, SegmentationMetrics
from utils.segmentation.mshnet import MSHNet, multiscale_sls_loss
from utils.speed import add_speed_args, apply_speedups
from utils.telemetry import HealthMonitor, NonFiniteGuard, batch_size_of
from utils.xla import log_xla_metrics, patch_accelerate_xla_loader, xla_compilation_count

logger = logging.getLogger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train or evaluate MSHNet on an IRSTD-1k-layout data set.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--train_data_dir", "--dataset_dir", dest="train_data_dir", type=str, required=True,
                        help="Folder with images/, masks/ and trainval.txt + test.txt (MSHNet's IRSTD-1k layout) or "
                             "img_idx/train_<name>.txt + test_<name>.txt (BasicIRSTD's), or the folder above it "
                             "with --dataset_name (docs/SEGMENTATION.md).")
    parser.add_argument("--dataset_name", type=str, default=None,
                        help="IRSTD-1K, NUAA-SIRST, NUDT-SIRST, NUDT-SIRST-Sea, or SIRST3 (train on the union of "
                             "the first three, score each one's test split). Default: the folder's name. A known "
                             "data set without split files uses its standard split (utils/segmentation/splits).")
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
    parser.add_argument("--train_batch_size", "--batch_size", dest="train_batch_size", type=batch_size_arg, default=4,
                        help="Training batch size per device (process), or 'auto': the largest that fits (GPU/CPU; "
                             "with --effective_batch_size, accumulation keeps that many samples per step).")
    parser.add_argument("--cache_images", action="store_true",
                        help="Decode every image and mask once and keep them in (shared) memory: about half of a "
                             "sample's loading time (IRSTD-1k: ~1 GB). Same augmentation, same results.")
    parser.add_argument("--eval_batch_size", type=int, default=None,
                        help="Evaluation batch size per device (default: --batch_size).")
    parser.add_argument("--num_train_epochs", "--epochs", dest="num_train_epochs", type=int, default=400,
                        help="Training epochs.")
    parser.add_argument("--max_train_steps", type=int, default=None,
                        help="Stop after this many optimizer steps (overrides --epochs).")
    parser.add_argument("--warm_epoch", type=int, default=5,
                        help="Epochs 0..warm_epoch train only the main head with the soft-IoU loss (as the reference).")
    parser.add_argument("--base_size", type=int, default=256,
                        help="Evaluation size, and the centre of the training rescale range.")
    parser.add_argument("--crop_size", type=int, default=256, help="Training crop size (a multiple of 16).")
    parser.add_argument("--learning_rate", "--lr", dest="learning_rate", type=float, default=0.05,
                        help="Initial learning rate.")
    add_optimizer_args(parser, default="adagrad")  # Adagrad is the reference's
    parser.add_argument("--weight_decay", type=float, default=0.0, help="Weight decay (AdamW: decoupled).")
    parser.add_argument("--lr_scheduler", type=str, default="constant",
                        help='diffusers scheduler: "constant", "constant_with_warmup", "cosine", '
                             '"linear", "polynomial", ...')
    parser.add_argument("--lr_warmup_steps", type=int, default=0, help="Scheduler warm-up steps.")
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


def read_weight_file(path: str) -> dict:
    """A state dict from a .safetensors file or a reference MSHNet file: a plain state dict (weight.pkl) or
    {"state_dict"/"net": ...} (its .tar releases), `module.` prefixes (DataParallel) removed. Torch files are
    read with weights_only=True: anything but tensors and plain containers is refused, never unpickled."""
    try:
        if path.endswith(".safetensors"):
            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, not a weight file, or a pickle of arbitrary objects
        raise UserError(f"--weight_path {path}: cannot be read as weights ({type(error).__name__}: "
                        f"{str(error).strip().splitlines()[0][:200] if str(error).strip() else ''}). Give a "
                        ".safetensors file, a folder of this script, or the MSHNet release's .pkl/.tar.") from error
    if isinstance(state, dict):
        state = state.get("state_dict", state.get("net", state))
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise UserError(f"--weight_path {path}: holds a {type(state).__name__}, not a state dict of tensors "
                        "(expected a plain state dict or {'state_dict': ...}, as MSHNet's releases).")
    return {key.removeprefix("module."): value for key, value in state.items()}


def load_weights(model: torch.nn.Module, path: str) -> None:
    """Load MSHNet weights from our folders/safetensors or from a reference checkpoint (`.pkl`/`.tar`)."""
    if os.path.isdir(path):
        for candidate in ("model.safetensors", os.path.join("mshnet", "model.safetensors")):
            if os.path.isfile(os.path.join(path, candidate)):
                path = os.path.join(path, candidate)
                break
        else:
            raise UserFileNotFoundError(
                f"--weight_path {path}: no model.safetensors or mshnet/model.safetensors inside")
    if not os.path.isfile(path):
        raise UserFileNotFoundError(f"--weight_path {path}: no such file or folder")
    state = read_weight_file(path)
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    wrong = [key for key in expected if key in state and tuple(state[key].shape) != tuple(expected[key].shape)]
    if missing or unexpected or wrong:
        raise UserError(f"--weight_path {path}: not MSHNet weights ({len(missing)} of {len(expected)} MSHNet tensors "
                        f"missing, {len(unexpected)} unknown, e.g. '{(unexpected or missing or wrong)[0]}'; "
                        f"{len(wrong)} of another shape). Give a best/, last/ or checkpoint-N/ folder of "
                        "train_segmentation_tpu.py, or the original MSHNet release's weight file.")
    model.load_state_dict(state)
    logger.info(f"Loaded weights from {path}")


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


def build_dataloaders(args, train_set, eval_set):
    # drop_last keeps every training batch the same shape (one XLA compilation).
    train_loader = make_train_dataloader(train_set, args.train_batch_size, args.dataloader_num_workers, drop_last=True)
    eval_loader = DataLoader(eval_set, batch_size=args.eval_batch_size, shuffle=False, drop_last=False,
                             num_workers=args.dataloader_num_workers)
    return train_loader, eval_loader


HEADS = {False: "main", True: "fused"}  # what model(x, warm_flag) scores: the full-resolution head, or the fusion


class EvalResult:
    """The metrics of one evaluation pass: overall, per part of the data set (SIRST3), and the Pd-Fa curve."""

    def __init__(self, sources: list[str], compat: str | None, roc_bins: int | None):
        self.parts = sorted(set(sources))
        self.overall = SegmentationMetrics(compat=compat)
        self.by_part = {part: SegmentationMetrics(compat=compat) for part in self.parts} if len(self.parts) > 1 else {}
        self.curve = PdFaCurve(roc_bins, compat=compat) if roc_bins else None

    def update(self, logits: np.ndarray, target: np.ndarray, source: str) -> np.ndarray:
        """One sample's logits and mask [H, W]; returns its binary prediction (uint8)."""
        pred = (logits > 0).astype(np.uint8)
        self.overall.update(pred[None], target[None])
        if self.by_part:
            self.by_part[source].update(pred[None], target[None])
        if self.curve is not None:
            self.curve.update(expit(logits.astype(np.float64))[None], target[None])
        return pred

    def metrics(self, head: str, eval_size: str) -> dict:
        result = {**self.overall.compute(), "head": head, "eval_size": eval_size}
        if self.by_part:
            result["per_dataset"] = {part: metrics.compute() for part, metrics in self.by_part.items()}
        return result


@torch.no_grad()
def evaluate(accelerator, model, eval_loader, eval_set, warm_flag: bool, args, predictions_dir: str | None = None,
             roc_bins: int | None = None):
    """Segment the evaluation split; metrics are computed on the host from gathered logits.

    Scores `model(x, warm_flag)`, as the reference's main.py does: the main head during warm-up, the fused
    output after it (and in --mode test); the metrics say which under "head". Frames evaluated at their
    native size are cropped back from the padding before scoring. Returns (metrics, EvalResult, {dataset
    index: binary prediction [H, W] uint8}) on every process; without `predictions_dir`, up to 64
    predictions are kept in memory for the prediction grid; masks are written as PNGs under predictions_dir.
    """
    model.eval()
    result = EvalResult(eval_set.sources, None if args.metric_compat == "corrected" else args.metric_compat, roc_bins)
    kept = {}
    for batch in eval_loader:
        _, logits = model(batch["pixel_values"], warm_flag)
        sizes = batch.get("size", torch.tensor(logits.shape[-2:]).expand(len(logits), 2).to(logits.device))
        # gather_for_metrics drops the samples accelerate repeated to even out the last batch.
        logits, target, index, sizes = accelerator.gather_for_metrics(
            (logits.float(), batch["mask"], batch["index"], sizes))
        logits, target = logits.cpu().numpy()[:, 0], target.cpu().numpy()[:, 0]
        for sample_logits, sample_target, sample_index, (height, width) in zip(
                logits, target, index.cpu().tolist(), sizes.cpu().tolist()):
            pred = result.update(sample_logits[:height, :width], sample_target[:height, :width],
                                 eval_set.sources[sample_index])
            if predictions_dir is not None and accelerator.is_main_process:
                path = os.path.join(predictions_dir, *prediction_subdir(eval_set, sample_index),
                                    f"{eval_set.names[sample_index]}.png")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                Image.fromarray(pred * 255, mode="L").save(path)
            elif predictions_dir is None and len(kept) < 64:
                kept[sample_index] = pred
    model.train()
    return result.metrics(HEADS[warm_flag], "native" if eval_set.native_size else f"{args.base_size}"), result, kept


def prediction_subdir(eval_set, index: int) -> tuple[str, ...]:
    """Masks of a multi-part set (SIRST3) go into one folder per part."""
    return (eval_set.sources[index],) if len(set(eval_set.sources)) > 1 else ()


def prediction_grid(eval_set, predictions: dict, num_images: int) -> np.ndarray | None:
    """Rows of [image | ground truth | prediction] for the first `num_images` test samples, uint8 [H, W, 3]."""
    rows = []
    for index in sorted(predictions)[:num_images]:
        sample = eval_set[index]
        height, width = predictions[index].shape
        image = tensor_to_image(sample["pixel_values"])[:height, :width]
        truth = np.repeat(sample["mask"][0, :height, :width].numpy()[..., None] * 255, 3, axis=2).astype(np.uint8)
        pred = np.repeat(predictions[index][..., None] * 255, 3, axis=2).astype(np.uint8)
        rows.append(np.concatenate([image, truth, pred], axis=1))
    if rows and len({row.shape for row in rows}) > 1:  # native-size frames of several sizes: pad to the widest
        height, width = max(row.shape[0] for row in rows), max(row.shape[1] for row in rows)
        rows = [np.pad(row, ((0, height - row.shape[0]), (0, width - row.shape[1]), (0, 0))) for row in rows]
    return np.concatenate(rows, axis=0) if rows else None


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


def check_one_batch(args, accelerator, train_set) -> None:
    if len(train_set) < args.train_batch_size * accelerator.num_processes:
        raise UserError(
            f"{args.train_data_dir}/trainval.txt lists {len(train_set)} samples, fewer than one batch "
            f"({args.train_batch_size} x {accelerator.num_processes} processes); lower --batch_size."
        )


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
PUBLISHED = {"IRSTD-1K": (67.16, 93.88, 15.03), "NUDT-SIRST": (80.55, 97.99, 11.77)}


def recorded_head(weight_path: str) -> str | None:
    """The head the weights were evaluated/selected with, as this script records it next to them."""
    folder = weight_path if os.path.isdir(weight_path) else os.path.dirname(weight_path)
    for directory in (folder, os.path.dirname(os.path.normpath(folder))):
        for name in ("metrics.json", "model_info.json", STATE_FILE):
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as handle:
                    head = json.load(handle).get("head")
                if head in HEADS.values():
                    return head
    return None


def table_rows(metrics: dict, dataset: str) -> list[str]:
    """The result as a row of the papers' tables (mIoU, nIoU, Pd, F1 x1e-2; Fa x1e-6), one per part of the set."""
    def row(name, m):
        cells = [f"{100 * m[k]:.2f}" if m[k] is not None else "-" for k in ("mIoU", "nIoU", "Pd")]
        fa = f"{m['Fa_1e-6']:.2f}" if m["Fa_1e-6"] is not None else "-"
        f1 = f"{100 * m['F1']:.2f}" if m["F1"] is not None else "-"
        return f"| MSHNet (this run) | {name} | {' | '.join(cells)} | {fa} | {f1} |"

    lines = ["| Method | Dataset | mIoU (x1e-2) | nIoU (x1e-2) | Pd (x1e-2) | Fa (x1e-6) | F1 (x1e-2) |",
             "|---|---|---|---|---|---|---|", row(dataset, metrics)]
    lines += [row(part, part_metrics) for part, part_metrics in metrics.get("per_dataset", {}).items()]
    for name in [dataset, *metrics.get("per_dataset", {})]:
        if name in PUBLISHED:
            miou, pd, fa = PUBLISHED[name]
            lines.append(f"| MSHNet (README, published) | {name} | {miou} | - | {pd} | {fa} | - |")
    return lines


def run_test(args, accelerator, model, eval_loader, eval_set):
    """--mode test: score --weight_path (the head it was selected with, else fused), test_metrics.json, the
    predicted masks, the Pd-Fa curve and the result as a table row."""
    model, eval_loader = accelerator.prepare(model, eval_loader)
    predictions_dir = os.path.join(args.output_dir, "predictions")
    if accelerator.is_main_process:
        os.makedirs(predictions_dir, exist_ok=True)
    head = args.eval_head if args.eval_head != "auto" else recorded_head(args.weight_path) or "fused"
    metrics, result, _ = evaluate(accelerator, model, eval_loader, eval_set, head == "fused", args,
                                  predictions_dir=predictions_dir, roc_bins=args.roc_bins or None)
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


def log_health(args, accelerator, monitor, lr_scheduler, progress, step, epoch, warm_flag, on_xla) -> None:
    logs = monitor.collect(accelerator)  # the only host read in the loop
    if not math.isfinite(logs.get("loss", 0.0)):
        raise FloatingPointError(f"Non-finite mean loss at step {step}; try a lower --lr.")
    logs.update(lr=lr_scheduler.get_last_lr()[0], epoch=epoch, warm=float(not warm_flag))
    if on_xla:
        logs["xla_compilations"] = xla_compilation_count()
    log_metrics(accelerator, {f"train/{k}": v for k, v in logs.items()}, step)
    progress.set_postfix(loss=f"{logs.get('loss', float('nan')):.4f}", lr=f"{logs['lr']:.2e}")
    if accelerator.is_main_process:
        with open(os.path.join(args.output_dir, "train_log.jsonl"), "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, **logs}) + "\n")
    logger.info(f"epoch {epoch} step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in logs.items()))


def evaluate_epoch(args, accelerator, model, eval_loader, eval_set, ema, warm_flag, epoch, step, best_miou) -> float:
    """Evaluate (with the EMA weights), append to eval_metrics.jsonl, log, keep output_dir/best; the new best."""
    raw_model = accelerator.unwrap_model(model)
    with ema_weights(ema, raw_model.parameters()):
        metrics, _, predictions = evaluate(accelerator, model, eval_loader, eval_set, warm_flag, args)
        improved = metrics["mIoU"] is not None and metrics["mIoU"] > best_miou
        if improved:
            best_miou = metrics["mIoU"]
        if accelerator.is_main_process:
            record = {"epoch": epoch, "global_step": step, **metrics, "best_mIoU": best_miou}
            with open(os.path.join(args.output_dir, "eval_metrics.jsonl"), "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
            log_metrics(accelerator, {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step)
            log_prediction_grid(accelerator, eval_set, predictions, args.num_grid_images, step)
            logger.info(f"epoch {epoch} eval: {metrics}")
            if improved:
                save_best(raw_model, os.path.join(args.output_dir, "best"), metrics, epoch, step)
    accelerator.wait_for_everyone()
    return best_miou


def main(args=None):
    """Entry point for `python` and for `accelerate launch` (whose TPU launcher calls main() with no arguments)."""
    args = parse_args() if args is None else args

    accelerator = create_accelerator(
        args,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        # During warm-up the side heads get no gradient; DDP must be told they are unused.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    on_xla = select_xla(args, accelerator)
    model = build_model(args, accelerator.device)
    train_set, eval_set = build_datasets(args)
    if args.mode == "train":  # --batch_size auto: probe the full multi-scale loss (all heads: the most memory)
        resolve_auto_batch_size_for(args, accelerator, lambda batch: multiscale_sls_loss(
            *model(batch["pixel_values"], True), batch["mask"], in_warmup=False), train_set, default_collate, [model],
            attr="train_batch_size")
        args.eval_batch_size = args.eval_batch_size or args.train_batch_size
    train_loader, eval_loader = build_dataloaders(args, train_set, eval_set)

    if args.mode == "test":
        return run_test(args, accelerator, model, eval_loader, eval_set)
    check_one_batch(args, accelerator, train_set)
    apply_speedups(model, args)
    # Built after the model is on its device (see create_optimizer); the prepared scheduler steps per process.
    optimizer = create_optimizer(args.optimizer, model.parameters(), accelerator.device, lr=args.learning_rate,
                                 weight_decay=args.weight_decay, extra=parse_optimizer_args(args.optimizer_args))
    updates_per_epoch = steps_per_epoch(len(train_set) // (args.train_batch_size * accelerator.num_processes),
                                        args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * updates_per_epoch
    num_epochs = math.ceil(args.max_train_steps / updates_per_epoch)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)
    model, optimizer, train_loader, eval_loader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, lr_scheduler)
    raw_model = accelerator.unwrap_model(model)
    ema = place_ema(create_ema(raw_model, args) if args.use_ema else None, accelerator.device, args.offload_ema)
    register_checkpoint_hooks(accelerator, {"mshnet": raw_model}, **ema_checkpoint_hooks(ema, "mshnet_ema"))
    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_project_name or "mshnet", config=tracker_config(args))

    position = resume_position(accelerator, args, updates_per_epoch)
    record = RunRecord(args, accelerator, "train_segmentation_tpu.py", fingerprint(train_set.names), position)
    best_miou = position.state.get("best_miou", -1.0)
    logger.info(f"{len(train_set)} training / {len(eval_set)} test samples, {updates_per_epoch} steps per epoch, "
                f"{args.max_train_steps} steps ({num_epochs} epochs), warm-up epochs 0..{args.warm_epoch}, "
                f"best mIoU so far {best_miou:.4f}")
    monitor = HealthMonitor()
    # On XLA no fused optimizer can take the guard's device-side verdict, so it would read the loss on
    # the host every step and stall the device: no guard there.
    guard = None if on_xla else NonFiniteGuard(args.max_nonfinite_steps)
    epoch = position.first_epoch
    progress = progress_bar(accelerator, args.max_train_steps, position.global_step)
    boundary = StepBoundary(
        accelerator, position.global_step, args.max_train_steps, Checkpointing(
            args.output_dir, args.checkpointing_steps, args.checkpoints_total_limit, record=record,
            training_state=lambda: {"epoch": epoch, "best_miou": best_miou, "head": HEADS[epoch > args.warm_epoch]}),
        progress, monitor, args.logging_steps, ema=ema, ema_parameters=raw_model.parameters,
        offload_ema=args.offload_ema, log_health=lambda step: log_health(
            args, accelerator, monitor, lr_scheduler, progress, step, epoch, epoch > args.warm_epoch, on_xla),
        guard=guard)
    for epoch in range(position.first_epoch, num_epochs):
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
        done = boundary.step >= args.max_train_steps
        if not boundary.stopped and (done or args.eval_epochs and (epoch + 1) % args.eval_epochs == 0):
            with evaluation_weights(optimizer):  # schedule-free: score the averaged weights
                best_miou = evaluate_epoch(args, accelerator, model, eval_loader, eval_set, ema, warm_flag, epoch,
                                           boundary.step, best_miou)
        if boundary.epoch_done():
            break

    if args.checkpointing_steps and not boundary.stopped:  # the last step's checkpoint (None: never)
        boundary.checkpoint()
    write_rank_checksums(accelerator, raw_model)  # debug hook for the multi-process tests (no-op unless set)
    boundary.finish(lambda: finish_training(args, accelerator, raw_model, ema, optimizer, epoch, boundary.step, on_xla))
    return None if boundary.stopped else best_miou


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
    run_script(cli)
