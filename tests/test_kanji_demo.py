"""The kanji demo's end-to-end path in its reduced ('smoke') mode: real KANJIDIC2 data, real training."""

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT, launch_env

pytest.importorskip("matplotlib")


@pytest.mark.slow
def test_kanji_demo_smoke(tmp_path):
    from utils.sd.kanji_dataset import find_kanjidic2, resolve_fonts

    try:
        find_kanjidic2()
        resolve_fonts(("gothic",))
    except (FileNotFoundError, ValueError) as error:
        pytest.skip(f"kanji data not installed: {error}")
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "kanji_demo.py"), "--mode", "smoke", "--output_dir", str(out),
                             "--num_inference_steps", "4"], cwd=REPO_ROOT, env=launch_env(), capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-6000:]
    assert "Kanji demo finished" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    for name in ("samples_unseen_prompts.png", "training_curves.png"):
        assert (out / name).stat().st_size > 1000
    assert (out / "model" / "model_index.json").exists()
    for key in ("vae_psnr_db", "diffusion_loss_initial", "diffusion_loss_trained", "ink_coverage_mean", "binary_fraction",
                "nearest_train_distance", "heldout_real_nearest_train_distance"):
        assert math.isfinite(summary[key]), key
    # Even 4 steps of training must lower the held-out diffusion loss at fixed timesteps and noise.
    assert summary["diffusion_loss_trained"] < summary["diffusion_loss_initial"]
    assert summary["curves"]["vae/reconstruction_loss"]["last"] < summary["curves"]["vae/reconstruction_loss"]["first"]
