"""benchmarks/: the shared harness's numbers add up, and each benchmark command runs end to end (2 measured steps)."""

import json
import os

import pytest

from benchmarks import bench_text_to_image as bench
from benchmarks import harness


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
