#!/usr/bin/env python
"""The bare UNet training step (forward + backward + fused AdamW), without any training script.

    python benchmarks/bench_unet_step.py --preset tiny --resolution 64 --batch_size 8 --modes eager channels_last compile

The floor under train_text_to_image.py's cached step: it shows how much of a step is the UNet
itself (and nothing a loop could save) and what the levers on the UNet do on this device:
`channels_last`, `compile` (torch.compile, inductor), `bf16` (autocast). Each mode runs in this
process on the same random UNet (`utils.sd.builder` preset, or `sd-small`), inputs and optimizer
settings; prints warm-up seconds (compile time included) and the median step time.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

MODES = ("eager", "channels_last", "compile", "bf16")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small", "sd-small", "base"])
    parser.add_argument("--resolution", type=int, default=64, help="Image resolution (the latents are smaller by the VAE factor).")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--modes", nargs="+", default=["eager", "channels_last"], choices=MODES)
    parser.add_argument("--warmup_steps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def build_unet(preset: str, resolution: int, seed: int):
    from benchmarks.bench_text_to_image import SD_SMALL
    from utils.sd.builder import build_components

    extra = dict(unet_config=SD_SMALL["unet"], vae_config=SD_SMALL["vae"]) if preset == "sd-small" else {}
    components = build_components("small" if preset == "sd-small" else preset, resolution=resolution, seed=seed, **extra)
    vae = components["vae"]
    return components["unet"], resolution // 2 ** (len(vae.config.block_out_channels) - 1)


def time_mode(unet, mode: str, inputs: tuple, warmup_steps: int, steps: int) -> dict:
    import torch

    model = copy.deepcopy(unet)
    latents, timesteps, context = inputs
    if mode == "channels_last":
        model.to(memory_format=torch.channels_last)
        latents = latents.contiguous(memory_format=torch.channels_last)
    forward = torch.compile(model) if mode == "compile" else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16")

    def step():
        with autocast:
            prediction = forward(latents, timesteps, context, return_dict=False)[0]
        torch.nn.functional.mse_loss(prediction.float(), latents.float()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    started = time.perf_counter()
    for _ in range(warmup_steps):
        step()
    warmup = time.perf_counter() - started
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return {"warmup_s": warmup, "median_ms": 1000 * statistics.median(times), "min_ms": 1000 * min(times)}


def main(argv=None) -> dict:
    import torch

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    unet, latent_size = build_unet(args.preset, args.resolution, args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    config = unet.config
    inputs = (torch.randn(args.batch_size, config.in_channels, latent_size, latent_size, generator=generator),
              torch.randint(0, 1000, (args.batch_size,), generator=generator),
              torch.randn(args.batch_size, 77, config.cross_attention_dim, generator=generator))
    results = {mode: time_mode(unet, mode, inputs, args.warmup_steps, args.steps) for mode in args.modes}
    print(f"UNet {args.preset}, {args.resolution} px ({latent_size}^2 latents), batch {args.batch_size}, "
          f"{args.threads} thread(s), {args.steps} steps after {args.warmup_steps} warm-up")
    print("| mode | warm-up (s) | step median (ms) | step min (ms) | vs eager |\n|---|---|---|---|---|")
    eager = results.get("eager", {}).get("median_ms")
    for mode, r in results.items():
        ratio = f"{eager / r['median_ms']:.2f}x" if eager else "-"
        print(f"| {mode} | {r['warmup_s']:.1f} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | {ratio} |")
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
