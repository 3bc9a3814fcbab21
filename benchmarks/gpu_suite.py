#!/usr/bin/env python
"""The GPU acceptance suite: correctness of the GPU paths, speed side by side with a reference, the main job.

    bash benchmarks/gpu_suite.sh OUT                # on a CUDA machine (about 8 minutes on one H200)
    bash benchmarks/gpu_suite.sh --dry-run OUT      # every part on the CPU with tiny shapes (the test suite runs it)
    bash benchmarks/gpu_suite.sh --prepare          # here: download the wheels the device image lacks

Every part runs as its own process with a time limit and reports pass / fail / skip with the reason and its
figures (loss, images/s, MFU, ...); one failing part never stops the others. OUT gets results.json (one entry per
part) and results.md (a table). Parts that need what the machine lacks (CUDA, bitsandbytes, xformers, deepspeed,
the reference script) are skipped with that reason. docs/PERFORMANCE.md has the device command.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

MONITOR_ENV = "TRAIN_DEBUG_MONITOR_DIR"  # utils.telemetry.HealthMonitor.RECORD_ENV: every logged value, per rank


@dataclass
class Part:
    name: str
    group: str  # correctness | speed | main job
    argv: list[str]  # after `python`
    needs: tuple = ()  # cuda, bitsandbytes, xformers, deepspeed, reference
    check: str = "train"  # how the output is judged: train | bench | kanji
    sample: bool = False  # also load the output with generate.py and check its image is not degenerate
    output: str | None = None  # the run's --output_dir
    timeout: int = 300
    dry_skip: str | None = None  # why a dry run leaves this part out
    resume_to: int | None = None  # then run again to this step count with --resume_from_checkpoint latest
    figures: dict = field(default_factory=dict)


def missing(needs, reference: str | None) -> str | None:
    import torch

    for need in needs:
        if need == "cuda" and not torch.cuda.is_available():
            return "needs CUDA"
        if need == "reference" and not (reference and os.path.isfile(reference)):
            return "no reference script (--reference, copied in by --prepare)"
        if need in ("bitsandbytes", "xformers", "deepspeed") and importlib.util.find_spec(need) is None:
            return f"{need} is not installed"
    return None


def train_argv(work: str, name: str, dry: bool, extra: list[str], preset: str | None = None) -> list[str]:
    """train_text_to_image.py on the suite's data from a randomly initialised pipeline of the SD-1.5 shape (preset
    base; tiny in a dry run), or `preset`'s (prepare_data builds them)."""
    return [os.path.join(REPO_ROOT, "train_text_to_image.py"), "--pretrained_model_name_or_path",
            pipeline_dir(work, preset or ("tiny" if dry else "base")),
            "--train_data_dir", os.path.join(work, "data"), "--resolution", "32" if dry else "512", "--center_crop",
            "--train_batch_size", "2" if dry else "4", "--max_train_steps", "3" if dry else "10",
            "--learning_rate", "1e-4", "--lr_warmup_steps", "0", "--seed", "0", "--report_to", "none",
            "--logging_steps", "1", "--output_dir", os.path.join(work, name), *extra]


