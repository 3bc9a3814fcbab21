#!/usr/bin/env python
"""Benchmark train_text_to_image.py on SD3, FLUX.1 or Lumina-2 against diffusers' train_dreambooth_lora_<family>.py.

    python benchmarks/bench_flow_families.py --family sd3 --resolution 32 --batch_size 2 --warmup_steps 3 \
        --steps 20 --repeats 3 --cache both --reference /tmp/reference/train_dreambooth_lora_sd3.py \
        --reference_pythonpath /tmp/reference/site --threads 1 --results_dir benchmarks/results

On a GPU, the released models' sizes (`--size full`: FLUX.1-dev's and SD3.5-medium's transformer and VAE configs,
random weights, built on the device; the text encoders stay the tiny ones, cached anyway), ours only:

    python benchmarks/bench_flow_families.py --family flux --size full --resolution 512 --batch_size 1 \
        --cache on --mixed_precision bf16 --extra_args "--gradient_checkpointing" --warmup_steps 3 --steps 10
    python benchmarks/bench_flow_families.py --family sd3 --size full --resolution 1024 --batch_size 1 \
        --cache on --mixed_precision bf16 --extra_args "--gradient_checkpointing" --warmup_steps 3 --steps 10

One command builds an instance folder (deterministic synthetic images, DreamBooth-style: one prompt) and the tiny
pipeline of the family from diffusers' own tests (utils/families/, offline), then runs each variant
`--repeats` times, alternating, as separate processes with the same diffusers flags: ours (`--use_lora`: the LoRA
script is ours with that flag), ours with the caches (`--cache_latents --pre_compute_text_embeddings`), and the
reference script you give (run, never copied). benchmarks/harness.py times the optimizer steps and writes the
results (see benchmarks/bench_text_to_image.py for the fields)."""

from __future__ import annotations

import argparse
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from benchmarks.harness import (add_harness_args,  # noqa: E402  (after the sys.path line, for `python benchmarks/...`)
                                check_harness_args, make_workdir, reference_variants, run_benchmark, variant)

OUR_SCRIPT = os.path.join(REPO_ROOT, "train_text_to_image.py")


def _builder(module: str, name: str):
    return lambda: getattr(__import__(f"utils.families.{module}", fromlist=[name]), name)


BUILDERS = {"sd3": _builder("sd3", "build_tiny_sd3_pipeline"), "flux": _builder("flux", "build_tiny_flux_pipeline"),
            "lumina2": _builder("lumina2", "build_tiny_lumina2_pipeline")}
# --size full: the released models' configs (their Hub config.json files: black-forest-labs/FLUX.1-dev,
# stabilityai/stable-diffusion-3.5-medium), less the text-input widths, which stay the tiny text encoders' (FLUX's
# context / pooled projections are 0.1% of its parameters; the text tokens are --max_sequence_length either way).
FULL_TRANSFORMERS = {
    "flux": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                 num_attention_heads=24, guidance_embeds=True, axes_dims_rope=[16, 56, 56]),
    "sd3": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=384,
                dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")}
FULL_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16, norm_num_groups=32,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
FULL_VAE_SCALES = {"flux": dict(scaling_factor=0.3611, shift_factor=0.1159),
                   "sd3": dict(scaling_factor=1.5305, shift_factor=0.0609)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="sd3", choices=sorted(BUILDERS), help="Which tiny pipeline to train.")
    parser.add_argument("--size", default="tiny", choices=["tiny", "full"],
                        help="tiny: diffusers' test pipeline; full: the released model's transformer and VAE shapes "
                             "(FLUX.1-dev, SD3.5-medium), random weights, built on the GPU if there is one.")
    parser.add_argument("--resolution", type=int, default=32,
                        help="Pixels (the tiny VAEs do not downsample: (resolution / patch)^2 tokens).")
    parser.add_argument("--max_sequence_length", type=int, default=77, help="T5 / Gemma prompt tokens (both scripts).")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--num_images", type=int, default=16, help="Instance images.")
    parser.add_argument("--cache", default="both", choices=["off", "on", "both"],
                        help="Run ours without (off), with (on) or both with and without the caches.")
    add_harness_args(parser, reference_help="diffusers' examples/dreambooth/train_dreambooth_lora_<family>.py (or "
                                            "another script with its flags), run alongside ours.")
    args = parser.parse_args(argv)
    check_harness_args(parser, args)
    if args.size == "full" and args.family not in FULL_TRANSFORMERS:
        parser.error(f"--size full is for {' and '.join(sorted(FULL_TRANSFORMERS))}: the GPU runs issue 31 asks for")
    return args


