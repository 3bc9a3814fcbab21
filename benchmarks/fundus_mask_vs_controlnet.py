"""Guide 003's question with numbers: images from vessel/lesion masks, the mask DiT or Stable Diffusion + ControlNet?

On the synthetic fundus data (64 px, 240 training pairs; 16 held-out pairs drawn with another seed), at about the
same CPU time each, from nothing (no download):
  A. the mask DiT (train_mask_dit.py, `cpu_demo` preset, pixel space, mask-only conditioning), as docs/MASK_DIT.md's
     CPU demo;
  B. Stable Diffusion from scratch (train_text_to_image.py, the kanji demo's model size: VAE stage, then the UNet
     on the captions), then a ControlNet on it (train_controlnet.py, the masks one-hot in 2 channels).
Both are scored on the same held-out masks: PSNR and SSIM against the real image, mask IoU of the fixed segmenter
(utils/mask_dit/metrics.py; the real images' own IoU is the ceiling), KID against the held-out real images on
16x16 colour thumbnails (no Inception weights offline: this is a pixel-statistics KID, real training images vs
held-out ones give its floor), and one grid (mask | real | A | B).

    python benchmarks/fundus_mask_vs_controlnet.py --output_dir outputs/fundus_compare     # ~21 min on 2 cores
    python benchmarks/fundus_mask_vs_controlnet.py --output_dir /tmp/quick --quick          # plumbing, ~2 min

Prints one JSON line per approach and writes results.json and grid.png in --output_dir.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

# Step counts for about the same CPU time per approach, ~9.5 min on 2 idle cores (measured: mask DiT 400 steps
# 2.0 min; SD: VAE 300 steps 3.1 min + UNet 1200 steps 3.7 min, ControlNet 600 steps 2.4 min).
BUDGETS = {"full": dict(mask_dit=2000, vae=300, unet=1200, controlnet=600, batch=16, inference_steps=20),
           "quick": dict(mask_dit=4, vae=4, unet=4, controlnet=4, batch=4, inference_steps=2)}
NUM_TRAIN, NUM_HELD_OUT, RESOLUTION = 240, 16, 64


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--quick", action="store_true", help="A few steps of everything (the test's plumbing run).")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def write_data(root: str, seed: int) -> tuple[str, str]:
    """The training and held-out fundus folders (images/, masks/, metadata.jsonl) and a CSV of each for the SD
    trainers (image, mask, text; paths relative to the CSV)."""
    from utils.mask_dit.data import write_synthetic_fundus_dataset

    folders = []
    for name, count, data_seed in (("train", NUM_TRAIN, seed), ("held_out", NUM_HELD_OUT, seed + 1)):
        folder = os.path.join(root, name)
        if not os.path.isfile(os.path.join(folder, "pairs.csv")):
            write_synthetic_fundus_dataset(folder, count, RESOLUTION, data_seed)
            rows = [json.loads(line) for line in open(os.path.join(folder, "metadata.jsonl"), encoding="utf-8")]
            with open(os.path.join(folder, "pairs.csv"), "w", encoding="utf-8") as handle:
                handle.write("image,mask,text\n")
                for row in rows:
                    handle.write(f"images/{row['file_name']},masks/{row['file_name']},\"{row['text']}\"\n")
        folders.append(folder)
    return folders[0], folders[1]


def run(script: str, args: list) -> float:
    """`python script args` with every core for it; returns the wall seconds."""
    from utils.cpu_threads import available_cores

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRAIN_CPU_THREADS=str(available_cores()))
    start = time.perf_counter()
    subprocess.run([sys.executable, os.path.join(REPO_ROOT, script), *map(str, args)], check=True, env=env,
                   cwd=REPO_ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def train_mask_dit(train_dir: str, out: str, budget: dict, seed: int) -> float:
    return run("train_mask_dit.py", [
        "--train_data_dir", train_dir, "--model_size", "cpu_demo", "--resolution", RESOLUTION, "--mask_channels", 2,
        "--output_dir", out, "--train_batch_size", budget["batch"], "--max_train_steps", budget["mask_dit"],
        "--learning_rate", "1e-3", "--lr_warmup_steps", min(50, budget["mask_dit"] // 4), "--min_lr", "1e-5",
        "--random_flip", "--validation_epochs", 0, "--report_to", "none", "--seed", seed])


def train_sd_and_controlnet(train_dir: str, out: str, budget: dict, seed: int) -> tuple[float, float]:
    common = ["--train_data_file", os.path.join(train_dir, "pairs.csv"), "--image_column", "image",
              "--resolution", RESOLUTION, "--train_batch_size", budget["batch"], "--report_to", "none",
              "--seed", seed, "--checkpointing_steps", 100000]
    base = run("train_text_to_image.py", common + [
        "--model_preset", "kanji", "--center_crop", "--random_flip", "--train_vae", "--vae_train_steps",
        budget["vae"], "--vae_learning_rate", "2e-3", "--max_train_steps", budget["unet"], "--learning_rate", "1e-3",
        "--lr_scheduler", "cosine", "--lr_warmup_steps", min(20, budget["unet"] // 4), "--adam_weight_decay", "0.0",
        "--output_dir", os.path.join(out, "sd")])
    controlnet = run("train_controlnet.py", common + [
        "--pretrained_model_name_or_path", os.path.join(out, "sd"), "--conditioning_image_column", "mask",
        "--conditioning_num_classes", 2, "--random_flip", "--max_train_steps", budget["controlnet"],
        "--learning_rate", "1e-3", "--lr_warmup_steps", min(20, budget["controlnet"] // 4),
        "--output_dir", os.path.join(out, "controlnet")])
    return base, controlnet


def held_out(folder: str):
    """Real images [N, 3, R, R] in [0, 1], one-hot masks [N, 2, R, R], captions, mask paths."""
    from PIL import Image

    from utils.mask_dit.data import mask_to_channels

    rows = [json.loads(line) for line in open(os.path.join(folder, "metadata.jsonl"), encoding="utf-8")]
    images = torch.stack([torch.from_numpy(np.asarray(Image.open(os.path.join(folder, "images", r["file_name"]))
                                                      .convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
                          for r in rows])
    paths = [os.path.join(folder, "masks", r["file_name"]) for r in rows]
    masks = torch.stack([torch.from_numpy(mask_to_channels(np.asarray(Image.open(p)), 2, p)) for p in paths])
    return images, masks, [r["text"] for r in rows], paths


@torch.no_grad()
def sample_mask_dit(model_dir: str, masks: torch.Tensor, steps: int, seed: int) -> torch.Tensor:
    from utils.mask_dit.pipeline import generate_from_mask, load_mask_dit_pipeline

    pipeline = load_mask_dit_pipeline(model_dir, device="cpu", dtype=torch.float32)
    # mask guidance 2: docs/MASK_DIT.md's measured best for mask IoU on this data
    return generate_from_mask(pipeline, masks, None, steps=steps, mask_guidance_scale=2.0, seed=seed).float()


@torch.no_grad()
def sample_controlnet(out: str, captions: list[str], mask_paths: list[str], steps: int, seed: int) -> torch.Tensor:
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    from utils.sd.controlnet import ConditioningImages
    from utils.sd.schedulers import make_scheduler

    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        os.path.join(out, "sd"), controlnet=ControlNetModel.from_pretrained(os.path.join(out, "controlnet")),
        safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = make_scheduler("dpm++", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    masks = torch.stack([ConditioningImages("mask", 2).at_size(p, RESOLUTION, RESOLUTION) for p in mask_paths])
    images = pipe(captions, image=masks, num_inference_steps=steps, height=RESOLUTION, width=RESOLUTION,
                  guidance_scale=7.0, generator=torch.Generator().manual_seed(seed), output_type="pt").images
    return images.float().clamp(0, 1)


class Thumbnails(torch.nn.Module):
    """uint8 images [N, 3, H, W] -> their 16x16 colour thumbnails in [0, 1], flattened: [N, 768]."""

    def forward(self, images):
        return torch.nn.functional.adaptive_avg_pool2d(images.float() / 255, 16).flatten(1)


def thumbnail_kid(fake: torch.Tensor, real: torch.Tensor) -> float:
    """KID (torchmetrics) on 16x16 colour thumbnails (768 numbers an image): a pixel-statistics KID. Every subset
    is the whole (small) sample, so the value is the unbiased MMD^2 of the two sets, without random subsets."""
    from torchmetrics.image.kid import KernelInceptionDistance

    kid = KernelInceptionDistance(feature=Thumbnails(), subset_size=min(len(fake), len(real)), subsets=2)
    kid.update((real * 255).round().to(torch.uint8), real=True)
    kid.update((fake * 255).round().to(torch.uint8), real=False)
    return float(kid.compute()[0])


def scores(samples: torch.Tensor, real: torch.Tensor, masks: torch.Tensor) -> dict:
    from utils.mask_dit.metrics import mask_iou, segment_structures, ssim
    from utils.metrics import psnr

    return {"psnr": float(psnr(samples, real).mean()), "ssim": float(ssim(samples, real).mean()),
            "mask_iou": float(mask_iou(segment_structures(samples), masks).mean()),
            "kid_thumbnails": thumbnail_kid(samples, real)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    budget = BUDGETS["quick" if args.quick else "full"]
    os.makedirs(args.output_dir, exist_ok=True)
    train_dir, held_out_dir = write_data(os.path.join(args.output_dir, "data"), args.seed)
    real, masks, captions, mask_paths = held_out(held_out_dir)
    train_real = held_out(train_dir)[0][:NUM_HELD_OUT]
    results = {"budget": budget, "held_out_pairs": len(real),
               "ceiling": {"mask_iou_real_images": scores(real, real, masks)["mask_iou"],
                           "kid_thumbnails_real_train_vs_held_out": thumbnail_kid(train_real, real)}}

    mask_dit_dir = os.path.join(args.output_dir, "mask_dit")
    minutes = train_mask_dit(train_dir, mask_dit_dir, budget, args.seed) / 60
    mask_dit_samples = sample_mask_dit(mask_dit_dir, masks, budget["inference_steps"], args.seed)
    results["mask_dit"] = {"train_minutes": round(minutes, 2), **scores(mask_dit_samples, real, masks)}
    print(json.dumps({"mask_dit": results["mask_dit"]}), flush=True)

    base, controlnet = train_sd_and_controlnet(train_dir, args.output_dir, budget, args.seed)
    controlnet_samples = sample_controlnet(args.output_dir, captions, mask_paths, budget["inference_steps"], args.seed)
    results["sd_controlnet"] = {"train_minutes": round((base + controlnet) / 60, 2),
                                "sd_minutes": round(base / 60, 2), "controlnet_minutes": round(controlnet / 60, 2),
                                **scores(controlnet_samples, real, masks)}
    print(json.dumps({"sd_controlnet": results["sd_controlnet"]}), flush=True)

    from utils.images import make_grid, tensor_to_pil

    mask_rgb = torch.stack([masks[:, 0], masks[:, 0] + masks[:, 1], masks[:, 1] * 0], 1).clamp(0, 1)
    rows = [tensor_to_pil(images[:8] * 2 - 1) for images in (mask_rgb, real, mask_dit_samples, controlnet_samples)]
    tiles = [tile for group in zip(*rows) for tile in group]
    make_grid(tiles, columns=4).save(os.path.join(args.output_dir, "grid.png"))
    with open(os.path.join(args.output_dir, "results.json"), "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=1)
    print(json.dumps({"ceiling": results["ceiling"]}))
    return results


if __name__ == "__main__":
    main()
