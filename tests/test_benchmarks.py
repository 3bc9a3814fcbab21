"""benchmarks/: the shared harness's numbers add up, and each benchmark command runs end to end (2 measured steps)."""

import json
import os

import pytest
import torch

from benchmarks import bench_text_to_image as bench
from benchmarks import harness
from conftest import REPO_ROOT, launch_env


def test_run_metrics_use_only_the_steps_after_warm_up():
    timing = {"timestamps": [10.0, 11.0, 11.5, 12.0, 12.5, 13.0], "cpu_timestamps": [5.0, 6.0, 7.0, 8.0, 9.0, 10.0],
              "start_time": 0.0, "wall_s": 20.0, "peak_rss_bytes": 1, "cuda_max_allocated_bytes": None}
    metrics = harness.run_metrics(timing, warmup=2, steps=4)
    assert metrics["intervals"] == [0.5, 0.5, 0.5, 0.5] and metrics["steps_per_s"] == pytest.approx(2.0)
    assert metrics["steps_per_cpu_s"] == pytest.approx(1.0) and metrics["startup_s"] == 10.0
    with pytest.raises(RuntimeError, match="expected 7 step timestamps"):
        harness.run_metrics(timing, warmup=3, steps=4)
    summary = harness.summarize([metrics, dict(metrics, steps_per_s=4.0)], batch_size=8, flops_per_step=1e12, peak_tflops=10.0)
    assert summary["steps_per_s"] == pytest.approx(3.0) and summary["samples_per_s"] == pytest.approx(24.0)
    assert summary["step_time_median_ms"] == pytest.approx(500.0) and summary["mfu"] == pytest.approx(0.3)
    assert harness.percentile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 0.9) == pytest.approx(9.1)


def test_flop_count_of_a_preset(tmp_path):
    _, pipeline_dir = bench.prepare_inputs(bench.parse_args(["--preset", "tiny", "--resolution", "32", "--num_images", "2"]),
                                           str(tmp_path))
    one, four = bench.count_flops(pipeline_dir, 1, 32), bench.count_flops(pipeline_dir, 4, 32)
    assert one["unet_train"] > 0 and one["vae_encode"] > 0
    assert four["unet_train"] == pytest.approx(4 * one["unet_train"], rel=0.01)


@pytest.mark.slow
def test_benchmark_smoke_run_with_a_reference(tmp_path):
    """2 measured steps of ours, ours+cache and a 'reference' (our own script, which takes diffusers' flags)."""
    result = bench.main(["--preset", "tiny", "--resolution", "32", "--batch_size", "2", "--num_images", "6",
                         "--warmup_steps", "1", "--steps", "2", "--threads", "1", "--workdir", str(tmp_path / "work"),
                         "--results_dir", str(tmp_path / "results"), "--reference", os.path.join(bench.REPO_ROOT, "train_text_to_image.py")])
    assert set(result["variants"]) == {"ours", "ours+cache", "reference"}
    for summary in result["variants"].values():
        assert summary["steps_per_s"] > 0 and summary["step_time_p90_ms"] >= summary["step_time_median_ms"] > 0
        assert summary["peak_rss_mib"] > 100 and summary["gpu_max_allocated_mib"] is None
    assert set(result["ratios"]) == {"ours", "ours+cache"} and all(r > 0 for r in result["ratios"].values())
    saved = json.load(open(tmp_path / "results" / "t2i-tiny-32px-b2.json"))
    assert saved["unet_train_flops_per_step"] > 0 and "| ours+cache |" in open(tmp_path / "results" / "t2i-tiny-32px-b2.md").read()


