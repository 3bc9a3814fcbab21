#!/usr/bin/env python
"""Benchmark train_text_to_image.py (and optionally a reference script) on the same model and data.

    python benchmarks/bench_text_to_image.py --preset small --resolution 64 --batch_size 8 \
        --warmup_steps 5 --steps 30 --repeats 2 --cache both --reference /tmp/reference/train_text_to_image.py

One command builds an imagefolder (deterministic synthetic images + captions) and a randomly
initialised pipeline (`utils.sd_builder`, preset tiny/small/base), then runs each variant
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
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

STEP_TIMER = os.path.join(REPO_ROOT, "benchmarks", "step_timer.py")
OUR_SCRIPT = os.path.join(REPO_ROOT, "train_text_to_image.py")
# Dense bf16/fp16 tensor-core peaks (TFLOP/s) for MFU; pass --peak_tflops for other devices/dtypes.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}

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
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small", "sd-small", "base"],
                        help="utils.sd_builder presets, or sd-small: SD 1.x's UNet and VAE layout at 1/5 and 1/4 width.")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--num_images", type=int, default=64, help="Images in the synthetic dataset.")
    parser.add_argument("--image_size", type=int, default=None, help="Side of the stored images (default 1.25 x resolution).")
    parser.add_argument("--warmup_steps", type=int, default=3, help="Steps run before measuring (at least 1).")
    parser.add_argument("--steps", type=int, default=20, help="Measured steps per run.")
    parser.add_argument("--repeats", type=int, default=1, help="Runs per variant, alternated.")
    parser.add_argument("--cache", default="both", choices=["off", "on", "both"],
                        help="Run ours without (off), with (on) or both with and without --precompute.")
    parser.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--dataloader_num_workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS/MKL_NUM_THREADS for every run (default: torch's choice). 1 makes CPU-time numbers exact.")
    parser.add_argument("--extra_args", default="", help="More flags for our script only, e.g. '--channels_last --torch_compile'.")
    parser.add_argument("--reference", default=None, help="A reference training script with diffusers' flags, run alongside ours.")
    parser.add_argument("--reference_pythonpath", default=None,
                        help="Extra PYTHONPATH entries for the reference runs only (e.g. a torchvision stand-in).")
    parser.add_argument("--peak_tflops", type=float, default=None, help="Device peak for MFU (default: by GPU name).")
    parser.add_argument("--workdir", default=None, help="Where data, pipeline and run outputs go (default: a temp dir).")
    parser.add_argument("--results_dir", default=None, help="Write <name>.json and <name>.md here.")
    parser.add_argument("--name", default=None, help="Result file name (default: t2i-<preset>-<resolution>px-b<batch>).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.warmup_steps < 1 or args.steps < 1:
        parser.error("--warmup_steps and --steps must be >= 1")
    return args


# ----------------------------------------------------------------------------------------------
# Inputs: data and model
# ----------------------------------------------------------------------------------------------

def make_imagefolder(folder: str, num_images: int, image_size: int, seed: int = 0) -> list[str]:
    """Write `num_images` JPEGs of coloured shapes with captions (imagefolder + metadata.jsonl). Returns captions."""
    import random

    from PIL import Image, ImageDraw

    from utils.data import write_metadata_jsonl

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
    from utils.sd_builder import build_pipeline

    tag = f"{args.preset}-{args.resolution}-{args.num_images}-{args.seed}"
    data_dir = os.path.join(workdir, f"data-{tag}")
    pipeline_dir = os.path.join(workdir, f"pipeline-{tag}")
    if not os.path.isfile(os.path.join(data_dir, "metadata.jsonl")):
        captions = make_imagefolder(data_dir, args.num_images, args.image_size or round(args.resolution * 1.25), args.seed)
    else:
        captions = [json.loads(line)["text"] for line in open(os.path.join(data_dir, "metadata.jsonl"), encoding="utf-8")]
    if not os.path.isfile(os.path.join(pipeline_dir, "model_index.json")):
        if args.preset == "sd-small":
            from utils.sd_builder import assemble_pipeline, build_components

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
        ours.append({"name": "ours", "script": OUR_SCRIPT, "extra": args.extra_args.split()})
    if args.cache in ("on", "both"):
        ours.append({"name": "ours+cache", "script": OUR_SCRIPT,
                     "extra": args.extra_args.split() + ["--precompute", "--latent_cache_dir", os.path.join(workdir, "latent_cache")]})
    reference = [{"name": "reference", "script": os.path.abspath(args.reference), "extra": [],
                  "pythonpath": args.reference_pythonpath}] if args.reference else []
    return ours + reference


# ----------------------------------------------------------------------------------------------
# Runs and metrics
# ----------------------------------------------------------------------------------------------

def run_once(variant: dict, flags: list[str], workdir: str, run_id: str, threads: int | None = None) -> dict:
    timing_path = os.path.join(workdir, f"timing-{run_id}.json")
    log_path = os.path.join(workdir, f"log-{run_id}.txt")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (variant.get("pythonpath"), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, STEP_TIMER, "--out", timing_path, variant["script"]] + flags + variant["extra"]
    started = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        result = subprocess.run(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = open(log_path, encoding="utf-8", errors="replace").read()[-4000:]
        raise RuntimeError(f"{variant['name']} run failed (exit {result.returncode}); log {log_path}:\n{tail}")
    timing = json.load(open(timing_path, encoding="utf-8"))
    timing["wall_s"] = time.perf_counter() - started
    return timing


def run_metrics(timing: dict, warmup: int, steps: int) -> dict:
    """Steady-state numbers of one run from its step-end timestamps."""
    stamps = timing["timestamps"]
    if len(stamps) < warmup + steps:
        raise RuntimeError(f"expected {warmup + steps} step timestamps, got {len(stamps)} (did the script use a 'Steps' tqdm bar?)")
    measured = stamps[warmup - 1:warmup + steps]
    intervals = [b - a for a, b in zip(measured, measured[1:])]
    cpu = timing["cpu_timestamps"][warmup - 1:warmup + steps]
    return {"steps_per_s": steps / (measured[-1] - measured[0]), "intervals": intervals,
            "steps_per_cpu_s": steps / max(cpu[-1] - cpu[0], 1e-9),
            "startup_s": stamps[0] - timing["start_time"], "wall_s": timing["wall_s"],
            "peak_rss_bytes": timing["peak_rss_bytes"], "cuda_max_allocated_bytes": timing["cuda_max_allocated_bytes"]}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(runs: list[dict], batch_size: int, flops_per_step: float | None, peak_tflops: float | None) -> dict:
    intervals = [i for run in runs for i in run["intervals"]]
    steps_per_s = statistics.median(run["steps_per_s"] for run in runs)
    summary = {
        "runs": len(runs), "steps_per_s": steps_per_s, "samples_per_s": steps_per_s * batch_size,
        "step_time_median_ms": 1000 * statistics.median(intervals), "step_time_p90_ms": 1000 * percentile(intervals, 0.9),
        "steps_per_s_each_run": [run["steps_per_s"] for run in runs],
        "steps_per_cpu_s": statistics.median(run["steps_per_cpu_s"] for run in runs),
        "startup_s_each_run": [run["startup_s"] for run in runs],
        "peak_rss_mib": max(run["peak_rss_bytes"] for run in runs) / 2**20,
        "gpu_max_allocated_mib": (max(run["cuda_max_allocated_bytes"] for run in runs) / 2**20
                                  if runs[0]["cuda_max_allocated_bytes"] is not None else None),
    }
    if flops_per_step:
        summary["achieved_tflops"] = flops_per_step * steps_per_s / 1e12
        summary["mfu"] = summary["achieved_tflops"] / peak_tflops if peak_tflops else None
    return summary


def count_flops(pipeline_dir: str, batch_size: int, resolution: int) -> dict:
    """FLOPs per step (torch.utils.flop_counter on the meta device, nothing is computed):
    {"unet_train": UNet forward + backward, "vae_encode": VAE encoder forward} at this batch size."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig

    try:
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(os.path.join(pipeline_dir, "unet")))
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(os.path.join(pipeline_dir, "vae")))
            text_config = CLIPTextConfig.from_pretrained(os.path.join(pipeline_dir, "text_encoder"))
            latent = resolution // 2 ** (len(vae.config.block_out_channels) - 1)
            sample = torch.randn(batch_size, unet.config.in_channels, latent, latent)
            timesteps = torch.randint(0, 1000, (batch_size,))
            states = torch.randn(batch_size, text_config.max_position_embeddings, text_config.hidden_size)
            with FlopCounterMode(display=False) as counter:
                unet(sample, timesteps, states, return_dict=False)[0].float().pow(2).mean().backward()
            flops = {"unet_train": float(counter.get_total_flops())}
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                vae.encode(torch.randn(batch_size, 3, resolution, resolution))
            flops["vae_encode"] = float(counter.get_total_flops())
        return flops
    except Exception as error:  # a FLOP count is a nicety: never fail the benchmark for it
        print(f"(FLOP count unavailable: {type(error).__name__}: {error})")
        return {}