def make_inputs(args, workdir: str) -> tuple[str, str]:
    """(instance_dir, pipeline_dir), built once per workdir and setting."""
    import numpy as np
    from PIL import Image

    instance_dir = os.path.join(workdir, f"instance-{args.resolution}-{args.num_images}")
    pipeline_dir = os.path.join(workdir, f"tiny-{args.family}-{args.seed}")
    if not os.path.isdir(instance_dir):
        os.makedirs(instance_dir)
        rng = np.random.default_rng(args.seed)
        side = round(args.resolution * 1.25)
        for index in range(args.num_images):
            pixels = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(instance_dir, f"{index:03d}.jpg"), quality=95)
    if args.size == "full":
        pipeline_dir = os.path.join(workdir, f"full-{args.family}-{args.seed}")
    if not os.path.isfile(os.path.join(pipeline_dir, "model_index.json")):
        vae = {**FULL_VAE, **FULL_VAE_SCALES[args.family]} if args.size == "full" else None
        BUILDERS[args.family]()(pipeline_dir, ["a photo of sks thing"], seed=args.seed, vae_config=vae)
        if args.size == "full":
            save_full_transformer(args.family, pipeline_dir, args.seed)
    return instance_dir, pipeline_dir


def save_full_transformer(family: str, pipeline_dir: str, seed: int) -> None:
    """Replace the tiny pipeline's transformer with the released model's shape (random weights, bf16), built on the
    GPU when there is one (12B parameters initialise in seconds there, minutes on a CPU)."""
    import json

    import torch
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    folder = os.path.join(pipeline_dir, "transformer")
    model_class = {"flux": FluxTransformer2DModel, "sd3": SD3Transformer2DModel}[family]
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as handle:
        tiny = json.load(handle)
    keep = {key: tiny[key] for key in ("joint_attention_dim", "pooled_projection_dim") if key in tiny}
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # (initialised in bf16: FLUX's 12B take 24 GB, not 48 + 24)
    try:
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            transformer = model_class(**FULL_TRANSFORMERS[family], **keep)
    finally:
        torch.set_default_dtype(default)
    transformer.save_pretrained(folder)
    print(f"{family} transformer: {sum(p.numel() for p in transformer.parameters()) / 1e9:.2f}B parameters")


def common_flags(args, instance_dir: str, pipeline_dir: str, output_dir: str) -> list[str]:
    """diffusers' train_dreambooth_lora_<family>.py flags: identical for ours and the reference."""
    return ["--pretrained_model_name_or_path", pipeline_dir, "--instance_data_dir", instance_dir,
            "--instance_prompt", "a photo of sks thing", "--resolution", str(args.resolution), "--center_crop",
            "--train_batch_size", str(args.batch_size), "--max_train_steps", str(args.warmup_steps + args.steps),
            "--learning_rate", "1e-4", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
            "--output_dir", output_dir, "--checkpointing_steps", "1000000000", "--seed", str(args.seed),
            "--report_to", "tensorboard", "--dataloader_num_workers", str(args.dataloader_num_workers),
            "--mixed_precision", args.mixed_precision, "--max_sequence_length", str(args.max_sequence_length)]


def variants(args, workdir: str) -> list[dict]:
    ours = []
    if args.cache in ("off", "both"):
        ours.append(variant("ours", OUR_SCRIPT, ["--use_lora"] + args.extra_args.split()))
    if args.cache in ("on", "both"):
        ours.append(variant("ours+cache", OUR_SCRIPT, ["--use_lora", "--cache_latents", "--pre_compute_text_embeddings",
                                                       "--latent_cache_dir", os.path.join(workdir, "latent_cache")]
                            + args.extra_args.split()))
    return ours + reference_variants(args)


def main(argv=None):
    args = parse_args(argv)
    workdir = make_workdir(args, f"bench-{args.family}-")
    instance_dir, pipeline_dir = make_inputs(args, workdir)
    model = f"tiny {args.family} (diffusers' test configs)" if args.size == "tiny" else \
        f"{args.family} at the released model's transformer and VAE shapes (random weights; tiny text encoders)"
    return run_benchmark(args, argv, "bench_flow_families.py",
                         f"{args.family}-lora-{args.size}-{args.resolution}px", variants(args, workdir),
                         lambda _, output_dir: common_flags(args, instance_dir, pipeline_dir, output_dir), workdir,
                         args.batch_size, None, fields={"model": model},
                         notes=[f"steps/s of LoRA training on {model}, same diffusers flags"], samples="images")


if __name__ == "__main__":
    main()