def build_parts(work: str, dry: bool) -> list[Part]:
    t = lambda name, extra, needs=(), preset=None, **kw: Part(  # noqa: E731
        name, "correctness", train_argv(work, name, dry, extra, preset), needs, output=os.path.join(work, name), **kw)
    fp16 = [] if dry else ["--mixed_precision", "fp16"]
    bf16 = ["--mixed_precision", "bf16"]
    parts = [
        t("sd15_full_fp16", fp16 + ["--gradient_checkpointing"], () if dry else ("cuda",)),
        t("sd15_full_bf16", bf16, sample=True),
        t("lora_unet_te_fp16", fp16 + ["--use_lora", "--train_text_encoder", "--rank", "8"], sample=True),
        t("ema_offload", ["--use_ema", "--offload_ema"]),
        t("auto_batch", ["--train_batch_size", "auto"] + ([] if dry else bf16)),
        t("torch_compile", ["--torch_compile"] + bf16, dry_skip="inductor's first compile alone takes ~1 min on a CPU"),
        t("adamw_8bit", ["--use_8bit_adam"] + bf16, ("cuda", "bitsandbytes")),
        t("xformers", ["--enable_xformers_memory_efficient_attention"] + bf16, ("cuda", "xformers")),
        t("sdxl_lora", ["--use_lora"] + ([] if dry else bf16), preset="tiny-sdxl", sample=True),
        t("bf16_vs_fp32_fp32", ["--max_train_steps", "6" if dry else "20"]),
        t("bf16_vs_fp32_bf16", ["--max_train_steps", "6" if dry else "20"] + bf16),
        Part("mask_dit", "correctness", [
            os.path.join(REPO_ROOT, "train_mask_dit.py"), "--train_data_dir", os.path.join(work, "fundus"),
            "--model_size", "cpu_demo" if dry else "0.6B", "--resolution", "32" if dry else "256", "--mask_channels",
            "2", "--train_batch_size", "4", "--max_train_steps", "3" if dry else "20", "--mixed_precision", "bf16",
            "--seed", "0", "--report_to", "none", "--logging_steps", "1",
            "--output_dir", os.path.join(work, "mask_dit")],
            output=os.path.join(work, "mask_dit")),
        Part("mshnet", "correctness", [
            os.path.join(REPO_ROOT, "train_segmentation_tpu.py"), "--dataset-dir", os.path.join(work, "irstd"),
            "--batch-size", "4", "--epochs", "1", "--base_size", "64" if dry else "256", "--crop_size",
            "64" if dry else "256", "--warm_epoch", "0", "--seed", "0", "--report_to", "none", "--logging_steps", "1",
            "--output_dir", os.path.join(work, "mshnet")], output=os.path.join(work, "mshnet")),
        Part("fsdp_save_resume", "correctness", ["-m", "accelerate.commands.launch", "--config_file",
                                                  os.path.join(REPO_ROOT, "accelerate_configs", "fsdp.yaml"),
                                                  "--num_processes", "1"]
             + train_argv(work, "fsdp", dry, bf16 + ["--checkpointing_steps", "2", "--max_train_steps", "2"]),
             ("cuda",), output=os.path.join(work, "fsdp"), resume_to=4),
        Part("sd15_speed_vs_reference", "speed", [
            os.path.join(REPO_ROOT, "benchmarks", "bench_text_to_image.py"), "--preset", "tiny" if dry else "base",
            "--resolution", "32" if dry else "512", "--batch_size", "2" if dry else "32", "--warmup_steps",
            "1" if dry else "5", "--steps", "2" if dry else "20", "--repeats", "1" if dry else "2", "--cache", "on",
            "--results_dir", os.path.join(work, "bench"), "--name", "sd15",
            "--workdir", os.path.join(work, "bench_work")]
            + ([] if dry else ["--mixed_precision", "bf16"]), check="bench", timeout=600),
        Part("kanji_demo", "main job", [os.path.join(REPO_ROOT, "kanji_demo.py"), "--mode", "smoke" if dry else "gpu",
                                        "--output_dir", os.path.join(work, "kanji"),
                                        *(["--num_inference_steps", "4"] if dry else [])], check="kanji", timeout=600),
    ]
    return parts


def pipeline_dir(work: str, preset: str) -> str:
    return os.path.join(work, f"pipeline-{preset}")


def prepare_data(work: str, dry: bool) -> None:
    """Synthetic data for every part: captioned images, fundus image/mask pairs, IRSTD-layout frames; the random
    pipelines the text-to-image parts start from."""
    from benchmarks.bench_text_to_image import make_imagefolder
    from utils.sd.builder import build_pipeline

    for preset in ("tiny", "tiny-sdxl") if dry else ("base", "tiny-sdxl"):
        if not os.path.isfile(os.path.join(pipeline_dir(work, preset), "model_index.json")):
            build_pipeline(pipeline_dir(work, preset), preset=preset, seed=0)

    if not os.path.isdir(os.path.join(work, "data")):
        make_imagefolder(os.path.join(work, "data"), 16 if dry else 64, 40 if dry else 576, 0)
    python = sys.executable
    if not os.path.isdir(os.path.join(work, "fundus")):
        subprocess.run([python, "-m", "utils.mask_dit.data", "--output_dir", os.path.join(work, "fundus"),
                        "--num_images", "16" if dry else "64", "--resolution", "32" if dry else "256", "--seed", "0"],
                       check=True, cwd=REPO_ROOT, capture_output=True)
    if not os.path.isdir(os.path.join(work, "irstd")):
        subprocess.run([python, "-m", "utils.segmentation.data", "--output_dir", os.path.join(work, "irstd"),
                        "--num_train", "8" if dry else "64", "--num_test", "4" if dry else "16", "--size",
                        "64" if dry else "256", "--seed", "0"], check=True, cwd=REPO_ROOT, capture_output=True)