def machine_description() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    try:
        for line in open("/proc/cpuinfo", encoding="ascii", errors="replace"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    return info


def default_peak_tflops(machine: dict) -> float | None:
    gpu = machine.get("gpu", "")
    return next((peak for name, peak in PEAK_TFLOPS.items() if name in gpu), None)


def markdown_table(result: dict) -> str:
    rows = ["| variant | steps/s | samples/s | step median (ms) | step p90 (ms) | peak RSS (MiB) | GPU max alloc (MiB) "
            "| TFLOP/s | MFU | vs reference | vs reference (CPU time) |", "|" + "---|" * 11]
    for name, s in result["variants"].items():
        ratio, cpu_ratio = result["ratios"].get(name), result["cpu_time_ratios"].get(name)
        gpu = f"{s['gpu_max_allocated_mib']:.0f}" if s.get("gpu_max_allocated_mib") is not None else "-"
        tflops = f"{s['achieved_tflops']:.4f}" if s.get("achieved_tflops") is not None else "-"
        mfu = f"{100 * s['mfu']:.1f}%" if s.get("mfu") is not None else "-"
        rows.append(f"| {name} | {s['steps_per_s']:.3f} | {s['samples_per_s']:.2f} | {s['step_time_median_ms']:.1f} "
                    f"| {s['step_time_p90_ms']:.1f} | {s['peak_rss_mib']:.0f} | {gpu} | {tflops} | {mfu} "
                    f"| {f'{ratio:.2f}x' if ratio else '-'} | {f'{cpu_ratio:.2f}x' if cpu_ratio else '-'} |")
    return "\n".join(rows)


def main(argv=None) -> dict:
    args = parse_args(argv)
    workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="bench-t2i-"))
    os.makedirs(workdir, exist_ok=True)
    data_dir, pipeline_dir = prepare_inputs(args, workdir)
    machine = machine_description()
    runs: dict[str, list[dict]] = {}
    all_variants = variants(args, workdir)
    for repeat in range(args.repeats):
        for variant in all_variants:
            run_id = f"{variant['name'].replace('+', '_')}-{repeat}"
            output_dir = os.path.join(workdir, f"out-{run_id}")
            timing = run_once(variant, common_flags(args, data_dir, pipeline_dir, output_dir), workdir, run_id, args.threads)
            metrics = run_metrics(timing, args.warmup_steps, args.steps)
            runs.setdefault(variant["name"], []).append(metrics)
            print(f"[{variant['name']} run {repeat + 1}/{args.repeats}] {metrics['steps_per_s']:.3f} steps/s "
                  f"(start-up {metrics['startup_s']:.1f}s)", flush=True)
    flop_counts = count_flops(pipeline_dir, args.batch_size, args.resolution)
    flops = flop_counts.get("unet_train")
    peak = args.peak_tflops or default_peak_tflops(machine)
    summaries = {name: summarize(r, args.batch_size, flops, peak) for name, r in runs.items()}
    reference = summaries.get("reference")
    ratios = {name: s["steps_per_s"] / reference["steps_per_s"] for name, s in summaries.items()
              if reference and name != "reference"}
    cpu_ratios = {name: s["steps_per_cpu_s"] / reference["steps_per_cpu_s"] for name, s in summaries.items()
                  if reference and name != "reference"}
    result = {"name": args.name or f"t2i-{args.preset}-{args.resolution}px-b{args.batch_size}",
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine,
              "settings": {k: v for k, v in vars(args).items() if k not in ("workdir", "results_dir")},
              "unet_train_flops_per_step": flops, "vae_encode_flops_per_step": flop_counts.get("vae_encode"), "peak_tflops": peak, "variants": summaries, "ratios": ratios,
              "cpu_time_ratios": cpu_ratios,
              "command": "python benchmarks/bench_text_to_image.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    table = markdown_table(result)
    print(f"\n{result['name']}: preset={args.preset} resolution={args.resolution} batch={args.batch_size} "
          f"measured {args.steps} steps after {args.warmup_steps} warm-up, {args.repeats} run(s) each")
    if flops:
        print(f"FLOPs per step: UNet forward+backward {flops / 1e9:.2f} GFLOP, VAE encode "
              f"{flop_counts.get('vae_encode', 0) / 1e9:.2f} GFLOP (what --cache_latents removes)")
    print(table)
    if args.results_dir:
        os.makedirs(args.results_dir, exist_ok=True)
        with open(os.path.join(args.results_dir, result["name"] + ".json"), "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
        with open(os.path.join(args.results_dir, result["name"] + ".md"), "w", encoding="utf-8") as handle:
            handle.write(f"# {result['name']}\n\n`{result['command']}`\n\n{machine}\n\n{table}\n")
    return result


if __name__ == "__main__":
    main()
