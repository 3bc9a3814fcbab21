#!/usr/bin/env python
"""Benchmark train_text_to_image.py (and optionally a reference script) on the same model and data.

    python benchmarks/bench_text_to_image.py --preset small --resolution 64 --batch_size 8 \
        --warmup_steps 5 --steps 30 --repeats 2 --cache both --reference /tmp/reference/train_text_to_image.py

One command builds an imagefolder (deterministic synthetic images + captions) and a randomly
initialised pipeline (`utils.sd.builder`, preset tiny/small/base), then runs each variant
`--repeats` times, alternating (ours, ours+cache, reference, ours, ...), as separate processes
with identical flags. `benchmarks/step_timer.py` records when each optimizer step ends; the
first `--warmup_steps` are dropped and the next `--steps` are measured. Printed per variant:
steps/s, samples/s, step time (median, p90), peak memory (RSS on CPU, max allocated on GPU),
the UNet's training FLOPs per step (torch.utils.flop_counter) and achieved TFLOP/s, MFU on
GPU, and the ratio to the reference. --results_dir writes JSON and a markdown table.
The reference script is yours (e.g. diffusers' examples/text_to_image/train_text_to_image.py);
it is run, never copied.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from benchmarks.harness import (add_harness_args,  # noqa: E402  (after the sys.path line, for `python benchmarks/...`)
                                check_harness_args, flops_of, make_workdir, reference_variants, run_benchmark, variant)

OUR_SCRIPT = os.path.join(REPO_ROOT, "train_text_to_image.py")

# SD 1.x's architecture (4-level UNet with 2 layers per block, 8x VAE with 4 levels) at reduced width:
# the VAE encoder / UNet training FLOP ratio stays close to SD 1.5's (0.46 at 512px).
SD_SMALL = {"unet": dict(block_out_channels=(64, 128, 256, 256), layers_per_block=2, attention_head_dim=8, norm_num_groups=32,
                         down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                         up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
            "vae": dict(block_out_channels=(32, 64, 128, 128), layers_per_block=2, norm_num_groups=32,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)}

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
          "black": (20, 20, 20), "white": (245, 245, 245)}
SHAPES = ("circle", "square", "triangle")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "tiny-sdxl", "small", "sd-small", "base"],
                        help="utils.sd.builder presets (tiny-sdxl: an SDXL-shaped pipeline), or sd-small: SD 1.x's "
                             "UNet and VAE layout at 1/5 and 1/4 width.")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--num_images", type=int, default=64, help="Images in the synthetic dataset.")
    parser.add_argument("--image_size", type=int, default=None, help="Side of the stored images (default 1.25 x resolution).")
    parser.add_argument("--cache", default="both", choices=["off", "on", "both"],
                        help="Run ours without (off), with (on) or both with and without --precompute.")
    add_harness_args(parser, reference_help="A reference training script with diffusers' flags, run alongside ours.")
    args = parser.parse_args(argv)
    check_harness_args(parser, args)
    return args


# ----------------------------------------------------------------------------------------------
# Inputs: data and model
# ----------------------------------------------------------------------------------------------

def make_imagefolder(folder: str, num_images: int, image_size: int, seed: int = 0) -> list[str]:
    """Write `num_images` JPEGs of coloured shapes with captions (imagefolder + metadata.jsonl). Returns captions."""
    import random

    from PIL import Image, ImageDraw

    from utils.sd.data import write_metadata_jsonl

    os.makedirs(folder, exist_ok=True)
    rng = random.Random(seed)
    records = []
    for index in range(num_images):
        shape, fg, bg = rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(list(COLORS))
        image = Image.new("RGB", (image_size, image_size), COLORS[bg])
        draw = ImageDraw.Draw(image)
        x0, y0 = rng.randint(0, image_size // 3), rng.randint(0, image_size // 3)
        x1, y1 = x0 + rng.randint(image_size // 3, image_size // 2), y0 + rng.randint(image_size // 3, image_size // 2)
        if shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=COLORS[fg])
        elif shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=COLORS[fg])
        else:
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=COLORS[fg])
        name = f"{index:05d}.jpg"
        image.save(os.path.join(folder, name), quality=90)
        records.append({"file_name": name, "text": f"a {fg} {shape} on a {bg} background"})
    write_metadata_jsonl(folder, records)
    return [r["text"] for r in records]


def prepare_inputs(args, workdir: str) -> tuple[str, str]:
    """(data_dir, pipeline_dir), built once per workdir and setting."""
    from utils.sd.builder import build_pipeline

    tag = f"{args.preset}-{args.resolution}-{args.num_images}-{args.seed}"
    data_dir = os.path.join(workdir, f"data-{tag}")
    pipeline_dir = os.path.join(workdir, f"pipeline-{tag}")
    if not os.path.isfile(os.path.join(data_dir, "metadata.jsonl")):
        captions = make_imagefolder(data_dir, args.num_images, args.image_size or round(args.resolution * 1.25), args.seed)
    else:
        captions = [json.loads(line)["text"] for line in open(os.path.join(data_dir, "metadata.jsonl"), encoding="utf-8")]
    if not os.path.isfile(os.path.join(pipeline_dir, "model_index.json")):
        if args.preset == "sd-small":
            from utils.sd.builder import assemble_pipeline, build_components

            components = build_components("small", texts=captions, resolution=args.resolution, seed=args.seed,
                                          unet_config=SD_SMALL["unet"], vae_config=SD_SMALL["vae"],
                                          tokenizer_dir=os.path.join(pipeline_dir, "tokenizer"))
            assemble_pipeline(components).save_pretrained(pipeline_dir)
        else:
            build_pipeline(pipeline_dir, args.preset, texts=captions, resolution=args.resolution, seed=args.seed)
    return data_dir, pipeline_dir


def common_flags(args, data_dir: str, pipeline_dir: str, output_dir: str) -> list[str]:
    """diffusers' train_text_to_image.py flags: identical for ours and the reference."""
    return ["--pretrained_model_name_or_path", pipeline_dir, "--train_data_dir", data_dir,
            "--resolution", str(args.resolution), "--center_crop", "--train_batch_size", str(args.batch_size),
            "--max_train_steps", str(args.warmup_steps + args.steps), "--learning_rate", "1e-5",
            "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--output_dir", output_dir,
            "--checkpointing_steps", "1000000000", "--seed", str(args.seed), "--report_to", "tensorboard",
            "--dataloader_num_workers", str(args.dataloader_num_workers), "--mixed_precision", args.mixed_precision]


