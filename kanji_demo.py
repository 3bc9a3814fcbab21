#!/usr/bin/env python
"""The embedded default job: "fake kanji" from English meanings, trained from scratch, offline.

    python kanji_demo.py --output_dir demo_output            # ~10 min on a 2-core CPU
    python kanji_demo.py --output_dir kanji_hq --mode quality  # the longer GPU run

1. renders KANJIDIC2 kanji with Debian's IPA fonts into an imagefolder (utils/sd/kanji_dataset.py);
2. trains VAE, UNet and text encoder from scratch with `accelerate launch train_text_to_image.py`;
3. measures on the held-out characters: VAE reconstruction PSNR, diffusion loss at fixed
   timesteps against the untrained model, and glyph-likeness of samples for unseen prompts;
4. writes the pipeline, a sample grid, a training-curve PNG and summary.json, and prints a summary.
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

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
UNSEEN_PROMPTS = ["fire mountain", "electric fish", "computer", "internet", "water dragon", "sword of light",
                  "kanji meaning water, river", "kanji meaning tree, wood"]
EVAL_TIMESTEPS = (100, 300, 500, 700, 900)

# Hyperparameters per mode. The demo's learning rates are higher than guide 001's fine-tuning values
# (VAE 1e-4, UNet 1e-5): from scratch in a few hundred steps those barely move the weights.
MODES = {
    "demo": dict(preset="small", resolution=64, subset="joyo", fonts=["gothic"], batch=16, vae_steps=160, vae_lr=2e-3,
                 unet_steps=260, unet_lr=1e-3, warmup=20, checkpointing_steps=100),
    "quality": dict(preset="small", resolution=64, subset="all", fonts=["gothic", "mincho", "seto"], batch=64,
                    vae_steps=4000, vae_lr=1e-3, unet_steps=30000, unet_lr=2e-4, warmup=500, checkpointing_steps=2000),
    "smoke": dict(preset="tiny", resolution=32, subset="frequent:48", fonts=["gothic"], batch=8, vae_steps=4,
                  vae_lr=1e-3, unet_steps=4, unet_lr=1e-3, warmup=0, checkpointing_steps=4),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="demo_output")
    parser.add_argument("--mode", default="demo", choices=sorted(MODES),
                        help="demo: ~10 min CPU; quality: GPU hours; smoke: tests")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_inference_steps", type=int, default=25, help="guide 001: 25 fast, 75 quality")
    parser.add_argument("--guidance_scale", type=float, default=9.0, help="guide 001: 7-12 for the kanji model")
    parser.add_argument("--skip_training", action="store_true", help="Only evaluate an existing --output_dir/model")
    return parser.parse_args(argv)


def build_data(args, mode) -> str:
    from utils.sd.kanji_dataset import build_kanji_dataset

    data_dir = os.path.join(args.output_dir, "data")
    if not os.path.isfile(os.path.join(data_dir, "dataset_info.json")):
        summary = build_kanji_dataset(data_dir, resolution=mode["resolution"], subset=mode["subset"],
                                      fonts=tuple(mode["fonts"]), seed=args.seed, overwrite=True)
        print(f"[data] {summary['num_train_images']} training / {summary['num_validation_images']} held-out glyph "
              f"images in {data_dir}")
    return data_dir


def train(args, mode, data_dir) -> str:
    model_dir = os.path.join(args.output_dir, "model")
    command = [sys.executable, "-m", "accelerate.commands.launch", os.path.join(REPO_ROOT, "train_text_to_image.py"),
               "--model_preset", mode["preset"], "--train_data_dir", data_dir, "--resolution", str(mode["resolution"]),
               "--center_crop", "--train_vae", "--vae_train_steps", str(mode["vae_steps"]),
               "--vae_learning_rate", str(mode["vae_lr"]),
               "--train_text_encoder", "--caption_dropout_prob", "0.1", "--train_batch_size", str(mode["batch"]),
               "--max_train_steps", str(mode["unet_steps"]), "--learning_rate", str(mode["unet_lr"]),
               "--lr_scheduler", "cosine", "--lr_warmup_steps", str(mode["warmup"]), "--adam_weight_decay", "0.0",
               "--checkpointing_steps", str(mode["checkpointing_steps"]), "--checkpoints_total_limit", "2",
               "--resume_from_checkpoint", "latest", "--logging_steps", "10" if mode["unet_steps"] > 20 else "1",
               "--seed", str(args.seed), "--output_dir", model_dir, "--report_to", "tensorboard",
               "--validation_prompts", *UNSEEN_PROMPTS[:4], "--validation_steps", str(mode["unet_steps"] * 2),
               "--validation_guidance_scale", str(args.guidance_scale)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    print("[train] " + " ".join(command[2:]))
    subprocess.run(command, check=True, env=env, cwd=REPO_ROOT)
    return model_dir


def load_split(data_dir: str, split: str, resolution: int, limit: int | None = None):
    """Images [N, 3, R, R] in [-1, 1] and captions of one split of the kanji imagefolder."""
    from utils.images import load_image, pil_to_tensor

    rows = [json.loads(line) for line in open(os.path.join(data_dir, split, "metadata.jsonl"), encoding="utf-8")]
    rows = rows[:limit] if limit else rows
    size = (resolution, resolution)
    images = torch.stack([pil_to_tensor(load_image(os.path.join(data_dir, split, r["file_name"])).resize(size))
                          for r in rows])
    return images, [r["text"] for r in rows]


@torch.no_grad()
def vae_psnr(vae, images) -> float:
    from utils.metrics import psnr

    values = [psnr(vae.decode(vae.encode(chunk).latent_dist.mode()).sample, chunk, value_range=(-1.0, 1.0))
              for chunk in images.split(32)]
    return float(torch.cat(values).mean())


@torch.no_grad()
def diffusion_loss_at(unet, text_encoder, tokenizer, vae, scheduler, images, captions, seed) -> float:
    """Mean denoising MSE over EVAL_TIMESTEPS with fixed noise: comparable across models."""
    from utils.latents import encode_latents

    generator = torch.Generator().manual_seed(seed)
    latents = encode_latents(vae, images, sample=False)
    ids = tokenizer(
        captions, max_length=tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt"
    ).input_ids
    hidden = text_encoder(ids)[0]
    losses = []
    for t in EVAL_TIMESTEPS:
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.full((latents.shape[0],), t, dtype=torch.long)
        target = (
            noise
            if scheduler.config.prediction_type == "epsilon"
            else scheduler.get_velocity(latents, noise, timesteps)
        )
        prediction = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, hidden).sample
        losses.append(torch.mean((prediction - target) ** 2).item())
    return float(np.mean(losses))


def glyph_metrics(samples: np.ndarray, train_glyphs: np.ndarray, real_coverage: dict, heldout: np.ndarray) -> dict:
    """Glyph-likeness of generated images [N, H, W] in [0, 255] (grayscale).

    - ink_coverage: fraction of dark (<128) pixels, and whether it lies within real kanji's range;
    - binary_fraction: pixels that are near-black (<64) or near-white (>192); real glyphs ~1.0;
    - nearest_train_distance: mean |a-b| (0..1) to the closest training glyph, against the same
      distance for held-out real glyphs: a sample much closer than real unseen glyphs are would be
      a memorised copy.
    """
    def nearest(images):
        a = (images.reshape(len(images), -1) < 128).astype(np.float32)
        b = (train_glyphs.reshape(len(train_glyphs), -1) < 128).astype(np.float32)
        distances = (
            (a[:, None, :] != b[None, :, :]).mean(-1)
            if len(a) * len(b) < 4e6
            else np.stack([(x != b).mean(-1) for x in a])
        )
        return distances.min(axis=1)

    coverage = (samples < 128).mean(axis=(1, 2))
    return {
        "ink_coverage_mean": float(coverage.mean()),
        "ink_coverage_in_real_range": float(((coverage >= real_coverage["min"])
                                             & (coverage <= real_coverage["max"])).mean()),
        "real_ink_coverage_range": [real_coverage["min"], real_coverage["max"]],
        "binary_fraction": float(((samples < 64) | (samples > 192)).mean()),
        "heldout_real_binary_fraction": float(((heldout < 64) | (heldout > 192)).mean()),
        "nearest_train_distance": float(nearest(samples).mean()),
        "heldout_real_nearest_train_distance": float(nearest(heldout).mean()),
    }


def plot_curves(model_dir: str, path: str) -> dict:
    """Loss-vs-step PNG from the run's TensorBoard events; returns the first/last values per curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves = {}
    for directory, _, files in os.walk(os.path.join(model_dir, "logs")):
        if any(f.startswith("events.") for f in files):
            accumulator = EventAccumulator(directory)
            accumulator.Reload()
            for tag in accumulator.Tags()["scalars"]:
                if tag in ("train_loss", "vae/reconstruction_loss", "vae/kl"):
                    curves.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    figure, axes = plt.subplots(1, max(1, len(curves)), figsize=(5 * max(1, len(curves)), 3.5))
    axes = np.atleast_1d(axes)
    for axis, (tag, points) in zip(axes, sorted(curves.items())):
        points.sort()
        axis.plot([p[0] for p in points], [p[1] for p in points])
        axis.set_title(tag)
        axis.set_xlabel("step")
        axis.set_yscale("log")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return {tag: {"first": sorted(p)[0][1], "last": sorted(p)[-1][1]} for tag, p in curves.items()}


