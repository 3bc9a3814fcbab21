#!/usr/bin/env python
"""Benchmark train_segmentation_tpu.py (MSHNet) and optionally MSHNet's original main.py on the same data.

    python benchmarks/bench_segmentation.py --crop_size 256 --batch_size 4 --warmup_steps 2 --steps 8 \
        --repeats 2 --threads 1 [--reference /tmp/reference-mshnet/MSHNet/main.py --reference_pythonpath DIR]

One command writes a synthetic IRSTD-1k-layout data set (`utils.segmentation.data`: 512 x 512 infrared
frames by default, as IRSTD-1k's) whose trainval.txt lists exactly one epoch of
`(warmup_steps + steps) x batch_size` frames (`--num_frames` distinct ones, repeated), so both
scripts run `--epochs 1` and evaluate only after the measured steps. Both get the reference's
command line (`--dataset-dir --batch-size --epochs --lr --warm-epoch --base-size --crop-size`,
which ours accepts too); `--phase full` (default) times the multi-scale heads + SLS loss that
every epoch after `--warm-epoch` trains. Ours is timed by its "Steps" bar, the reference (no
such bar) by every torch optimizer step (`--reference_event optimizer`). Printed per variant:
steps/s, images/s (the key number), step time (median, p90), peak memory, MSHNet's forward +
backward FLOPs per step (torch.utils.flop_counter: convolutions) and achieved TFLOP/s, MFU on
GPU, and the ratio to the reference. --results_dir writes JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from benchmarks.harness import (add_harness_args,  # noqa: E402  (after the sys.path line, for `python benchmarks/...`)
                                check_harness_args, flops_of, make_workdir, reference_variants, run_benchmark, variant)

OUR_SCRIPT = os.path.join(REPO_ROOT, "train_segmentation_tpu.py")
# --warm-epoch for each phase: epoch 0 > -1 trains all heads with the SLS loss; epoch 0 <= 5 only the main head.
WARM_EPOCH = {"full": -1, "warmup": 5}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crop_size", type=int, default=256, help="Training crop (both scripts' --crop-size).")
    parser.add_argument("--base_size", type=int, default=256, help="Rescale centre and evaluation size (--base-size).")
    parser.add_argument("--image_size", type=int, default=512, help="Side of the stored frames (IRSTD-1k: 512).")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--num_frames", type=int, default=64,
                        help="Distinct training frames written; trainval.txt repeats them to one epoch of the run.")
    parser.add_argument("--num_test", type=int, default=4, help="Test frames (evaluated once, after the measured steps).")
    parser.add_argument("--phase", default="full", choices=sorted(WARM_EPOCH),
                        help="full: multi-scale heads + SLS loss (every epoch after --warm-epoch); warmup: main head, soft IoU.")
    parser.add_argument("--lr", type=float, default=0.05)
    add_harness_args(parser, reference_event="optimizer",
                     ours_only_note="Ours only (the reference trains in fp32 and loads data in the training process).",
                     reference_help="MSHNet's original main.py (github.com/Lliu666/MSHNet) or any script with its flags.")
    args = parser.parse_args(argv)
    check_harness_args(parser, args)
    for flag in ("crop_size", "base_size"):
        if getattr(args, flag) % 16:
            parser.error(f"--{flag} {getattr(args, flag)} must be a multiple of 16 (MSHNet pools four times)")
    return args


def prepare_data(args, workdir: str) -> str:
    """An IRSTD-1k-layout folder whose trainval.txt lists exactly one epoch, (warmup_steps + steps) x batch_size
    names, cycling over `--num_frames` distinct frames (writing thousands of 512 px frames for a GPU run would
    take longer than the run; a repeated name is read and augmented like any other)."""
    from utils.segmentation.data import read_split, write_synthetic_irstd

    num_train = (args.warmup_steps + args.steps) * args.batch_size
    num_frames = min(args.num_frames, num_train)
    data_dir = os.path.join(workdir, f"irstd-{args.image_size}-{num_frames}x{num_train}-{args.num_test}-{args.seed}")
    if not os.path.isfile(os.path.join(data_dir, "test.txt")):
        write_synthetic_irstd(data_dir, num_frames, args.num_test, args.image_size, args.seed)
        frames = read_split(data_dir, "trainval")
        with open(os.path.join(data_dir, "trainval.txt"), "w", encoding="utf-8") as handle:
            handle.write("".join(frames[i % num_frames] + "\n" for i in range(num_train)))
    return data_dir


def flags_for(args, data_dir: str, entry: dict, output_dir: str) -> list[str]:
    """The reference's command line (identical for both), plus ours' output folder, seed, precision and workers."""
    flags = ["--dataset-dir", data_dir, "--batch-size", str(args.batch_size), "--epochs", "1", "--lr", str(args.lr),
             "--warm-epoch", str(WARM_EPOCH[args.phase]), "--base-size", str(args.base_size),
             "--crop-size", str(args.crop_size), "--mode", "train"]
    if entry["name"] != "reference":
        flags += ["--output_dir", output_dir, "--seed", str(args.seed), "--mixed_precision", args.mixed_precision,
                  "--dataloader_num_workers", str(args.dataloader_num_workers)]
    return flags


def count_flops(args) -> float | None:
    """MSHNet forward + backward FLOPs of one training batch, on the meta device (nothing is computed)."""
    import torch

    from utils.segmentation.mshnet import MSHNet

    def train_step():
        with torch.device("meta"):
            side, mask = MSHNet(input_channels=3)(torch.randn(args.batch_size, 3, args.crop_size, args.crop_size),
                                                  args.phase == "full")
            sum((output.float().mean() for output in side), mask.float().mean()).backward()

    return flops_of(train_step)


def main(argv=None) -> dict:
    args = parse_args(argv)
    workdir = make_workdir(args, "bench-segmentation-")
    data_dir = prepare_data(args, workdir)
    flops = count_flops(args)
    notes = [f"MSHNet crop={args.crop_size} base={args.base_size} frames={args.image_size}px phase={args.phase} "
             f"batch={args.batch_size} measured {args.steps} steps after {args.warmup_steps} warm-up, {args.repeats} run(s) each"]
    if flops:
        notes.append(f"FLOPs per step: MSHNet forward+backward {flops / 1e9:.2f} GFLOP ({flops / 1e9 / args.batch_size:.2f} per image)")
    variants = [variant("ours", OUR_SCRIPT, args.extra_args.split())] + reference_variants(args)
    return run_benchmark(
        args, argv, "bench_segmentation.py", f"mshnet-{args.crop_size}px-b{args.batch_size}", variants,
        lambda entry, output_dir: flags_for(args, data_dir, entry, output_dir), workdir, args.batch_size, flops,
        notes=notes, samples="images", fields={"mshnet_train_flops_per_step": flops})


if __name__ == "__main__":
    main()
