#!/usr/bin/env python
"""Benchmark train_mask_dit.py (and optionally a reference script) on the same model and data.

    python benchmarks/bench_mask_dit.py --model_size tiny --resolution 64 --batch_size 8 \
        --warmup_steps 3 --steps 12 --repeats 2 --threads 1 [--latent --cache both]

One command writes synthetic fundus pairs (`utils.mask_dit.data`: image, 2-class mask, caption;
exactly one epoch of `(warmup_steps + steps) x batch_size` pairs unless --num_images says
otherwise), and for `--latent` a randomly initialised VAE (`utils.sd.builder`'s VAE presets:
tiny /2, small /4, base = SD's VAE layout /8), for `--text_encoder` a random CLIP text tower.
The transformer is the `--model_size` preset of `utils.mask_dit.nextdit`, randomly initialised by the
script itself. Variants (ours, ours with `--precompute` when the script has it, `--reference`)
run `--repeats` times, alternating, as separate processes with identical flags; printed per
variant: steps/s, images/s, step time (median, p90), peak memory, the transformer's forward +
backward FLOPs per step (torch.utils.flop_counter, meta device) and achieved TFLOP/s, MFU on
GPU, and the ratio to the reference. --results_dir writes JSON and a markdown table.
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
                                check_harness_args, flops_of, make_workdir, reference_variants, run_benchmark,
                                script_accepts, variant)
from utils.mask_dit.nextdit import MODEL_PRESETS  # noqa: E402

OUR_SCRIPT = os.path.join(REPO_ROOT, "train_mask_dit.py")
MAX_CAPTION_LENGTH = 77  # train_mask_dit.py's --max_caption_length default


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_size", default="tiny", choices=sorted(MODEL_PRESETS), help="utils.mask_dit.nextdit.MODEL_PRESETS.")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--latent", action="store_true", help="Train in the latent space of a random --vae_preset VAE.")
    parser.add_argument("--vae_preset", default="tiny", choices=["tiny", "small", "base"],
                        help="utils.sd.builder's VAE presets: downsampling by 2, 4, 8 (base: SD 1.x/SDXL VAE layout, 83M).")
    parser.add_argument("--text_encoder", default="none", choices=["none", "tiny", "small", "base"],
                        help="Caption conditioning with a random CLIP text tower of this utils.sd.builder preset (base: CLIP ViT-L/14 sized).")
    parser.add_argument("--mask_channels", type=int, default=2, help="The synthetic masks have 2 classes (vessel, lesion).")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--num_images", type=int, default=None,
                        help="Pairs in the synthetic dataset (default: one epoch, (warmup_steps + steps) x batch_size).")
    parser.add_argument("--cache", default="off", choices=["off", "on", "both"],
                        help="Run ours without (off), with (on) or both with and without --precompute (cached latents and "
                             "caption embeddings); only if train_mask_dit.py has --precompute.")
    add_harness_args(parser, reference_help="A reference training script taking train_mask_dit.py's flags, run alongside ours.")
    args = parser.parse_args(argv)
    check_harness_args(parser, args)
    return args


# ----------------------------------------------------------------------------------------------
# Inputs: data, VAE, text encoder
# ----------------------------------------------------------------------------------------------

def build_vae(folder: str, preset: str, resolution: int, seed: int) -> str:
    """A randomly initialised AutoencoderKL with utils.sd.builder's `preset` VAE layout, saved to `folder`."""
    import torch
    from diffusers import AutoencoderKL

    from utils.sd.builder import PRESETS

    torch.manual_seed(seed)
    AutoencoderKL(**dict(PRESETS[preset]["vae"], in_channels=3, out_channels=3, sample_size=resolution)).save_pretrained(folder)
    return folder


