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
import concurrent.futures
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

ASSETS = os.path.join(REPO_ROOT, "benchmarks", "gpu_suite_assets")  # git-ignored: what --prepare fetches
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
    resume_check: str | None = None  # weights folder compared after: 4 steps straight vs 2 + a resume to 4
    figures: dict = field(default_factory=dict)
    on_request: bool = False  # on a GPU only when --only names it (its own device call); always in a dry run


# ---------------------------------------------------------------------------------------------- carrying
# The device image (KINDS.md of the device tool, read 2026-11-17): Python 3.12 on Linux x86_64 with torch 2.11
# (CUDA 13), accelerate, transformers, peft, torchvision, tensorboard, safetensors, numpy, pandas, pyarrow, ...; not
# diffusers, datasets, bitsandbytes, xformers, deepspeed, pydantic or our optimizers. Our pins of the libraries
# we call are carried too (the suite tests the versions the CPU suite passed with), with the dependencies that
# benchmarks/device_image_packages.txt (the image's package list) does not name.
DEVICE_PYTHON = "3.12"
DEVICE_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
                    "manylinux2014_x86_64", "manylinux1_x86_64", "linux_x86_64")  # pip does not widen a manylinux tag
CARRIED = ("diffusers", "datasets", "transformers", "tokenizers", "huggingface_hub", "prodigyopt", "pydantic", "hjson")
# These name torch as a dependency (pip would fetch CUDA torch for it): their own wheel only, the rest is above.
CARRIED_NO_DEPS = ("accelerate", "peft", "schedulefree", "bitsandbytes")
XFORMERS = "xformers==0.0.35"  # a py3 wheel on PyTorch's own kernels, for torch >= 2.10 (the image has 2.11)
BATCH_BYTES = 50 * 2**20  # a device call carries at most 64 MiB with the tree


def image_packages() -> set[str]:
    """benchmarks/device_image_packages.txt: what the device image already has (normalised names)."""
    with open(os.path.join(REPO_ROOT, "benchmarks", "device_image_packages.txt"), encoding="utf-8") as handle:
        return {normalised(line) for line in handle if line.strip() and not line.startswith("#")}