def monitored_losses(monitor_dir: str) -> list[float]:
    path = os.path.join(monitor_dir, "rank0.jsonl")
    if not os.path.isfile(path):
        return []
    return [entry["loss"] for entry in map(json.loads, open(path, encoding="utf-8")) if "loss" in entry]


def judge(part: Part, monitor_dir: str) -> dict:
    """The part's figures; an AssertionError says why it failed."""
    if part.check == "bench":
        result = json.load(open(os.path.join(part.argv[part.argv.index("--results_dir") + 1], "sd15.json")))
        figures = {name: {k: v.get(k) for k in ("steps_per_s", "samples_per_s", "mfu", "tflops")}
                   for name, v in result["variants"].items()}
        return {"variants": figures, "ratios": result.get("ratios")}
    if part.check == "kanji":
        summary = json.load(open(os.path.join(part.argv[part.argv.index("--output_dir") + 1], "summary.json")))
        return {k: summary[k] for k in ("vae_psnr_db", "seen_prompt_top1", "loss_true_caption",
                                        "loss_shuffled_caption", "binary_pixel_fraction", "minutes")}
    losses = monitored_losses(monitor_dir)
    assert losses, "no loss was logged"
    assert all(math.isfinite(x) for x in losses), f"non-finite loss: {losses}"
    produced = os.listdir(part.output) if part.output and os.path.isdir(part.output) else []
    assert any(n in produced for n in ("model_index.json", "pytorch_lora_weights.safetensors", "model_info.json",
                                       "best", "unet", "transformer")), f"no final weights in {part.output}: {produced}"
    figures = {"steps_logged": len(losses), "first_loss": losses[0], "last_loss": losses[-1]}
    args_file = os.path.join(part.output, "training_args.json")
    if os.path.isfile(args_file):
        figures["batch_size"] = json.load(open(args_file, encoding="utf-8"))["plan"]["batch_size"]
    if part.sample:
        figures["image_std"] = sample_std(part)
    return figures


def sample_std(part: Part) -> float:
    """generate.py loads the output (a pipeline, or the base + the LoRA) and draws one image: its pixel std."""
    import numpy as np
    from PIL import Image

    base = part.argv[part.argv.index("--pretrained_model_name_or_path") + 1]
    model = ["--model", base, "--lora", part.output] if "--use_lora" in part.argv else ["--model", part.output]
    out = os.path.join(os.path.dirname(part.output), "sample-" + part.name)
    result = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "generate.py"), *model, "--prompt", "a red circle",
                             "--steps", "4", "--num_images", "1", "--seed", "0", "--output_dir", out],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, f"generate.py could not use the output: {result.stderr[-400:]}"
    image = next(f for f in sorted(os.listdir(out)) if f.startswith("000_"))
    pixels = np.asarray(Image.open(os.path.join(out, image)), dtype=np.float32)
    assert np.isfinite(pixels).all() and pixels.std() > 1.0, "the sample is one flat colour"
    return float(pixels.std())