def build_text_encoder(folder: str, preset: str, captions: list[str], seed: int) -> str:
    """folder/tokenizer (CLIP BPE learned from the captions) and folder/text_encoder (random CLIPTextModel)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from utils.sd.builder import PRESETS, build_clip_tokenizer

    spec = PRESETS[preset]
    tokenizer = build_clip_tokenizer(os.path.join(folder, "tokenizer"), captions, spec["num_merges"])
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, **spec["text"])
    CLIPTextModel(config).save_pretrained(os.path.join(folder, "text_encoder"))
    return folder


def prepare_inputs(args, workdir: str) -> dict:
    """{"data_dir", "vae_dir" (or None), "text_encoder_dir" (or None)}, each built once per workdir and setting."""
    from utils.mask_dit.data import write_synthetic_fundus_dataset

    num_images = args.num_images or (args.warmup_steps + args.steps) * args.batch_size
    data_dir = os.path.join(workdir, f"fundus-{args.resolution}-{num_images}-{args.seed}")
    if not os.path.isfile(os.path.join(data_dir, "metadata.jsonl")):
        write_synthetic_fundus_dataset(data_dir, num_images, args.resolution, args.seed)
    inputs = {"data_dir": data_dir, "vae_dir": None, "text_encoder_dir": None}
    if args.latent:
        inputs["vae_dir"] = os.path.join(workdir, f"vae-{args.vae_preset}-{args.resolution}-{args.seed}")
        if not os.path.isfile(os.path.join(inputs["vae_dir"], "config.json")):
            build_vae(inputs["vae_dir"], args.vae_preset, args.resolution, args.seed)
    if args.text_encoder != "none":
        inputs["text_encoder_dir"] = os.path.join(workdir, f"text-{args.text_encoder}-{args.seed}")
        if not os.path.isfile(os.path.join(inputs["text_encoder_dir"], "text_encoder", "config.json")):
            captions = [json.loads(line)["text"] for line in open(os.path.join(data_dir, "metadata.jsonl"), encoding="utf-8")]
            build_text_encoder(inputs["text_encoder_dir"], args.text_encoder, captions, args.seed)
    return inputs


def common_flags(args, inputs: dict, output_dir: str) -> list[str]:
    """train_mask_dit.py flags: identical for ours and the reference. No validation, no checkpoints."""
    flags = ["--train_data_dir", inputs["data_dir"], "--model_size", args.model_size, "--resolution", str(args.resolution),
             "--mask_channels", str(args.mask_channels), "--train_batch_size", str(args.batch_size),
             "--max_train_steps", str(args.warmup_steps + args.steps), "--learning_rate", "1e-4",
             "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--validation_split", "0", "--validation_epochs", "0",
             "--num_validation_images", "0", "--checkpointing_steps", "1000000000", "--seed", str(args.seed),
             "--report_to", "tensorboard", "--dataloader_num_workers", str(args.dataloader_num_workers),
             "--mixed_precision", args.mixed_precision, "--output_dir", output_dir]
    if inputs["vae_dir"]:
        flags += ["--vae_model_name_or_path", inputs["vae_dir"]]
    if inputs["text_encoder_dir"]:
        flags += ["--text_encoder_name_or_path", inputs["text_encoder_dir"]]
    return flags


def variants(args, workdir: str) -> list[dict]:
    cache = args.cache
    if cache != "off" and not (args.latent or args.text_encoder != "none"):
        print("(pixel space without a text encoder: nothing to cache, running without --precompute only)")
        cache = "off"
    if cache != "off" and not script_accepts(OUR_SCRIPT, "--precompute"):
        if cache == "on":
            raise SystemExit("--cache on: train_mask_dit.py has no --precompute yet; use --cache off")
        print("(train_mask_dit.py has no --precompute yet: running without the cache only)")
        cache = "off"
    ours = []
    if cache in ("off", "both"):
        ours.append(variant("ours", OUR_SCRIPT, args.extra_args.split()))
    if cache in ("on", "both"):
        ours.append(variant("ours+cache", OUR_SCRIPT, args.extra_args.split()
                            + ["--precompute", "--latent_cache_dir", os.path.join(workdir, "latent_cache")]))
    return ours + reference_variants(args)


# ----------------------------------------------------------------------------------------------
# FLOPs and the benchmark
# ----------------------------------------------------------------------------------------------

def count_flops(args, inputs: dict) -> dict:
    """FLOPs per step on the meta device (nothing is computed), at the benchmark's batch size:
    {"transformer_train": MaskNextDiT forward + backward, "vae_encode": the VAE encoder forward (latent only)}."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig

    from utils.mask_dit.nextdit import build_mask_nextdit

    batch = args.batch_size
    vae_config = AutoencoderKL.load_config(inputs["vae_dir"]) if inputs["vae_dir"] else None
    in_channels = vae_config["latent_channels"] if vae_config else 3
    grid = args.resolution // 2 ** (len(vae_config["block_out_channels"]) - 1) if vae_config else args.resolution
    caption_dim = (CLIPTextConfig.from_pretrained(os.path.join(inputs["text_encoder_dir"], "text_encoder")).hidden_size
                   if inputs["text_encoder_dir"] else None)

    def transformer_train():
        with torch.device("meta"):
            model = build_mask_nextdit(args.model_size, in_channels=in_channels, mask_channels=args.mask_channels,
                                       caption_dim=caption_dim, sample_size=grid)
            caption = torch.randn(batch, MAX_CAPTION_LENGTH, caption_dim) if caption_dim else None
            caption_mask = torch.ones(batch, MAX_CAPTION_LENGTH) if caption_dim else None
            prediction = model(torch.randn(batch, in_channels, grid, grid), torch.rand(batch),
                               torch.rand(batch, args.mask_channels, args.resolution, args.resolution), caption, caption_mask)
            prediction.float().pow(2).mean().backward()

    def vae_encode():
        with torch.device("meta"), torch.no_grad():
            AutoencoderKL.from_config(vae_config).encode(torch.randn(batch, 3, args.resolution, args.resolution))

    flops = {"transformer_train": flops_of(transformer_train), "vae_encode": flops_of(vae_encode) if vae_config else None}
    return {key: value for key, value in flops.items() if value is not None}


