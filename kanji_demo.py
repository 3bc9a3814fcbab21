#!/usr/bin/env python
"""The embedded default job: "fake kanji" from English meanings, trained from scratch, offline.

    python kanji_demo.py --output_dir demo_output            # ~4 min on a 2-core CPU (README)
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
# How the prompt reaches the UNet (issue 17; README "What made the prompt matter" has the measurements): the
# kanji preset's text encoder (16 positions, token embeddings at std 1) stays frozen at its random init, a
# fixed, distinct code per caption; v-prediction makes the loss at high noise depend on which glyph is
# drawn (with epsilon the UNet learned to ignore the caption); caption dropout 10% for guidance; the frozen
# encoder's outputs and the VAE latents are cached, so a step costs only the UNet.
CONDITIONING = ["--prediction_type", "v_prediction", "--caption_dropout_prob", "0.1", "--cache_latents",
                "--cache_text_embeddings"]
MODES = {
    "demo": dict(preset="kanji", resolution=64, subset="frequent:120", fonts=["gothic"], batch=16, vae_steps=160,
                 vae_lr=2e-3, unet_steps=1200, unet_lr=1e-3, warmup=20, checkpointing_steps=300, seen_prompts=None,
                 extra=CONDITIONING),
    "quality": dict(preset="kanji", resolution=64, subset="all", fonts=["gothic", "mincho", "seto"], batch=64,
                    vae_steps=4000, vae_lr=1e-3, unet_steps=30000, unet_lr=2e-4, warmup=500, checkpointing_steps=2000,
                    seen_prompts=500, extra=CONDITIONING),
    # The first look at how the model scales: more characters and fonts, sized by estimate for ~3 minutes on one
    # H200 (benchmarks/gpu_suite.py runs it; the first device run measures it).
    "gpu": dict(preset="kanji", resolution=64, subset="frequent:1000", fonts=["gothic", "mincho"], batch=64,
                vae_steps=800, vae_lr=1e-3, unet_steps=4000, unet_lr=5e-4, warmup=100, checkpointing_steps=1000,
                seen_prompts=500, extra=CONDITIONING),
    "smoke": dict(preset="tiny", resolution=32, subset="frequent:48", fonts=["gothic"], batch=8, vae_steps=4,
                  vae_lr=1e-3, unet_steps=4, unet_lr=1e-3, warmup=0, checkpointing_steps=4, seen_prompts=8,
                  extra=CONDITIONING),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="demo_output")
    parser.add_argument("--mode", default="demo", choices=sorted(MODES),
                        help="demo: ~4 min on a 2-core CPU; gpu: ~3 min on one H200 (more characters); quality: GPU "
                             "hours; smoke: tests")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_inference_steps", type=int, default=25, help="guide 001: 25 fast, 75 quality")
    parser.add_argument("--guidance_scale", type=float, default=7.0,
                        help="guide 001: 7-12 for the kanji model; 7 measured crispest (README table)")
    parser.add_argument("--skip_training", action="store_true", help="Only evaluate an existing --output_dir/model")
    parser.add_argument("--mixed_precision", default="no", choices=["no", "bf16", "fp16"],
                        help="Training precision (docs/PERFORMANCE.md: bf16 on this CPU measured slower, so fp32; "
                             "fp16 needs a GPU)")
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
    from utils.cpu_threads import available_cores

    # Every core for the one training process: `accelerate launch` without a config would give it one thread.
    launch = [] if torch.cuda.is_available() else ["--num_cpu_threads_per_process", str(available_cores())]
    command = [sys.executable, "-m", "accelerate.commands.launch", *launch,
               os.path.join(REPO_ROOT, "train_text_to_image.py"),
               "--model_preset", mode["preset"], "--train_data_dir", data_dir, "--resolution", str(mode["resolution"]),
               "--center_crop", "--train_vae", "--vae_train_steps", str(mode["vae_steps"]),
               "--vae_learning_rate", str(mode["vae_lr"]),
               *mode["extra"], "--train_batch_size", str(mode["batch"]),
               "--max_train_steps", str(mode["unet_steps"]), "--learning_rate", str(mode["unet_lr"]),
               "--lr_scheduler", "cosine", "--lr_warmup_steps", str(mode["warmup"]), "--adam_weight_decay", "0.0",
               "--checkpointing_steps", str(mode["checkpointing_steps"]), "--checkpoints_total_limit", "2",
               "--resume_from_checkpoint", "latest", "--logging_steps", "10" if mode["unet_steps"] > 20 else "1",
               "--seed", str(args.seed), "--output_dir", model_dir, "--report_to", "tensorboard",
               "--validation_prompts", *UNSEEN_PROMPTS[:4], "--validation_steps", str(mode["unet_steps"] * 2),
               "--validation_guidance_scale", str(args.guidance_scale), "--mixed_precision", args.mixed_precision]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    print("[train] " + " ".join(command[2:]))
    subprocess.run(command, check=True, env=env, cwd=REPO_ROOT)
    return model_dir


def load_split(data_dir: str, split: str, resolution: int, limit: int | None = None, one_per_character=False):
    """Images [N, 3, R, R] in [-1, 1] and captions of one split of the kanji imagefolder (with
    `one_per_character`, each character's first font only)."""
    from utils.images import load_image, pil_to_tensor

    rows = [json.loads(line) for line in open(os.path.join(data_dir, split, "metadata.jsonl"), encoding="utf-8")]
    if one_per_character:
        first = {}
        for row in rows:
            first.setdefault(row["literal"], row)
        rows = list(first.values())
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


def binarise(images: np.ndarray) -> np.ndarray:
    """Grayscale glyphs [N, H, W] in [0, 255] -> ink masks [N, H*W] (dark pixels, < 128)."""
    return (images.reshape(len(images), -1) < 128).astype(np.float32)


def classify_by_nearest_glyph(samples: np.ndarray, glyphs: np.ndarray) -> np.ndarray:
    """For each sample [H, W], the indices of the training glyphs ordered from nearest to farthest, by the
    fraction of pixels whose ink differs (Hamming distance of the binarised 64 px images)."""
    a, b = binarise(samples), binarise(glyphs)
    distances = a @ (1 - b).T + (1 - a) @ b.T  # differing pixels: ink in one, not in the other
    return np.argsort(distances, axis=1, kind="stable")


def seen_prompt_accuracy(samples: np.ndarray, glyphs: np.ndarray) -> dict:
    """Sample i was generated from training character i's own caption: top-1/top-5 of its nearest glyphs."""
    order = classify_by_nearest_glyph(samples, glyphs)
    truth = np.arange(len(samples))[:, None]
    return {"seen_prompt_top1": float((order[:, :1] == truth).any(1).mean()),
            "seen_prompt_top5": float((order[:, :5] == truth).any(1).mean()),
            "num_seen_prompts": int(len(samples)), "chance_top1": 1.0 / len(glyphs)}


class GlyphNet(torch.nn.Module):
    """The demo's own glyph classifier (no download): three strided convolutions, average pooled to 64 features,
    a linear layer over the training characters. Its 64 features are the FID/KID features (`forward` takes what
    torchmetrics gives: uint8 images [N, 3, H, W])."""

    num_features = 64

    def __init__(self, num_classes: int):
        super().__init__()
        self.trunk = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, stride=2, padding=1), torch.nn.SiLU(),
            torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.SiLU(),
            torch.nn.Conv2d(32, 64, 3, stride=2, padding=1), torch.nn.SiLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.head = torch.nn.Linear(64, num_classes)
        self.register_buffer("feature_mean", torch.zeros(64))
        self.register_buffer("feature_std", torch.ones(64))

    def features(self, gray: torch.Tensor) -> torch.Tensor:  # [N, 1, H, W] in [0, 1]
        return self.trunk(gray)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Standardised features (the training glyphs' mean 0, std 1 per feature: KID's cubic kernel then sees
        values of order 1, as with Inception's)."""
        return (self.features(images.float().mean(1, keepdim=True) / 255) - self.feature_mean) / self.feature_std

    @torch.no_grad()
    def standardise_on(self, images: torch.Tensor) -> "GlyphNet":
        features = self.features(images.float().mean(1, keepdim=True) / 255)
        self.feature_mean.copy_(features.mean(0))
        self.feature_std.copy_(features.std(0).clamp_min(1e-6))
        return self


def train_glyph_classifier(glyphs: torch.Tensor, seed: int, steps: int = 300) -> GlyphNet:
    """GlyphNet told the training characters apart (one class each; glyphs [N, 1, H, W] in [0, 1]) on randomly
    shifted and scaled copies, Adam, `steps` batches of 64."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = GlyphNet(len(glyphs))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        index = torch.randint(0, len(glyphs), (64,), generator=generator)
        scale = 0.85 + 0.3 * torch.rand(64, generator=generator)
        shift = (torch.rand(64, 2, generator=generator) - 0.5) * 0.2
        theta = torch.zeros(64, 2, 3)
        theta[:, 0, 0], theta[:, 1, 1], theta[:, :, 2] = scale, scale, shift
        grid = torch.nn.functional.affine_grid(theta, (64, 1, *glyphs.shape[-2:]), align_corners=False)
        batch = torch.nn.functional.grid_sample(glyphs[index] - 1, grid, align_corners=False) + 1  # (white fill)
        loss = torch.nn.functional.cross_entropy(model.head(model.features(batch)), index)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def distribution_metrics(classifier: GlyphNet, samples: torch.Tensor, heldout: torch.Tensor,
                         train: torch.Tensor) -> dict:
    """KID and FID (torchmetrics, on the classifier's features) of the samples for the held-out characters'
    captions against those characters' real glyphs; the same for the real held-out glyphs against the real
    training glyphs, the floor a model of the glyph distribution can reach. Images: uint8 [N, 3, H, W]."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    def both(fake, real) -> tuple[float, float]:
        fid = FrechetInceptionDistance(feature=classifier)
        kid = KernelInceptionDistance(feature=classifier, subset_size=min(50, len(fake), len(real)))
        for metric in (fid, kid):
            metric.update(real, real=True)
            metric.update(fake, real=False)
        return float(kid.compute()[0]), float(fid.compute())

    classifier.standardise_on(train)
    kid, fid = both(samples, heldout)
    floor_kid, floor_fid = both(heldout, train)
    return {"kid_heldout": kid, "fid_heldout": fid, "kid_real_floor": floor_kid, "fid_real_floor": floor_fid,
            "num_heldout_characters": int(len(heldout))}


def shuffled(captions: list[str], seed: int) -> list[str]:
    """The captions permuted so that none stays in place (a derangement, fixed by `seed`)."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(captions))
        if len(captions) < 2 or not (order == np.arange(len(captions))).any():
            return [captions[i] for i in order]


def sample(pipe, prompts: list[str], args, resolution: int, first_seed: int, batch: int = 32) -> list:
    """One image per prompt, prompt i with seed first_seed + i, the demo's sampler and guidance."""
    images = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        generators = [torch.Generator().manual_seed(first_seed + start + i) for i in range(len(chunk))]
        images += pipe(chunk, num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                       height=resolution, width=resolution, generator=generators).images
    return images


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
    from utils.quality import to_uint8
    from utils.sd.builder import build_components
    from utils.sd.kanji_dataset import glyph_stats

    resolution = mode["resolution"]
    # Small-batch inference gains nothing from more threads, and on a busy machine OpenMP threads that
    # spin against each other made sampling ~30x slower (measured: 41 s vs 1.3 s for 5 steps).
    torch.set_num_threads(1)
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, torch_dtype=torch.float32)
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

    to_gray = lambda t: ((t.mean(1) + 1) * 127.5).numpy()  # noqa: E731
    gray = lambda images: np.stack([np.asarray(im.convert("L")) for im in images]).astype(np.float32)  # noqa: E731

    # Seen prompts: one image from each training character's own caption, classified by its nearest glyph.
    seen, seen_captions = load_split(data_dir, "train", resolution, limit=mode["seen_prompts"], one_per_character=True)
    seen_samples = sample(pipe, seen_captions, args, resolution, first_seed=args.seed + 1000)
    metrics.update(seen_prompt_accuracy(gray(seen_samples), to_gray(seen)))
    # Does the caption matter? The same held-out-timestep loss with true and with shuffled captions.
    metrics["loss_true_caption"] = diffusion_loss_at(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.vae, ddpm,
                                                     seen, seen_captions, args.seed)
    metrics["loss_shuffled_caption"] = diffusion_loss_at(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.vae, ddpm,
                                                         seen, shuffled(seen_captions, args.seed), args.seed)
    make_grid([im.resize((96, 96)) for im in seen_samples[:32]], columns=8).save(
        os.path.join(args.output_dir, "samples_seen_prompts.png"))

    images = sample(pipe, UNSEEN_PROMPTS, args, resolution, first_seed=args.seed)
    grid_path = os.path.join(args.output_dir, "samples_unseen_prompts.png")
    make_grid([im.resize((128, 128)) for im in images], columns=4).save(grid_path)
    samples = gray(images)
    metrics.update(
        glyph_metrics(samples, to_gray(train_images), glyph_stats(data_dir), to_gray(heldout[: len(images)]))
    )
    # The glyph distribution: samples for the held-out characters' captions vs their real glyphs, in the features
    # of a glyph classifier trained here on the training glyphs (one per character); real vs real as the floor.
    characters, _ = load_split(data_dir, "train", resolution, one_per_character=True)
    classifier = train_glyph_classifier((characters.mean(1, keepdim=True) + 1) / 2, args.seed)
    heldout_samples = sample(pipe, [c for c in heldout_captions for _ in range(4)], args, resolution,
                             first_seed=args.seed + 2000)  # (4 per character: the real set is small)
    metrics.update(distribution_metrics(classifier, to_uint8(heldout_samples), to_uint8(heldout),
                                        to_uint8(train_images)))
    metrics["binary_pixel_fraction"] = float(np.mean([((s < 64) | (s > 192)).mean()
                                                      for s in np.concatenate([gray(seen_samples), samples])]))
    metrics["curves"] = plot_curves(model_dir, os.path.join(args.output_dir, "training_curves.png"))
    metrics["paths"] = {"pipeline": model_dir, "samples": grid_path,
                        "curves": os.path.join(args.output_dir, "training_curves.png"), "dataset": data_dir}
    metrics["prompts"] = UNSEEN_PROMPTS
    return metrics


def print_summary(metrics: dict, seconds: float, mode: str = "demo") -> None:
    # The targets are the demo's (README); a smoke run's few steps only show that everything runs.
    ok = lambda flag: "ok" if flag else ("BELOW TARGET" if mode != "smoke" else "below the demo's target")  # noqa: E731
    fell = metrics["diffusion_loss_trained"] < 0.8 * metrics["diffusion_loss_initial"]
    if mode == "smoke":
        fell = metrics["diffusion_loss_trained"] < metrics["diffusion_loss_initial"]
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
        f"  seen prompts -> their kanji    top-1 {100 * metrics['seen_prompt_top1']:.1f}%, top-5 "
        f"{100 * metrics['seen_prompt_top5']:.1f}% of {metrics['num_seen_prompts']} (chance "
        f"{100 * metrics['chance_top1']:.1f}%; target top-1 >= 40%: {ok(metrics['seen_prompt_top1'] >= 0.4)})",
        f"  loss, true vs shuffled caption {metrics['loss_true_caption']:.4f} vs "
        f"{metrics['loss_shuffled_caption']:.4f} "
        f"({100 * (1 - metrics['loss_true_caption'] / metrics['loss_shuffled_caption']):.1f}% lower; target >= 5%: "
        f"{ok(metrics['loss_true_caption'] <= 0.95 * metrics['loss_shuffled_caption'])})",
        f"  samples' ink coverage          {metrics['ink_coverage_mean']:.3f} (real kanji "
        f"{metrics['real_ink_coverage_range'][0]:.3f}"
        f"-{metrics['real_ink_coverage_range'][1]:.3f}; "
        f"{100 * metrics['ink_coverage_in_real_range']:.0f}% of samples in range)",
        f"  near-black/white pixels        {100 * metrics['binary_pixel_fraction']:.1f}% of all samples' pixels (real "
        f"glyphs {100 * metrics['heldout_real_binary_fraction']:.1f}%; target >= 93%: "
        f"{ok(metrics['binary_pixel_fraction'] >= 0.93)})",
        f"  distance to nearest training glyph  {metrics['nearest_train_distance']:.3f} "
        f"(held-out real glyphs: {metrics['heldout_real_nearest_train_distance']:.3f})",
        f"  held-out characters, samples vs real glyphs ({metrics['num_heldout_characters']}; glyph-classifier "
        f"features)  KID {metrics['kid_heldout']:.4f}, FID {metrics['fid_heldout']:.3f}  (real held-out vs real "
        f"training glyphs: KID {metrics['kid_real_floor']:.4f}, FID {metrics['fid_real_floor']:.3f}; KID is "
        "unbiased: about 0, and below, when the sets are alike)",
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
    metrics["minutes"] = metrics["seconds"] / 60
    metrics["mode"] = args.mode
    with open(os.path.join(args.output_dir, "summary.json"), "w", encoding="utf-8") as handle:
        json.dump(metrics, handle, indent=2)
    print_summary(metrics, metrics["seconds"], args.mode)
    return metrics


if __name__ == "__main__":
    main()
