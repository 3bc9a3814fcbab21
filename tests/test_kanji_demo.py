"""The kanji demo's end-to-end path in its reduced ('smoke') mode: real KANJIDIC2 data, real training."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
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
                "nearest_train_distance", "heldout_real_nearest_train_distance",
                # issue 17's keys: does the model follow its prompt?
                "seen_prompt_top1", "seen_prompt_top5", "num_seen_prompts", "chance_top1", "loss_true_caption",
                "loss_shuffled_caption", "binary_pixel_fraction", "minutes",
                # issue 34's: the glyph distribution in the demo's own classifier's features
                "kid_heldout", "fid_heldout", "kid_real_floor", "fid_real_floor"):
        assert math.isfinite(summary[key]), key
    assert summary["num_seen_prompts"] == 8 and summary["chance_top1"] == 1 / 8
    assert 0 <= summary["seen_prompt_top1"] <= summary["seen_prompt_top5"] <= 1
    assert (out / "samples_seen_prompts.png").stat().st_size > 1000
    assert summary["fid_heldout"] >= 0 and summary["fid_real_floor"] >= 0 and summary["num_heldout_characters"] >= 2
    for line in ("seen prompts", "true vs shuffled caption", "near-black/white pixels", "samples vs real glyphs"):
        assert line in result.stdout, line
    # Even 4 steps of training must lower the held-out diffusion loss at fixed timesteps and noise, and the
    # summary says so (the demo's 20% target is not a smoke run's).
    assert summary["diffusion_loss_trained"] < summary["diffusion_loss_initial"]
    assert "BELOW TARGET" not in result.stdout
    assert summary["curves"]["vae/reconstruction_loss"]["last"] < summary["curves"]["vae/reconstruction_loss"]["first"]

    # benchmarks/dreambooth_kanji.py on the smoke model: both fine-tunes run and every number is scored.
    dreambooth = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "benchmarks", "dreambooth_kanji.py"),
                                 "--demo_dir", str(out), "--output_dir", str(tmp_path / "db"), "--max_train_steps", "2",
                                 "--num_samples", "2", "--num_inference_steps", "2", "--characters", "4"],
                                cwd=REPO_ROOT, env=launch_env(), capture_output=True, text=True, timeout=900)
    assert dreambooth.returncode == 0, dreambooth.stderr[-6000:]
    results = json.loads((tmp_path / "db" / "results.json").read_text())
    assert list(results["models"]) == ["before", "without prior preservation", "with prior preservation"]
    for scores in results["models"].values():
        assert scores["num_seen_prompts"] == 4 and 0 <= scores["seen_prompt_top1"] <= scores["seen_prompt_top5"] <= 1
        assert scores["new_glyph_top1"] in (0.0, 0.5, 1.0)
    assert len(os.listdir(tmp_path / "db" / "reg")) == 2 * 4  # the model's own sample per caption, with its .txt


def test_seen_prompt_accuracy_matches_a_brute_force_count():
    """top-1/top-5 by nearest binarised glyph, against a direct per-sample loop over all glyphs."""
    import numpy as np

    import kanji_demo

    rng = np.random.default_rng(0)
    glyphs = rng.integers(0, 2, (30, 16, 16)).astype(np.float32) * 255
    samples = glyphs.copy()
    samples[::3] = glyphs[rng.permutation(30)][::3]  # a third replaced by other glyphs
    flip = rng.random(samples.shape) < 0.08  # and noise everywhere
    samples = np.where(flip, 255 - samples, samples)
    result = kanji_demo.seen_prompt_accuracy(samples, glyphs)
    top1 = top5 = 0
    for i, image in enumerate(samples):
        distances = [((image < 128) != (glyph < 128)).sum() for glyph in glyphs]
        ranked = sorted(range(len(glyphs)), key=lambda j: (distances[j], j))
        top1 += ranked[0] == i
        top5 += i in ranked[:5]
    assert result["seen_prompt_top1"] == top1 / 30 and result["seen_prompt_top5"] == top5 / 30
    assert 0.5 < result["seen_prompt_top1"] < 1 and result["chance_top1"] == 1 / 30


def test_shuffled_captions_leave_none_in_place():
    import kanji_demo

    captions = [f"kanji meaning {i}" for i in range(20)]
    mixed = kanji_demo.shuffled(captions, seed=0)
    assert sorted(mixed) == sorted(captions) and all(a != b for a, b in zip(captions, mixed))
    assert mixed == kanji_demo.shuffled(captions, seed=0)


def test_glyph_distribution_metrics_are_kid_and_fid_of_the_classifier_features():
    """kanji_demo.distribution_metrics against the test's own computation on the same features: FID from the
    feature means and covariances, KID as the unbiased cubic-kernel MMD (subsets = all samples: exact)."""
    from scipy import linalg

    import kanji_demo

    torch.manual_seed(0)
    glyphs = (torch.rand(6, 1, 32, 32) > 0.7).float()
    classifier = kanji_demo.train_glyph_classifier(glyphs, seed=0, steps=5)
    generator = torch.Generator().manual_seed(1)
    fake, real, train = (torch.randint(0, high, (n, 3, 32, 32), generator=generator, dtype=torch.uint8)
                         for n, high in ((12, 90), (12, 256), (20, 256)))  # (the samples darker than the real)
    result = kanji_demo.distribution_metrics(classifier, fake, real, train)
    assert classifier(train).mean(0).abs().max() < 1e-4  # standardised on the training glyphs
    with torch.no_grad():
        a, b = (classifier(x).double().numpy() for x in (real, fake))
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    fid = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a + cov_b - 2 * linalg.sqrtm(cov_a @ cov_b).real)
    assert result["fid_heldout"] == pytest.approx(fid, rel=1e-2, abs=1e-5)
    x, y = torch.from_numpy(a), torch.from_numpy(b)
    kernel = lambda p, q: (p @ q.T / p.shape[1] + 1) ** 3  # noqa: E731
    off = ~torch.eye(12, dtype=torch.bool)
    kid = (kernel(x, x)[off].mean() + kernel(y, y)[off].mean() - 2 * kernel(x, y).mean()).item()
    assert result["kid_heldout"] == pytest.approx(kid, rel=1e-3, abs=1e-7)