def run_part(part: Part, work: str, dry: bool, reference: str | None) -> dict:
    entry = {"name": part.name, "group": part.group, "status": "skip", "reason": None, "seconds": 0.0, "figures": {}}
    reason = (part.dry_skip if dry else None) or missing(part.needs, reference)
    if reason:
        entry["reason"] = reason
        return entry
    monitor_dir = os.path.join(work, "monitor", part.name)
    os.makedirs(monitor_dir, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **{MONITOR_ENV: monitor_dir})
    argv = list(part.argv)
    if part.check == "bench" and reference and os.path.isfile(reference):
        argv += ["--reference", reference]
    start = time.perf_counter()
    try:
        result = subprocess.run([sys.executable, *argv], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                                timeout=part.timeout)
        if result.returncode == 0 and part.resume_to:  # a save, then a resume from it
            result = subprocess.run([sys.executable, *argv, "--max_train_steps", str(part.resume_to),
                                     "--resume_from_checkpoint", "latest"], cwd=REPO_ROOT, env=env,
                                    capture_output=True, text=True, timeout=part.timeout)
            if result.returncode == 0 and "Resuming from checkpoint" not in result.stdout + result.stderr:
                entry.update(status="fail", reason="the second run did not resume from the first one's checkpoint")
                return entry
        entry["seconds"] = round(time.perf_counter() - start, 1)
        if result.returncode != 0:
            entry.update(status="fail", reason=f"exit {result.returncode}: " + (result.stderr or result.stdout)[-600:])
            return entry
        entry.update(status="pass", figures=judge(part, monitor_dir))
    except subprocess.TimeoutExpired:
        entry.update(status="fail", reason=f"over its {part.timeout} s limit", seconds=part.timeout)
    except (AssertionError, OSError, KeyError, ValueError) as error:
        entry.update(status="fail", reason=f"{type(error).__name__}: {error}")
    return entry


def compare_precisions(entries: dict, tolerance: float = 0.1) -> dict:
    """bf16 vs fp32 over the same steps: the mean relative difference of the per-step losses, against `tolerance`."""
    fp32, bf16 = entries.get("bf16_vs_fp32_fp32"), entries.get("bf16_vs_fp32_bf16")
    entry = {"name": "bf16_vs_fp32", "group": "correctness", "status": "skip", "reason": None, "seconds": 0.0,
             "figures": {}}
    if not fp32 or not bf16 or fp32["status"] != "pass" or bf16["status"] != "pass":
        entry["reason"] = "needs both runs to pass"
        return entry
    a, b = fp32["figures"]["losses"], bf16["figures"]["losses"]
    difference = sum(abs(x - y) / max(abs(x), 1e-8) for x, y in zip(a, b)) / len(a)
    entry["figures"] = {"mean_relative_difference": difference, "tolerance": tolerance, "steps": len(a)}
    entry.update(status="pass" if difference <= tolerance else "fail",
                 reason=None if difference <= tolerance else f"bf16 and fp32 losses differ by {difference:.1%}")
    return entry


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="Folder for results.json and results.md (and the runs, under work/).")
    parser.add_argument("--dry_run", "--dry-run", action="store_true", help="Tiny shapes on the CPU.")
    parser.add_argument("--reference", default=os.path.join(REPO_ROOT, "benchmarks", "gpu_suite_assets",
                                                            "train_text_to_image.py"),
                        help="diffusers' examples/text_to_image/train_text_to_image.py for the speed ratio.")
    parser.add_argument("--only", nargs="*", default=None, help="Run only these parts.")
    args = parser.parse_args(argv)
    work = os.path.join(args.out, "work")
    os.makedirs(work, exist_ok=True)
    prepare_data(work, args.dry_run)
    entries = {}
    for part in build_parts(work, args.dry_run):
        if args.only and part.name not in args.only:
            continue
        entries[part.name] = run_part(part, work, args.dry_run, args.reference)
        if part.name.startswith("bf16_vs_fp32_") and entries[part.name]["status"] == "pass":
            entries[part.name]["figures"]["losses"] = monitored_losses(os.path.join(work, "monitor", part.name))
        print(f"[{entries[part.name]['status']:>4}] {part.name} ({entries[part.name]['seconds']} s)"
              + (f": {entries[part.name]['reason']}" if entries[part.name]["reason"] else ""), flush=True)
    if "bf16_vs_fp32_fp32" in entries:
        entries["bf16_vs_fp32"] = compare_precisions(entries)
    import torch

    result = {"dry_run": args.dry_run, "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "parts": list(entries.values())}
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)
    lines = ["| part | group | status | seconds | figures / reason |", "| --- | --- | --- | --- | --- |"]
    for e in entries.values():
        shown = {k: v for k, v in e["figures"].items() if k != "losses"}
        lines.append(f"| {e['name']} | {e['group']} | {e['status']} | {e['seconds']} | "
                     f"{json.dumps(shown) if e['status'] == 'pass' else e['reason']} |")
    with open(os.path.join(args.out, "results.md"), "w", encoding="utf-8") as handle:
        handle.write(f"GPU suite {'dry run ' if args.dry_run else ''}on {result['device']}, {result['date']}\n\n"
                     + "\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
