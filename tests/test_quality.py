"""--validation_metrics (utils/quality.py): each number against a direct computation by the test (CLIP score = 100 x
the cosine of the CLIP embeddings, clipped at 0; FID from the two feature means and covariances; KID, the unbiased
cubic-kernel MMD), with a tiny offline CLIP and a small TorchScript feature extractor; a metric that cannot be
built is said once and skipped; a text-to-image run logs them and early-stops on val/fid."""

import json
import logging
import os

import numpy as np
import pytest
import torch
from conftest import run_main_in_process, write_captioned_folder

from utils.quality import QualityMetrics, to_uint8


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A CLIPModel with its processor (tokenizer learned from a few captions, 32 px images), saved like a Hub CLIP."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from utils.sd.builder import build_clip_tokenizer, tiny_clip_config

    root = str(tmp_path_factory.mktemp("clip"))
    build_clip_tokenizer(root, ["a red circle", "a blue square", "a picture of thing"], num_merges=200)
    tokenizer = CLIPTokenizer.from_pretrained(root)
    torch.manual_seed(0)
    text = tiny_clip_config(tokenizer).to_dict()
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8, projection_dim=32)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)).save_pretrained(root)
    processor = CLIPProcessor(CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                              tokenizer)
    processor.save_pretrained(root)
    return root


class PooledColours(torch.nn.Module):
    """uint8 images -> their 4x4 average-pooled colours (48 numbers) plus a fixed random projection's 16."""

    def __init__(self):
        super().__init__()
        self.projection = torch.nn.Linear(48, 16)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.adaptive_avg_pool2d(images.float() / 255, 4).flatten(1)
        return torch.cat([pooled, torch.tanh(self.projection(pooled))], dim=1)


@pytest.fixture(scope="module")
def feature_extractor(tmp_path_factory):
    torch.manual_seed(0)
    module = PooledColours().eval()
    path = str(tmp_path_factory.mktemp("features") / "features.pt")
    torch.jit.script(module).save(path)
    return path, module


def images(seed, count, shift=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(count, 3, 32, 32, generator=generator) * 200 + shift).clamp(0, 255).to(torch.uint8)


def test_clip_score_is_100_times_the_clipped_cosine(tiny_clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    generated, prompts = images(0, 4), ["a red circle", "a blue square", "a picture of thing", "a red square"]
    score = QualityMetrics(["clip_score"], tiny_clip_dir, None)(generated, prompts, generated)["val/clip_score"]

    model, processor = CLIPModel.from_pretrained(tiny_clip_dir), CLIPProcessor.from_pretrained(tiny_clip_dir)
    with torch.no_grad():
        image = model.get_image_features(**processor(images=list(generated), return_tensors="pt"))
        text = model.get_text_features(**processor(text=prompts, return_tensors="pt", padding=True))
    image, text = (getattr(x, "pooler_output", x) for x in (image, text))
    cosine = torch.nn.functional.cosine_similarity(image, text, dim=-1)
    assert score == pytest.approx(max(100 * cosine.mean().item(), 0.0), abs=1e-4)


def test_fid_is_the_frechet_distance_of_the_feature_gaussians(feature_extractor):
    from scipy import linalg

    path, module = feature_extractor
    real, generated = images(1, 24), images(2, 20, shift=30)
    fid = QualityMetrics(["fid"], "unused", path)(generated, ["x"] * 20, real)["val/fid"]

    with torch.no_grad():
        a, b = (module(x).double().numpy() for x in (real, generated))
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    expected = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))
    assert fid == pytest.approx(expected, rel=1e-3, abs=1e-6) and fid > 0


def test_kid_is_the_unbiased_cubic_kernel_mmd(feature_extractor):
    path, module = feature_extractor
    real, generated = images(3, 16), images(4, 16, shift=20)
    # subset size = all 16 samples: every subset is the whole set, so the mean is the exact MMD and the spread 0
    result = QualityMetrics(["kid"], "unused", path)(generated, ["x"] * 16, real)

    with torch.no_grad():
        x, y = (module(v).double() for v in (real, generated))
    kernel = lambda p, q: (p @ q.T / p.shape[1] + 1) ** 3  # noqa: E731
    n = x.shape[0]
    off = ~torch.eye(n, dtype=torch.bool)
    expected = (kernel(x, x)[off].mean() + kernel(y, y)[off].mean() - 2 * kernel(x, y).mean()).item()
    assert result["val/kid"] == pytest.approx(expected, rel=1e-4, abs=1e-9)
    assert result["val/kid_std"] == pytest.approx(0.0, abs=1e-6)  # (float32 rounding of the permuted sums)


