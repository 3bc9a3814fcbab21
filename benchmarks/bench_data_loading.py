#!/usr/bin/env python
"""CPU cost of one training sample of train_segmentation_tpu.py, with and without --cache_images.

    python benchmarks/bench_data_loading.py --image_size 512 --crop_size 256 --num_frames 40 --passes 3

Writes synthetic IRSTD-1k-layout frames (`utils.segmentation.data`), then times `IRSTDDataset[i]` in
this process (one thread) over `--passes` epochs: decoding from disk every time, and from the
decoded frames kept in memory (`--cache_images`). Prints ms per sample for both, the samples/s
one loader core sustains, and how many loader cores a GPU step rate of `--target_images_per_sec`
would need. The same tensors come out either way (tests/test_train_segmentation.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image_size", type=int, default=512, help="Side of the synthetic frames (IRSTD-1k: 512).")
    parser.add_argument("--crop_size", type=int, default=256)
    parser.add_argument("--base_size", type=int, default=256)
    parser.add_argument("--num_frames", type=int, default=40)
    parser.add_argument("--passes", type=int, default=3, help="Epochs over the frames per variant.")
    parser.add_argument("--target_images_per_sec", type=float, default=1500.0)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def time_per_sample(dataset, passes: int) -> float:
    dataset[0]  # warm-up (imports, first decode)
    started = time.perf_counter()
    for epoch in range(passes):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            dataset[index]
    return (time.perf_counter() - started) / (passes * len(dataset))


def main(argv=None) -> dict:
    import torch

    from utils.segmentation.data import IRSTDDataset, write_synthetic_irstd

    args = parse_args(argv)
    torch.set_num_threads(1)
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-data-")
    root = os.path.join(workdir, f"irstd-{args.image_size}-{args.num_frames}-{args.seed}")
    if not os.path.isfile(os.path.join(root, "trainval.txt")):
        write_synthetic_irstd(root, args.num_frames, 1, args.image_size, args.seed)
    results = {}
    for name, cached in (("from disk", False), ("--cache_images", True)):
        started = time.perf_counter()
        dataset = IRSTDDataset(root, "trainval", train=True, base_size=args.base_size, crop_size=args.crop_size,
                               augment_seed=args.seed, cache_in_memory=cached)
        setup = time.perf_counter() - started
        seconds = time_per_sample(dataset, args.passes)
        results[name] = {"ms_per_sample": 1000 * seconds, "samples_per_sec_per_core": 1 / seconds,
                         "cores_for_target": args.target_images_per_sec * seconds, "setup_s": setup}
    print(f"{args.num_frames} frames of {args.image_size} px, {args.crop_size} px crops, {args.passes} passes, one thread")
    print("| loading | ms / sample | samples/s per core | cores for "
          f"{args.target_images_per_sec:.0f} images/s | set-up (s) |\n|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['ms_per_sample']:.2f} | {r['samples_per_sec_per_core']:.0f} | "
              f"{r['cores_for_target']:.1f} | {r['setup_s']:.2f} |")
    speedup = results["from disk"]["ms_per_sample"] / results["--cache_images"]["ms_per_sample"]
    print(f"--cache_images: {speedup:.2f}x less loader CPU per sample")
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