def normalised(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(".", "_")


def unmet_requirements(folders: list[str]) -> dict[str, list[str]]:
    """{wheel: its requirements (no extras; markers for the image's Python on Linux) that neither a carried wheel nor
    the image provides}: empty when installing the carried wheels with --no-deps gives a complete environment."""
    import zipfile

    from packaging.requirements import Requirement

    wheels = [os.path.join(f, n) for f in folders for n in sorted(os.listdir(f)) if n.endswith(".whl")]
    have = {project_of(os.path.basename(w)) for w in wheels} | image_packages()
    environment = {"python_version": DEVICE_PYTHON, "python_full_version": DEVICE_PYTHON + ".3",
                   "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "extra": ""}
    unmet = {}
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
            lines = archive.read(metadata).decode("utf-8").splitlines()
        for line in lines:
            if line.startswith("Requires-Dist:"):
                requirement = Requirement(line.split(":", 1)[1])
                if (requirement.marker is None or requirement.marker.evaluate(environment)) \
                        and normalised(requirement.name) not in have:
                    unmet.setdefault(os.path.basename(wheel), []).append(requirement.name)
    return unmet


def project_of(wheel: str) -> str:
    return normalised(wheel.split("-")[0])


def batches_of(sizes: dict[str, int], limit: int = BATCH_BYTES) -> list[list[str]]:
    """Wheels into folders of at most `limit` bytes (largest first, first fit); a wheel over `limit` alone."""
    batches: list[list] = []
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        batch = next((b for b in batches if b[0] + sizes[name] <= limit), None)
        if batch is None:
            batches.append(batch := [0, []])
        batch[0] += sizes[name]
        batch[1].append(name)
    return [names for _, names in batches]


def pinned(name: str) -> str:
    """`name==version` from requirements.lock (or the bare name when the lock does not have it)."""
    with open(os.path.join(REPO_ROOT, "requirements.lock"), encoding="utf-8") as handle:
        for line in handle:
            if line.split("==")[0].strip().lower().replace("-", "_") == name.lower().replace("-", "_"):
                return line.strip()
    return name


def fetch_reference_script(destination: str) -> str:
    """diffusers' examples/text_to_image/train_text_to_image.py (not in its wheel or sdist): from a diffusers git
    checkout named by $DIFFUSERS_REPO, else from GitHub at the tag of requirements.lock's version."""
    import urllib.request

    path = "examples/text_to_image/train_text_to_image.py"
    repo = os.environ.get("DIFFUSERS_REPO")
    if repo:
        shown = subprocess.run(["git", "-C", repo, "show", f"HEAD:{path}"], capture_output=True, text=True)
        if shown.returncode != 0 and os.path.isfile(os.path.join(repo, path)):
            shown = subprocess.CompletedProcess([], 0, open(os.path.join(repo, path), encoding="utf-8").read())
        if shown.returncode == 0:
            open(destination, "w", encoding="utf-8").write(shown.stdout)
            return f"from {repo} (HEAD)"
    url = f"https://raw.githubusercontent.com/huggingface/diffusers/v{pinned('diffusers').split('==')[-1]}/{path}"
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            open(destination, "wb").write(response.read())
        return f"from {url}"
    except OSError as error:
        return (f"not fetched ({url}: {error}); set DIFFUSERS_REPO to a diffusers checkout, or place it at "
                f"{destination}: the speed part then runs without the reference ratio")


def prepare(assets: str) -> dict:
    """The device call's luggage, in `assets` (git-ignored): wheels/1, wheels/2, ... (<= 50 MiB each, one device call
    each: docs/PERFORMANCE.md) for the image's Python and platform, at requirements.lock's versions with the
    dependencies the image lacks (gpu_suite.sh installs them all with --no-deps), and train_text_to_image.py."""
    import glob
    import shutil
    import tempfile

    download = tempfile.mkdtemp(prefix="gpu-suite-wheels-")
    target = ["--python-version", DEVICE_PYTHON, *[f"--platform={p}" for p in DEVICE_PLATFORMS],
              "--only-binary=:all:", "-d", download]
    report = {"failed": []}
    lock = ["-c", os.path.join(REPO_ROOT, "requirements.lock")]
    steps = [("pinned libraries", ["download", "-q", *target, *lock, *map(pinned, CARRIED)])]
    steps += [(name, ["download", "-q", "--no-deps", *target, pinned(name)]) for name in CARRIED_NO_DEPS]
    steps += [("xformers", ["download", "-q", "--no-deps", *target, XFORMERS]),
              # DeepSpeed is an sdist whose build imports torch: built here against ours into a py3 wheel (its
              # kernels compile on first use there); its dependencies come with the pinned libraries above.
              ("deepspeed", ["wheel", "-q", "--no-deps", "--no-build-isolation", "-w", download, pinned("deepspeed")])]
    for label, arguments in steps:
        done = subprocess.run([sys.executable, "-m", "pip", *arguments], capture_output=True, text=True,
                              env=dict(os.environ, DS_BUILD_OPS="0"))
        if done.returncode != 0:
            report["failed"].append(label)
            print(f"could not fetch {label} (its parts will be skipped): "
                  + next((line for line in done.stderr.splitlines() if "ERROR" in line), done.stderr[-300:]))
    wanted = {normalised(n) for n in CARRIED + CARRIED_NO_DEPS + ("xformers", "deepspeed")}
    on_image = image_packages() - wanted  # a dependency the image has is not carried; our pinned libraries are
    wheels = {n: os.path.getsize(os.path.join(download, n)) for n in os.listdir(download)
              if n.endswith(".whl") and project_of(n) not in on_image}
    shutil.rmtree(os.path.join(assets, "wheels"), ignore_errors=True)
    for index, names in enumerate(batches_of(wheels), start=1):
        folder = os.path.join(assets, "wheels", str(index))
        os.makedirs(folder)
        for name in names:
            shutil.move(os.path.join(download, name), os.path.join(folder, name))
        size = sum(wheels[n] for n in names)
        report[folder] = {"wheels": sorted(names), "mib": round(size / 2**20, 1)}
        print(f"{folder}: {size / 2**20:.0f} MiB, {len(names)} wheels")
    shutil.rmtree(download, ignore_errors=True)
    report["unmet"] = unmet_requirements(sorted(glob.glob(os.path.join(assets, "wheels", "*"))))
    if report["unmet"]:
        print(f"requirements neither carried nor in the image (install would be incomplete): {report['unmet']}")
    report["reference"] = fetch_reference_script(os.path.join(assets, "train_text_to_image.py"))
    print(f"reference script {report['reference']}")
    return report


def reference_problem(reference: str | None) -> str | None:
    """Why diffusers' script cannot run here (it needs torchvision, which this project does not), or None."""
    if not (reference and os.path.isfile(reference)):
        return "no reference script (--reference, copied in by --prepare)"
    if importlib.util.find_spec("torchvision") is None:
        return "the reference script needs torchvision, which is not installed"
    return None


def missing(needs, reference: str | None) -> str | None:
    import torch

    for need in needs:
        if need == "cuda" and not torch.cuda.is_available():
            return "needs CUDA"
        if need == "reference" and reference_problem(reference):
            return reference_problem(reference)
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
        Part("mask_dit", "correctness", mask_dit_argv(work, "mask_dit", dry, ["--max_train_steps", "3" if dry else "20"]),
             output=os.path.join(work, "mask_dit")),
        Part("mshnet", "correctness", [
            os.path.join(REPO_ROOT, "train_segmentation_tpu.py"), "--dataset-dir", os.path.join(work, "irstd"),
            "--batch-size", "4", "--epochs", "1", "--base_size", "64" if dry else "256", "--crop_size",
            "64" if dry else "256", "--warm_epoch", "0", "--seed", "0", "--report_to", "none", "--logging_steps", "1",
            "--output_dir", os.path.join(work, "mshnet")], output=os.path.join(work, "mshnet")),
        # accelerate's FSDP2 (fsdp.yaml, made for the mask DiT's blocks) and DeepSpeed ZeRO-2 (deepspeed_zero2.yaml;
        # DeepSpeed also runs on its CPU accelerator, so the dry run does it too): a save and an exact resume each.
        # Smaller models than the parts above (the ultrafast DiT, the small SD UNet): each writes three checkpoints
        # with optimizer state, and the point is the sharded save and the exact resume, not the size.
        Part("fsdp_save_resume", "correctness", launch_argv("fsdp.yaml") + mask_dit_argv(
            work, "fsdp", dry, model_size="ultrafast"), ("cuda",), output=os.path.join(work, "fsdp"),
             resume_check="transformer"),
        Part("deepspeed_zero2_save_resume", "correctness", launch_argv("deepspeed_zero2.yaml")
             + train_argv(work, "deepspeed", dry, ["--use_ema"], preset=None if dry else "small"), ("deepspeed",),
             output=os.path.join(work, "deepspeed"), resume_check="unet"),
        Part("bf16_matmul_peak", "speed", [os.path.abspath(__file__), "--measure_matmul", "512" if dry else "8192"],
             check="peak", timeout=120),
        Part("sd15_speed_vs_reference", "speed", [
            os.path.join(REPO_ROOT, "benchmarks", "bench_text_to_image.py"), "--preset", "tiny" if dry else "base",
            "--resolution", "32" if dry else "512", "--batch_size", "2" if dry else "32", "--warmup_steps",
            "1" if dry else "5", "--steps", "2" if dry else "20", "--repeats", "1" if dry else "2", "--cache", "on",
            "--results_dir", os.path.join(work, "bench"), "--name", "sd15",
            "--workdir", os.path.join(work, "bench_work")]
            + ([] if dry else ["--mixed_precision", "bf16"]), check="bench", timeout=600),
        Part("mask_dit_speed", "speed", [
            os.path.join(REPO_ROOT, "benchmarks", "bench_mask_dit.py"), "--model_size", "tiny" if dry else "0.6B",
            "--resolution", "32" if dry else "256", *([] if dry else ["--latent", "--vae_preset", "base", "--cache", "on",
                                                                      "--mixed_precision", "bf16"]),
            "--batch_size", "4" if dry else "32", "--warmup_steps", "1" if dry else "5", "--steps", "2" if dry else "20",
            "--results_dir", os.path.join(work, "bench"), "--name", "mask_dit", "--workdir",
            os.path.join(work, "bench_mask_dit")], check="bench", timeout=600),
        Part("mshnet_speed", "speed", [
            os.path.join(REPO_ROOT, "benchmarks", "bench_segmentation.py"), "--crop_size", "64" if dry else "256",
            "--base_size", "64" if dry else "256", "--image_size", "64" if dry else "256",
            "--batch_size", "4" if dry else "64", "--warmup_steps", "1" if dry else "5", "--steps", "2" if dry else "30",
            *([] if dry else ["--mixed_precision", "bf16", "--dataloader_num_workers", "8"]),
            "--results_dir", os.path.join(work, "bench"), "--name", "mshnet", "--workdir",
            os.path.join(work, "bench_mshnet")], check="bench", timeout=600),
        # Issue 31's GPU runs, each its own device call (--only; the 12B FLUX alone takes minutes to build and load):
        # LoRA on FLUX.1-dev's shape at 512 px and SD3.5-medium's at 1024 px, bf16, cached: images/s, peak memory.
        Part("flux_lora_512_speed", "speed", flow_bench_argv(work, "flux", dry), check="bench", timeout=600,
             on_request=True),
        Part("sd35_medium_1024_speed", "speed", flow_bench_argv(work, "sd3", dry), check="bench", timeout=600,
             on_request=True),
        Part("kanji_demo", "main job", [os.path.join(REPO_ROOT, "kanji_demo.py"), "--mode", "smoke" if dry else "gpu",
                                        "--output_dir", os.path.join(work, "kanji"),
                                        *(["--num_inference_steps", "4"] if dry else [])], check="kanji", timeout=600),
    ]
    return parts


def flow_bench_argv(work: str, family: str, dry: bool) -> list[str]:
    """benchmarks/bench_flow_families.py, ours with the caches: the released model's shape on a GPU (FLUX.1-dev at
    512 px with 512 T5 tokens, SD3.5-medium at 1024 px with 77, bf16, gradient checkpointing, batch 1), the tiny
    pipeline at 32 px in a dry run."""
    resolution = "32" if dry else {"flux": "512", "sd3": "1024"}[family]
    return [os.path.join(REPO_ROOT, "benchmarks", "bench_flow_families.py"), "--family", family,
            "--size", "tiny" if dry else "full", "--resolution", resolution, "--batch_size", "1", "--cache", "on",
            "--max_sequence_length", "512" if family == "flux" and not dry else "77",
            "--warmup_steps", "1" if dry else "3", "--steps", "2" if dry else "10", "--num_images", "4",
            "--results_dir", os.path.join(work, "bench"), "--name", f"{family}_lora",
            "--workdir", os.path.join(work, f"bench_{family}")] \
        + ([] if dry else ["--mixed_precision", "bf16", "--extra_args", "--gradient_checkpointing"])


def launch_argv(config: str) -> list[str]:
    """`accelerate launch` with one of accelerate_configs/, one process."""
    return ["-m", "accelerate.commands.launch", "--config_file", os.path.join(REPO_ROOT, "accelerate_configs", config),
            "--num_processes", "1"]


def mask_dit_argv(work: str, name: str, dry: bool, extra=(), model_size: str = "0.6B") -> list[str]:
    """train_mask_dit.py on the fundus pairs: the 0.6B preset at 256 px (guide 003's), cpu_demo at 32 px dry."""
    return [os.path.join(REPO_ROOT, "train_mask_dit.py"), "--train_data_dir", os.path.join(work, "fundus"),
            "--model_size", "cpu_demo" if dry else model_size, "--resolution", "32" if dry else "256", "--mask_channels",
            "2", "--train_batch_size", "4", "--mixed_precision", "bf16", "--seed", "0", "--report_to", "none",
            "--logging_steps", "1", "--output_dir", os.path.join(work, name), *extra]


def pipeline_dir(work: str, preset: str) -> str:
    return os.path.join(work, f"pipeline-{preset}")


def prepare_data(work: str, dry: bool) -> None:
    """Synthetic data for every part: captioned images, fundus image/mask pairs, IRSTD-layout frames; the random
    pipelines the text-to-image parts start from."""
    from benchmarks.bench_text_to_image import make_imagefolder
    from utils.sd.builder import build_pipeline

    for preset in ("tiny", "tiny-sdxl") if dry else ("base", "small", "tiny-sdxl"):
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


def judge(part: Part, monitor_dir: str, stdout: str) -> dict:
    """The part's figures; an AssertionError says why it failed."""
    if part.check == "bench":
        result = json.load(open(os.path.join(part.argv[part.argv.index("--results_dir") + 1],
                                             part.argv[part.argv.index("--name") + 1] + ".json")))
        figures = {name: {k: v.get(k) for k in ("steps_per_s", "samples_per_s", "achieved_tflops", "mfu",
                                                  "gpu_max_allocated_mib")}
                   for name, v in result["variants"].items()}
        return {"variants": figures, "ratios": result.get("ratios"), "peak_tflops": result.get("peak_tflops")}
    if part.check == "peak":
        return json.loads(stdout.strip().splitlines()[-1])
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


def run(argv: list[str], env: dict, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def with_output_dir(argv: list[str], output_dir: str) -> list[str]:
    argv = list(argv)
    argv[argv.index("--output_dir") + 1] = output_dir
    return argv


def max_difference(a_dir: str, b_dir: str) -> float:
    """The largest absolute difference between the same tensors of two saved weight folders."""
    import glob

    from safetensors.torch import load_file

    a, b = (load_file(sorted(glob.glob(os.path.join(d, "*.safetensors")))[0]) for d in (a_dir, b_dir))
    assert a.keys() == b.keys(), "the two runs saved different tensors"
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def resume_check(part: Part, env: dict) -> dict:
    """4 steps straight (a save at 2), then 2 + a resume from a copy of that save to 4: the losses of steps 3-4 and the
    final weights compared (bitwise is reported; passing allows 1e-4 relative on the losses, for GPU kernels whose
    reductions are not deterministic)."""
    import shutil

    straight, resumed = part.output, part.output + "-resumed"
    steps = ["--max_train_steps", "4", "--checkpointing_steps", "2"]
    first = run([*part.argv, *steps], env, part.timeout)
    assert first.returncode == 0, f"exit {first.returncode}: " + (first.stderr or first.stdout)[-600:]
    shutil.rmtree(resumed, ignore_errors=True)
    os.makedirs(resumed)
    shutil.copytree(os.path.join(straight, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    monitor = env[MONITOR_ENV] + "-resumed"
    os.makedirs(monitor, exist_ok=True)
    second = run([*with_output_dir(part.argv, resumed), *steps, "--resume_from_checkpoint", "latest"],
                 dict(env, **{MONITOR_ENV: monitor}), part.timeout)
    assert second.returncode == 0, f"resume: exit {second.returncode}: " + (second.stderr or second.stdout)[-600:]
    a, b = monitored_losses(env[MONITOR_ENV])[2:], monitored_losses(monitor)
    assert len(a) == len(b) == 2, f"expected steps 3-4 in both runs, got {a} and {b}"
    loss_difference = max(abs(x - y) / max(abs(x), 1e-8) for x, y in zip(a, b))
    weight_difference = max_difference(os.path.join(straight, part.resume_check), os.path.join(resumed, part.resume_check))
    assert loss_difference <= 1e-4, f"the resumed run's losses {b} differ from the straight run's {a}"
    return {"losses_straight": a, "losses_resumed": b, "max_loss_relative_difference": loss_difference,
            "max_weight_difference": weight_difference, "bitwise": loss_difference == 0 and weight_difference == 0}


def run_part(part: Part, work: str, dry: bool, reference: str | None, peak_tflops: float | None = None) -> dict:
    entry = {"name": part.name, "group": part.group, "status": "skip", "reason": None, "seconds": 0.0, "figures": {}}
    reason = (part.dry_skip if dry else None) or missing(part.needs, reference)
    if reason:
        entry["reason"] = reason
        return entry
    monitor_dir = os.path.join(work, "monitor", part.name)
    os.makedirs(monitor_dir, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **{MONITOR_ENV: monitor_dir})
    argv = list(part.argv)
    if part.check == "bench" and "bench_text_to_image" in argv[0]:
        usable = reference_problem(reference)
        if usable is None:
            argv += ["--reference", reference]
        else:
            entry["reason"] = f"without the reference ratio: {usable}"
    if part.check == "bench" and peak_tflops:  # MFU against the matrix rate measured on this machine, this run
        argv += ["--peak_tflops", str(peak_tflops)]
    start = time.perf_counter()
    try:
        if part.resume_check:
            figures = resume_check(part, env)
            entry.update(status="pass", seconds=round(time.perf_counter() - start, 1), figures=figures)
            return entry
        result = run(argv, env, part.timeout)
        entry["seconds"] = round(time.perf_counter() - start, 1)
        if result.returncode != 0:
            entry.update(status="fail", reason=f"exit {result.returncode}: " + (result.stderr or result.stdout)[-600:])
            return entry
        entry.update(status="pass", figures=judge(part, monitor_dir, result.stdout))
    except subprocess.TimeoutExpired:
        entry.update(status="fail", reason=f"over its {part.timeout} s limit", seconds=part.timeout)
    except (AssertionError, OSError, KeyError, ValueError) as error:
        entry.update(status="fail", reason=f"{type(error).__name__}: {error}",
                     seconds=round(time.perf_counter() - start, 1))
    return entry


def measure_matmul(size: int, repeats: int = 10) -> dict:
    """The bf16 matrix rate of this machine, for MFU: `size`^3 products on random data after 3 warm-ups (CUDA events
    on a GPU, wall clock on the CPU)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    if device == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(repeats):
            a @ b
        end.record()
        torch.cuda.synchronize()
        seconds = begin.elapsed_time(end) / 1000
    else:
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        seconds = time.perf_counter() - started
    return {"bf16_matmul_tflops": 2 * size**3 * repeats / seconds / 1e12, "size": size, "device": device}


# Pairs of parts whose per-step losses are compared: (entry name, first part, second part, tolerance, what differs).
# The same seed, data and steps in each pair; only the precision, or the attention kernel, differs.
COMPARED = [("bf16_vs_fp32", "bf16_vs_fp32_fp32", "bf16_vs_fp32_bf16", 0.1, "bf16 and fp32"),
            ("xformers_vs_sdpa", "sd15_full_bf16", "xformers", 0.05, "xformers' and PyTorch SDPA's attention")]
LOSS_CURVES = {part for _, first, second, _, _ in COMPARED for part in (first, second)}


def compare_losses(entries: dict, name: str, first: str, second: str, tolerance: float, what: str) -> dict:
    """Two runs over the same steps: the mean relative difference of their per-step losses, against `tolerance`;
    and the second's wall time relative to the first's."""
    a_entry, b_entry = entries.get(first), entries.get(second)
    entry = {"name": name, "group": "correctness", "status": "skip", "reason": None, "seconds": 0.0, "figures": {}}
    if not a_entry or not b_entry or a_entry["status"] != "pass" or b_entry["status"] != "pass":
        entry["reason"] = f"needs {first} and {second} to pass"
        return entry
    a, b = a_entry["figures"]["losses"], b_entry["figures"]["losses"]
    difference = sum(abs(x - y) / max(abs(x), 1e-8) for x, y in zip(a, b)) / len(a)
    entry["figures"] = {"mean_relative_difference": difference, "tolerance": tolerance, "steps": len(a),
                        "seconds_ratio": b_entry["seconds"] / max(a_entry["seconds"], 1e-9)}
    entry.update(status="pass" if difference <= tolerance else "fail",
                 reason=None if difference <= tolerance else f"{what} losses differ by {difference:.1%}")
    return entry


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", help="Folder for results.json and results.md (and the runs, under work/).")
    parser.add_argument("--dry_run", "--dry-run", action="store_true", help="Tiny shapes on the CPU.")
    parser.add_argument("--reference", default=os.path.join(ASSETS, "train_text_to_image.py"),
                        help="diffusers' examples/text_to_image/train_text_to_image.py for the speed ratio.")
    parser.add_argument("--only", nargs="*", default=None,
                        help="Run only these parts (on a GPU, the on-request parts run only so).")
    parser.add_argument("--jobs", type=int, default=2, help="Parts run at once in a dry run (a GPU run: one).")
    parser.add_argument("--prepare", action="store_true",
                        help="Here, before a device call: the wheels the device lacks and the reference script, into "
                             "benchmarks/gpu_suite_assets/ (see prepare()).")
    parser.add_argument("--measure_matmul", type=int, default=None, help=argparse.SUPPRESS)  # the peak part's process
    args = parser.parse_args(argv)
    if args.measure_matmul:
        print(json.dumps(measure_matmul(args.measure_matmul)))
        return {}
    if args.prepare:
        return prepare(ASSETS)
    if args.out is None:
        parser.error("give the results folder: bash benchmarks/gpu_suite.sh [--dry-run] OUT")
    work = os.path.join(args.out, "work")
    os.makedirs(work, exist_ok=True)
    prepare_data(work, args.dry_run)
    parts = [p for p in build_parts(work, args.dry_run)
             if (p.name in args.only if args.only else args.dry_run or not p.on_request)]
    entries = {}

    def finish(part: Part, entry: dict) -> None:
        if part.name in LOSS_CURVES and entry["status"] == "pass":
            entry["figures"]["losses"] = monitored_losses(os.path.join(work, "monitor", part.name))
        print(f"[{entry['status']:>4}] {part.name} ({entry['seconds']} s)"
              + (f": {entry['reason']}" if entry["reason"] else ""), flush=True)
        entries[part.name] = entry

    # The matrix rate first (the speed parts' MFU divides by it); then the parts in order, one at a time on a GPU
    # (each has it to itself), --jobs at a time in a dry run (most of a tiny part is process start-up).
    for part in [p for p in parts if p.check == "peak"]:
        finish(part, run_part(part, work, args.dry_run, args.reference))
    peak = entries.get("bf16_matmul_peak", {}).get("figures", {}).get("bf16_matmul_tflops")
    rest = [p for p in parts if p.check != "peak"]
    jobs = args.jobs if args.dry_run else 1
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [(part, pool.submit(run_part, part, work, args.dry_run, args.reference, peak)) for part in rest]
        for part, future in futures:
            finish(part, future.result())
    entries = {p.name: entries[p.name] for p in parts}  # in the parts' order
    for name, first, second, tolerance, what in COMPARED:
        if first in entries or second in entries:
            entries[name] = compare_losses(entries, name, first, second, tolerance, what)
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
                     + (f"{e['reason'] + '; ' if e['reason'] else ''}{json.dumps(shown)}" if e['status'] == 'pass'
                        else e['reason']) + " |")
    with open(os.path.join(args.out, "results.md"), "w", encoding="utf-8") as handle:
        handle.write(f"GPU suite {'dry run ' if args.dry_run else ''}on {result['device']}, {result['date']}\n\n"
                     + "\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