def variants(args, workdir: str) -> list[dict]:
    ours = []
    if args.cache in ("off", "both"):
        ours.append(variant("ours", OUR_SCRIPT, args.extra_args.split()))
    if args.cache in ("on", "both"):
        ours.append(variant("ours+cache", OUR_SCRIPT, args.extra_args.split()
                            + ["--precompute", "--latent_cache_dir", os.path.join(workdir, "latent_cache")]))
    return ours + reference_variants(args)


# ----------------------------------------------------------------------------------------------
# FLOPs and the benchmark
# ----------------------------------------------------------------------------------------------

def count_flops(pipeline_dir: str, batch_size: int, resolution: int) -> dict:
    """FLOPs per step (torch.utils.flop_counter on the meta device, nothing is computed):
    {"unet_train": UNet forward + backward, "vae_encode": VAE encoder forward} at this batch size."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    def load():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(os.path.join(pipeline_dir, "unet")))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(os.path.join(pipeline_dir, "vae")))
        return unet, vae, CLIPTextConfig.from_pretrained(os.path.join(pipeline_dir, "text_encoder"))

    def unet_train():
        with torch.device("meta"):
            unet, vae, text_config = load()
            latent = resolution // 2 ** (len(vae.config.block_out_channels) - 1)
            sample = torch.randn(batch_size, unet.config.in_channels, latent, latent)
            states = torch.randn(batch_size, text_config.max_position_embeddings, unet.config.cross_attention_dim)
            added = None
            if unet.config.addition_embed_type == "text_time":  # SDXL: the pooled prompt and the 6 time ids
                pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
                added = {"text_embeds": torch.randn(batch_size, pooled), "time_ids": torch.randn(batch_size, 6)}
            unet(sample, torch.randint(0, 1000, (batch_size,)), states, added_cond_kwargs=added,
                 return_dict=False)[0].float().pow(2).mean().backward()

    def vae_encode():
        with torch.device("meta"), torch.no_grad():
            load()[1].encode(torch.randn(batch_size, 3, resolution, resolution))

    flops = {"unet_train": flops_of(unet_train), "vae_encode": flops_of(vae_encode)}
    return {key: value for key, value in flops.items() if value is not None}


def main(argv=None) -> dict:
    args = parse_args(argv)
    workdir = make_workdir(args, "bench-t2i-")
    data_dir, pipeline_dir = prepare_inputs(args, workdir)
    flop_counts = count_flops(pipeline_dir, args.batch_size, args.resolution)
    flops = flop_counts.get("unet_train")
    notes = [f"preset={args.preset} resolution={args.resolution} batch={args.batch_size} "
             f"measured {args.steps} steps after {args.warmup_steps} warm-up, {args.repeats} run(s) each"]
    if flops:
        notes.append(f"FLOPs per step: UNet forward+backward {flops / 1e9:.2f} GFLOP, VAE encode "
                     f"{flop_counts.get('vae_encode', 0) / 1e9:.2f} GFLOP (what --cache_latents removes)")
    return run_benchmark(
        args, argv, "bench_text_to_image.py", f"t2i-{args.preset}-{args.resolution}px-b{args.batch_size}",
        variants(args, workdir), lambda entry, output_dir: common_flags(args, data_dir, pipeline_dir, output_dir),
        workdir, args.batch_size, flops, notes=notes,
        fields={"unet_train_flops_per_step": flops, "vae_encode_flops_per_step": flop_counts.get("vae_encode")})


if __name__ == "__main__":
    main()