def evaluate(args, mode, data_dir, model_dir) -> dict:
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from utils.images import make_grid
    from utils.sd.builder import build_components
    from utils.sd.kanji_dataset import glyph_stats

    resolution = mode["resolution"]
    # Small-batch inference gains nothing from more threads, and on a busy machine OpenMP threads that
    # spin against each other made sampling ~30x slower (measured: 41 s vs 1.3 s for 5 steps).
    torch.set_num_threads(1)
    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    pipe.set_progress_bar_config(disable=True)
    heldout, heldout_captions = load_split(data_dir, "validation", resolution, limit=64)
    train_images, _ = load_split(data_dir, "train", resolution, limit=2000)

    metrics = {"vae_psnr_db": vae_psnr(pipe.vae, heldout)}
    run_args = json.load(open(os.path.join(model_dir, "training_args.json"), encoding="utf-8"))
    initial = build_components(
        run_args["model_preset"], resolution=resolution, seed=run_args["seed"] or 0, tokenizer=pipe.tokenizer
    )
    from diffusers import DDPMScheduler

    ddpm = DDPMScheduler.from_config(pipe.scheduler.config)
    metrics["diffusion_loss_initial"] = diffusion_loss_at(initial["unet"], initial["text_encoder"], pipe.tokenizer,
                                                          pipe.vae, ddpm, heldout, heldout_captions, args.seed)
    metrics["diffusion_loss_trained"] = diffusion_loss_at(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.vae, ddpm,
                                                          heldout, heldout_captions, args.seed)

    images = []
    for index, prompt in enumerate(UNSEEN_PROMPTS):
        generator = torch.Generator().manual_seed(args.seed + index)
        images.append(pipe(prompt, num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                           height=resolution, width=resolution, generator=generator).images[0])
    grid_path = os.path.join(args.output_dir, "samples_unseen_prompts.png")
    make_grid([im.resize((128, 128)) for im in images], columns=4).save(grid_path)
    samples = np.stack([np.asarray(im.convert("L")) for im in images]).astype(np.float32)
    to_gray = lambda t: ((t.mean(1) + 1) * 127.5).numpy()  # noqa: E731
    metrics.update(
        glyph_metrics(samples, to_gray(train_images), glyph_stats(data_dir), to_gray(heldout[: len(images)]))
    )
    metrics["curves"] = plot_curves(model_dir, os.path.join(args.output_dir, "training_curves.png"))
    metrics["paths"] = {"pipeline": model_dir, "samples": grid_path,
                        "curves": os.path.join(args.output_dir, "training_curves.png"), "dataset": data_dir}
    metrics["prompts"] = UNSEEN_PROMPTS
    return metrics