def default_name(args) -> str:
    space = f"latent-{args.vae_preset}" if args.latent else "pixel"
    captions = f"-text-{args.text_encoder}" if args.text_encoder != "none" else ""
    return f"mask-dit-{args.model_size}-{args.resolution}px-{space}{captions}-b{args.batch_size}"


def main(argv=None) -> dict:
    args = parse_args(argv)
    workdir = make_workdir(args, "bench-mask-dit-")
    inputs = prepare_inputs(args, workdir)
    flop_counts = count_flops(args, inputs)
    flops = flop_counts.get("transformer_train")
    space = f"latent ({args.vae_preset} VAE)" if args.latent else "pixel space"
    notes = [f"model_size={args.model_size} resolution={args.resolution} {space} text_encoder={args.text_encoder} "
             f"batch={args.batch_size} measured {args.steps} steps after {args.warmup_steps} warm-up, {args.repeats} run(s) each"]
    if flops:
        vae_note = (f", VAE encode {flop_counts['vae_encode'] / 1e9:.2f} GFLOP (what --cache_latents removes)"
                    if "vae_encode" in flop_counts else "")
        notes.append(f"FLOPs per step: transformer forward+backward {flops / 1e9:.2f} GFLOP{vae_note}")
    return run_benchmark(
        args, argv, "bench_mask_dit.py", default_name(args), variants(args, workdir),
        lambda entry, output_dir: common_flags(args, inputs, output_dir), workdir, args.batch_size, flops, notes=notes,
        samples="images", fields={"transformer_train_flops_per_step": flops, "vae_encode_flops_per_step": flop_counts.get("vae_encode")})


if __name__ == "__main__":
    main()