def test_step_timer_counts_optimizer_steps_without_a_progress_bar(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "train.py"
    script.write_text("import torch\nw = torch.nn.Parameter(torch.ones(3))\nopt = torch.optim.SGD([w], lr=0.1)\n"
                      "for _ in range(3):\n    w.sum().backward()\n    opt.step()\n    opt.zero_grad()\n")
    out = tmp_path / "timing.json"
    subprocess.run([sys.executable, os.path.join(bench.REPO_ROOT, "benchmarks", "step_timer.py"), "--out", str(out),
                    "--event", "optimizer", str(script)], check=True, timeout=120)
    timing = json.load(open(out))
    assert len(timing["timestamps"]) == 3 and len(timing["cpu_timestamps"]) == 3 and timing["peak_rss_bytes"] > 0


def test_ratios_are_against_the_reference_only():
    summaries = {"ours": {"steps_per_s": 3.0, "steps_per_cpu_s": 2.0}, "reference": {"steps_per_s": 2.0, "steps_per_cpu_s": 1.0}}
    assert harness.ratios_to_reference(summaries) == ({"ours": 1.5}, {"ours": 2.0})
    assert harness.ratios_to_reference({"ours": summaries["ours"]}) == ({}, {})
    timed = {"reference": {"wall_s": 90.0}, "ours": {"wall_s": 60.0}}
    assert harness.whole_process_ratios(timed) == {"ours": 1.5} and harness.whole_process_ratios(summaries) == {}


@pytest.mark.slow
def test_mask_dit_benchmark_smoke_run_in_latent_space_with_a_reference(tmp_path):
    """2 measured steps of the tiny mask DiT on a tiny random VAE's latents: ours with --precompute (ours
    without it where the script has no cache yet) and a 'reference' (our own script, which takes its own flags)."""
    from benchmarks import bench_mask_dit

    has_cache = harness.script_accepts(bench_mask_dit.OUR_SCRIPT, "--precompute")
    result = bench_mask_dit.main(["--model_size", "tiny", "--resolution", "32", "--latent", "--batch_size", "2",
                                  "--warmup_steps", "1", "--steps", "2", "--threads", "1", "--cache", "on" if has_cache else "off",
                                  "--workdir", str(tmp_path / "work"), "--results_dir", str(tmp_path / "results"),
                                  "--reference", bench_mask_dit.OUR_SCRIPT])
    ours = "ours+cache" if has_cache else "ours"
    assert set(result["variants"]) == {ours, "reference"}
    for summary in result["variants"].values():
        assert summary["steps_per_s"] > 0 and summary["samples_per_s"] == pytest.approx(2 * summary["steps_per_s"])
        assert summary["step_time_p90_ms"] >= summary["step_time_median_ms"] > 0 and summary["peak_rss_mib"] > 100
    assert set(result["ratios"]) == set(result["cpu_time_ratios"]) == {ours} and result["ratios"][ours] > 0
    name = "mask-dit-tiny-32px-latent-tiny-b2"
    saved = json.load(open(tmp_path / "results" / f"{name}.json"))
    assert saved["transformer_train_flops_per_step"] > 0 and saved["vae_encode_flops_per_step"] > 0
    assert f"| {ours} |" in open(tmp_path / "results" / f"{name}.md").read()


@pytest.mark.slow
def test_flow_family_benchmark_smoke_run(tmp_path):
    """bench_flow_families.py on the tiny FLUX pipeline: ours (LoRA), ours with the caches and a 'reference' (our
    own script with diffusers' flags, a full fine-tune) each time a measured step, results written."""
    from benchmarks import bench_flow_families

    result = bench_flow_families.main(["--family", "flux", "--resolution", "16", "--batch_size", "2", "--num_images",
                                       "4", "--warmup_steps", "1", "--steps", "2", "--threads", "1", "--max_sequence_length",
                                       "16", "--workdir", str(tmp_path / "work"), "--results_dir",
                                       str(tmp_path / "results"), "--reference", bench_flow_families.OUR_SCRIPT])
    assert set(result["variants"]) == {"ours", "ours+cache", "reference"}
    assert all(summary["steps_per_s"] > 0 for summary in result["variants"].values())
    assert set(result["ratios"]) == {"ours", "ours+cache"}
    assert "| ours+cache |" in open(tmp_path / "results" / "flux-lora-tiny-16px.md").read()


def test_segmentation_reference_gets_only_the_reference_flags():
    from benchmarks import bench_segmentation

    args = bench_segmentation.parse_args(["--batch_size", "2", "--mixed_precision", "bf16"])
    reference = bench_segmentation.flags_for(args, "/data", {"name": "reference"}, "/out")
    ours = bench_segmentation.flags_for(args, "/data", {"name": "ours"}, "/out")
    assert reference[reference.index("--warm-epoch") + 1] == "-1" and "--output_dir" not in reference
    assert ours == reference + ["--output_dir", "/out", "--seed", "0", "--mixed_precision", "bf16", "--dataloader_num_workers", "0"]


@pytest.mark.slow
def test_segmentation_benchmark_smoke_run_with_a_reference(tmp_path):
    """2 measured steps of MSHNet on 32 px crops: ours (timed by its Steps bar) and a 'reference' (our own script,
    which takes the original main.py's hyphenated flags) timed by its optimizer steps, as the original is."""
    from benchmarks import bench_segmentation

    result = bench_segmentation.main(["--crop_size", "32", "--base_size", "32", "--image_size", "64", "--batch_size", "2",
                                      "--num_frames", "2", "--num_test", "2", "--warmup_steps", "1", "--steps", "2", "--threads", "1",
                                      "--workdir", str(tmp_path / "work"), "--results_dir", str(tmp_path / "results"),
                                      "--reference", bench_segmentation.OUR_SCRIPT])
    assert set(result["variants"]) == {"ours", "reference"} and result["settings"]["reference_event"] == "optimizer"
    for summary in result["variants"].values():
        assert summary["steps_per_s"] > 0 and summary["samples_per_s"] == pytest.approx(2 * summary["steps_per_s"])
    assert result["ratios"]["ours"] > 0 and result["cpu_time_ratios"]["ours"] > 0
    train_names = (tmp_path / "work" / "irstd-64-2x6-2-0" / "trainval.txt").read_text().split()
    assert len(train_names) == 6 and len(set(train_names)) == 2  # one epoch = (1 + 2) steps x 2 images, 2 distinct frames
    saved = json.load(open(tmp_path / "results" / "mshnet-32px-b2.json"))
    assert saved["mshnet_train_flops_per_step"] > 0 and saved["variants"]["reference"]["steps_per_s"] > 0


def test_data_loading_benchmark_measures_both_loaders(tmp_path, capsys):
    from benchmarks import bench_data_loading

    results = bench_data_loading.main(["--image_size", "64", "--crop_size", "32", "--base_size", "32", "--num_frames", "4",
                                       "--passes", "1", "--workdir", str(tmp_path)])
    assert set(results) == {"from disk", "--cache_images"}
    for measured in results.values():
        assert measured["ms_per_sample"] > 0 and measured["cores_for_target"] > 0
    assert "less loader CPU per sample" in capsys.readouterr().out


def test_unet_step_benchmark_times_each_mode(capsys):
    from benchmarks import bench_unet_step

    results = bench_unet_step.main(["--preset", "tiny", "--resolution", "32", "--batch_size", "2", "--modes", "eager",
                                    "channels_last", "--warmup_steps", "1", "--steps", "2"])
    assert set(results) == {"eager", "channels_last"}
    assert all(r["median_ms"] > 0 and r["warmup_s"] > 0 for r in results.values())
    assert "| channels_last |" in capsys.readouterr().out


def test_preflight_benchmark_measures_the_scan(tmp_path):
    from benchmarks import bench_preflight

    result = bench_preflight.main(["--num_images", "40", "--size", "16", "--workdir", str(tmp_path), "--repeats", "2",
                                   "--results_dir", str(tmp_path / "results")])
    assert result["num_images"] == 40 and len(result["scan_s"]) == 2 and result["scan_s_best"] > 0
    assert result["files_per_s"] == round(40 / result["scan_s_best"])
    assert json.load(open(tmp_path / "results" / "preflight.json")) == result


@pytest.mark.slow
def test_gpu_suite_dry_run_runs_every_part(tmp_path):
    """benchmarks/gpu_suite.sh --dry-run: every part runs on the CPU (or is skipped with its reason), none fails, and
    the JSON has one entry per part with its figures."""
    import subprocess
    import sys

    result = subprocess.run(["bash", os.path.join(REPO_ROOT, "benchmarks", "gpu_suite.sh"), "--dry-run",
                             str(tmp_path / "suite")], cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
                            env=dict(launch_env(), PYTHON=sys.executable))
    assert result.returncode == 0, result.stderr[-4000:]
    parts = {p["name"]: p for p in json.loads((tmp_path / "suite" / "results.json").read_text())["parts"]}
    assert not [p for p in parts.values() if p["status"] == "fail"], [p for p in parts.values() if p["status"] == "fail"]
    for name in ("sd15_full_bf16", "lora_unet_te_fp16", "ema_offload", "auto_batch", "sdxl_lora", "mask_dit", "mshnet",
                 "bf16_vs_fp32", "sd15_speed_vs_reference", "kanji_demo", "deepspeed_zero2_save_resume",
                 "bf16_matmul_peak", "mask_dit_speed", "mshnet_speed", "flux_lora_512_speed", "sd35_medium_1024_speed"):
        assert parts[name]["status"] == "pass", parts[name]
    assert parts["fsdp_save_resume"]["status"] == "skip"  # accelerate's FSDP needs CUDA
    # DeepSpeed on its CPU accelerator: the resumed run is the straight run, bit for bit.
    resumed = parts["deepspeed_zero2_save_resume"]["figures"]
    assert resumed["bitwise"] and resumed["losses_resumed"] == resumed["losses_straight"]
    # MFU of the speed parts is against the matrix rate the suite measured in the same run.
    peak = parts["bf16_matmul_peak"]["figures"]["bf16_matmul_tflops"]
    for name in ("flux_lora_512_speed", "sd35_medium_1024_speed"):  # (no FLOP count: images/s and memory)
        ours = parts[name]["figures"]["variants"]["ours+cache"]
        assert ours["steps_per_s"] > 0 and ours["samples_per_s"] == pytest.approx(ours["steps_per_s"])
    for name, samples in (("mask_dit_speed", 4), ("mshnet_speed", 4)):
        figures = parts[name]["figures"]
        assert figures["peak_tflops"] == pytest.approx(peak)
        ours = figures["variants"]["ours"]
        assert ours["samples_per_s"] == pytest.approx(ours["steps_per_s"] * samples)
        assert ours["mfu"] == pytest.approx(ours["achieved_tflops"] / peak) and ours["mfu"] > 0
    for name in ("sd15_full_bf16", "lora_unet_te_fp16", "sdxl_lora"):
        assert parts[name]["figures"]["image_std"] > 1 and parts[name]["figures"]["steps_logged"] == 3
    assert all(p["reason"] for p in parts.values() if p["status"] == "skip")
    assert parts["bf16_vs_fp32"]["figures"]["mean_relative_difference"] <= 0.1
    assert parts["xformers_vs_sdpa"]["status"] == "skip"  # xformers needs CUDA
    assert "| kanji_demo | main job | pass |" in (tmp_path / "suite" / "results.md").read_text()


def test_gpu_suite_carries_wheels_in_batches_that_fit_a_device_call():
    from benchmarks.gpu_suite import BATCH_BYTES, batches_of

    sizes = {"a.whl": 43 << 20, "b.whl": 13 << 20, "c.whl": 6 << 20, "d.whl": 3 << 20, "e.whl": 60 << 20, "f.whl": 1}
    batches = batches_of(sizes)
    assert sorted(n for b in batches for n in b) == sorted(sizes)  # each wheel once
    for batch in batches:  # within the limit, except a wheel over it, alone
        assert sum(sizes[n] for n in batch) <= BATCH_BYTES or batch == ["e.whl"]
    assert batches == [["e.whl"], ["a.whl", "c.whl", "f.whl"], ["b.whl", "d.whl"]]  # first fit, largest first


@pytest.mark.slow
def test_gpu_suite_prepare_fetches_a_complete_install_for_the_device(tmp_path):
    """--prepare (from the package registry): wheels for the device image's Python 3.12 at requirements.lock's
    versions, in folders that fit a device call, whose requirements the carried wheels and the image's own package
    list meet (so gpu_suite.sh's `pip install --no-deps` of them gives a complete environment)."""
    import glob

    from benchmarks.gpu_suite import BATCH_BYTES, pinned, prepare, unmet_requirements

    report = prepare(str(tmp_path))
    if report["failed"] and "pinned libraries" in report["failed"]:
        pytest.skip(f"the package registry is not reachable: {report['failed']}")
    assert not report["failed"], report
    folders = sorted(glob.glob(str(tmp_path / "wheels" / "*")))
    wheels = [os.path.basename(w) for f in folders for w in glob.glob(os.path.join(f, "*.whl"))]
    for folder in folders:
        assert sum(os.path.getsize(w) for w in glob.glob(os.path.join(folder, "*.whl"))) <= BATCH_BYTES
    for name in ("diffusers", "datasets", "transformers", "accelerate", "peft", "bitsandbytes", "deepspeed"):
        version = pinned(name).split("==")[1]
        assert any(w.startswith(f"{name}-{version}-") for w in wheels), (name, wheels)
    assert any(w.startswith("xformers-") for w in wheels)
    assert not [w for w in wheels if w.startswith(("torch-", "nvidia", "triton-", "numpy-"))]  # the image's own
    assert not [w for w in wheels if "-cp311-" in w]  # built for this machine's Python, not the device's
    assert report["unmet"] == {} and unmet_requirements(folders) == {}


def test_gpu_suite_compares_the_loss_curves_of_paired_parts():
    from benchmarks.gpu_suite import compare_losses

    run = lambda losses, seconds: {"status": "pass", "seconds": seconds, "figures": {"losses": losses}}  # noqa: E731
    close = compare_losses({"a": run([1.0, 0.5], 10.0), "b": run([1.02, 0.49], 8.0)}, "a_vs_b", "a", "b", 0.05, "x")
    assert close["status"] == "pass" and close["figures"]["seconds_ratio"] == pytest.approx(0.8)
    assert close["figures"]["mean_relative_difference"] == pytest.approx((0.02 + 0.02) / 2)
    far = compare_losses({"a": run([1.0, 0.5], 1.0), "b": run([1.5, 0.5], 1.0)}, "a_vs_b", "a", "b", 0.05, "x")
    assert far["status"] == "fail" and "x losses differ by 25.0%" in far["reason"]
    assert compare_losses({"a": run([1.0], 1.0)}, "a_vs_b", "a", "b", 0.05, "x")["status"] == "skip"


def test_fundus_comparison_thumbnail_kid_is_the_unbiased_mmd_of_the_thumbnails():
    """benchmarks/fundus_mask_vs_controlnet.py's KID against a direct computation: the unbiased MMD^2 with
    KID's kernel k(x, y) = (x.y / d + 1)^3 on the 16x16 thumbnails."""
    from benchmarks.fundus_mask_vs_controlnet import Thumbnails, thumbnail_kid

    generator = torch.Generator().manual_seed(0)
    real = torch.rand(10, 3, 32, 32, generator=generator)
    fake = torch.rand(10, 3, 32, 32, generator=generator) * 0.5  # darker: a KID well away from 0
    x = Thumbnails()((fake * 255).round().to(torch.uint8)).double()
    y = Thumbnails()((real * 255).round().to(torch.uint8)).double()

    def kernel(a, b):
        return (a @ b.T / a.shape[1] + 1) ** 3

    def mmd(a, b):
        n = len(a)
        kaa, kbb, kab = kernel(a, a), kernel(b, b), kernel(a, b)
        return ((kaa.sum() - kaa.diag().sum()) / (n * (n - 1)) + (kbb.sum() - kbb.diag().sum()) / (n * (n - 1))
                - 2 * kab.mean()).item()

    assert thumbnail_kid(fake, real) == pytest.approx(mmd(x, y), rel=1e-4)  # (float32 vs float64)


@pytest.mark.slow
def test_fundus_comparison_runs_both_approaches(tmp_path):
    """The plumbing at a few steps: both approaches train from nothing, are scored on the same held-out masks, and
    results.json / grid.png are written."""
    from benchmarks.fundus_mask_vs_controlnet import main

    results = main(["--output_dir", str(tmp_path), "--quick"])
    saved = json.load(open(tmp_path / "results.json"))
    assert saved["held_out_pairs"] == 16 and saved["ceiling"]["mask_iou_real_images"] > 0.5
    for approach in ("mask_dit", "sd_controlnet"):
        assert set(saved[approach]) >= {"train_minutes", "psnr", "ssim", "mask_iou", "kid_thumbnails"}
        assert saved[approach]["psnr"] == pytest.approx(results[approach]["psnr"])
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "sd" / "model_index.json").is_file()