def test_a_metric_that_cannot_be_built_is_said_once_and_the_others_go_on(tiny_clip_dir, tmp_path, caplog):
    """Without torch-fidelity (not installable here: it needs torchvision) the standard FID/KID extractor cannot be
    built; a missing CLIP model likewise."""
    pytest.importorskip("torchmetrics")
    if __import__("importlib").util.find_spec("torch_fidelity") is not None:
        pytest.skip("torch-fidelity is installed: the standard extractor may build")
    metrics = QualityMetrics(["clip_score", "fid", "kid"], str(tmp_path / "no-clip"), None)
    with caplog.at_level(logging.WARNING):
        first = metrics(images(0, 4), ["a"] * 4, images(1, 4))
        second = metrics(images(0, 4), ["a"] * 4, images(1, 4))
    assert first == second == {} and metrics.names == []
    said = [r.message for r in caplog.records if "is not computed" in r.message]
    assert len(said) == 3 and any("torch-fidelity" in m for m in said)


def test_to_uint8_maps_minus_one_one_to_0_255():
    assert to_uint8(torch.tensor([[[[-1.0, 0.0, 1.0]]]])).tolist() == [[[[0, 128, 255]]]]


def test_text_to_image_logs_the_metrics_and_early_stops_on_fid(tiny_pipeline_dir, tiny_clip_dir, feature_extractor,
                                                               tmp_path):
    """A run with --validation_split and --validation_metrics logs val/clip_score, val/fid, val/kid at every
    validation (metrics.jsonl, TensorBoard); --early_stopping_metric val/fid with patience 1 stops at the first
    validation that does not beat the best FID, and best/ holds the weights of the best one."""
    import train_text_to_image as script

    data = tmp_path / "data"
    data.mkdir()
    write_captioned_folder(data, count=12, size=(32, 32), caption="a red circle number {i}")
    out = tmp_path / "out"
    run_main_in_process(script, [
        "--pretrained_model_name_or_path", tiny_pipeline_dir, "--train_data_dir", str(data), "--resolution", "32",
        "--train_batch_size", "2", "--max_train_steps", "12", "--learning_rate", "1e-2", "--lr_warmup_steps", "0",
        "--validation_split", "0.34", "--validation_steps", "2", "--validation_inference_steps", "2",
        "--validation_metrics", "clip_score,fid,kid", "--metrics_clip_model", tiny_clip_dir,
        "--metrics_feature_extractor", feature_extractor[0], "--early_stopping_metric", "val/fid",
        "--early_stopping_patience", "1", "--seed", "0", "--report_to", "tensorboard", "--output_dir", str(out)])
    rows = [json.loads(line) for line in open(out / "report" / "metrics.jsonl")]
    scored = [row for row in rows if "val/fid" in row]
    assert scored and all({"val/clip_score", "val/kid", "val/kid_std", "val/loss"} <= row.keys() for row in scored)
    assert all(np.isfinite(row["val/fid"]) and row["val/fid"] >= 0 for row in scored)
    fids = [row["val/fid"] for row in scored]
    stopped = next((i for i in range(1, len(fids)) if fids[i] >= min(fids[:i])), None)
    if stopped is not None:  # patience 1: the run ends at the first validation without a better FID
        assert len(fids) == stopped + 1 or len(fids) == stopped + 2  # (+ the final scoring at the stop step)
    assert os.path.isdir(out / "best") and min(fids) == pytest.approx(scored[int(np.argmin(fids))]["val/best_fid"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tensorboard = {}
    for directory, _, files in os.walk(out / "logs"):
        if any(f.startswith("events.") for f in files):
            accumulator = EventAccumulator(directory)
            accumulator.Reload()
            tensorboard.update({tag: [e.value for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]})
    assert tensorboard["val/fid"] == pytest.approx(fids) and len(tensorboard["val/clip_score"]) == len(fids)
    assert (out / "report" / "training_curves.png").is_file()


def test_mask_dit_logs_fid_and_kid_of_its_held_out_samples(feature_extractor, tmp_path):
    """train_mask_dit.py --validation_metrics fid,kid: at every validation, the samples from the held-out masks
    against the held-out images; best/ follows --early_stopping_metric val/kid."""
    import train_mask_dit as script
    from utils.mask_dit.data import write_synthetic_fundus_dataset

    data = write_synthetic_fundus_dataset(str(tmp_path / "fundus"), 24, size=32, seed=0)
    out = tmp_path / "out"
    run_main_in_process(script, [
        "--train_data_dir", data, "--model_size", "tiny", "--resolution", "32", "--mask_channels", "2",
        "--train_batch_size", "4", "--max_train_steps", "6", "--validation_split", "0.25", "--validation_steps", "3",
        "--num_inference_steps", "2", "--num_validation_images", "2", "--validation_metrics", "fid,kid",
        "--metrics_feature_extractor", feature_extractor[0], "--early_stopping_metric", "val/kid", "--seed", "0",
        "--report_to", "none", "--output_dir", str(out)])
    rows = [json.loads(line) for line in open(out / "report" / "metrics.jsonl")]
    scored = [row for row in rows if "val/kid" in row]
    assert len(scored) >= 2 and all(np.isfinite(row["val/fid"]) and "val/loss" in row for row in scored)
    assert os.path.isdir(out / "best")