def print_summary(metrics: dict, seconds: float) -> None:
    ok = lambda flag: "ok" if flag else "BELOW TARGET"  # noqa: E731
    fell = metrics["diffusion_loss_trained"] < 0.8 * metrics["diffusion_loss_initial"]
    lines = [
        "=" * 72,
        f" Kanji demo finished in {seconds / 60:.1f} min",
        f"  pipeline          {metrics['paths']['pipeline']}",
        f"  samples           {metrics['paths']['samples']}",
        f"  training curves   {metrics['paths']['curves']}",
        f"  VAE PSNR (held-out)            {metrics['vae_psnr_db']:.2f} dB  (target >= 22: "
        f"{ok(metrics['vae_psnr_db'] >= 22)})",
        f"  diffusion loss (held-out, fixed t)  {metrics['diffusion_loss_initial']:.4f} -> "
        f"{metrics['diffusion_loss_trained']:.4f}"
        f"  ({ok(fell)})",
        f"  samples' ink coverage          {metrics['ink_coverage_mean']:.3f} (real kanji "
        f"{metrics['real_ink_coverage_range'][0]:.3f}"
        f"-{metrics['real_ink_coverage_range'][1]:.3f}; "
        f"{100 * metrics['ink_coverage_in_real_range']:.0f}% of samples in range)",
        f"  near-black/white pixels        {100 * metrics['binary_fraction']:.1f}% (real glyphs "
        f"{100 * metrics['heldout_real_binary_fraction']:.1f}%)",
        f"  distance to nearest training glyph  {metrics['nearest_train_distance']:.3f} "
        f"(held-out real glyphs: {metrics['heldout_real_nearest_train_distance']:.3f})",
        "  try: python generate.py --model " + metrics["paths"]["pipeline"] + ' --prompt "fire mountain" --seed 0',
        "=" * 72,
    ]
    print("\n".join(lines))


def main(argv=None) -> dict:
    args = parse_args(argv)
    mode = MODES[args.mode]
    start = time.time()
    os.makedirs(args.output_dir, exist_ok=True)
    data_dir = build_data(args, mode)
    model_dir = os.path.join(args.output_dir, "model") if args.skip_training else train(args, mode, data_dir)
    metrics = evaluate(args, mode, data_dir, model_dir)
    metrics["seconds"] = time.time() - start
    metrics["mode"] = args.mode
    with open(os.path.join(args.output_dir, "summary.json"), "w", encoding="utf-8") as handle:
        json.dump(metrics, handle, indent=2)
    print_summary(metrics, metrics["seconds"])
    return metrics


if __name__ == "__main__":
    main()
