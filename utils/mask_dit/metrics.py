"""Mask DiT validation metrics: PSNR, SSIM, thresholding segmenter and mask IoU, and `log_samples` (generate from
held-out masks, score and show them).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from utils.images import save_and_log_images
from utils.mask_dit.data import collate_pairs
from utils.mask_dit.pipeline import comparison_tiles, generate_from_mask
from utils.metrics import psnr


logger = logging.getLogger(__name__)


def ssim(prediction: torch.Tensor, target: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """SSIM per image (Wang et al. 2004: Gaussian window 11 / 1.5, K1 0.01, K2 0.03), mean over channels; [0, 1] input."""
    channels = prediction.shape[1]
    coords = torch.arange(window, dtype=torch.float32) - window // 2
    gauss = torch.exp(-(coords**2) / (2 * sigma**2))
    gauss = gauss / gauss.sum()
    kernel = (gauss[:, None] * gauss[None, :]).expand(channels, 1, window, window).to(prediction.device)

    def blur(x):
        return F.conv2d(x, kernel, groups=channels)

    x, y = prediction.float(), target.float()
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1)


def segment_structures(images: torch.Tensor, dark_ratio: float = 0.36, bright_ratio: float = 0.87) -> torch.Tensor:
    """A deliberately simple segmenter for fundus-like images: [B, 3, H, W] in [0, 1] -> [B, 1, H, W] bool.

    Thresholds on the green / red ratio, which vignetting does not change: below `dark_ratio` is
    dark red (vessels, haemorrhages), above `bright_ratio` is yellow (exudates); the orange
    background and the optic disc's glow lie between. Only pixels inside the field (mean > 0.05)
    count. Tuned for the synthetic fundus data: on its ground truth it reaches IoU 0.99 at
    128 px and 0.72 at 64 px (thin vessels blur when downsampled), so compare a sample's IoU with
    the ground truth's; on real photographs it is only a rough proxy.
    """
    red, green = images[:, 0:1].float(), images[:, 1:2].float()
    ratio = green / red.clamp_min(1e-3)
    field = images.float().mean(1, keepdim=True) > 0.05
    return ((ratio < dark_ratio) | (ratio > bright_ratio)) & field


def mask_iou(predicted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """IoU per image between a predicted [B, 1, H, W] bool map and the union of the mask's channels."""
    target = mask.float().amax(1, keepdim=True) > 0.5
    if target.shape[-2:] != predicted.shape[-2:]:
        target = F.interpolate(target.float(), size=predicted.shape[-2:], mode="nearest") > 0.5
    intersection = (predicted & target).flatten(1).sum(1).float()
    union = (predicted | target).flatten(1).sum(1).float()
    return intersection / union.clamp_min(1.0)


@dataclass(frozen=True)
class MaskSampling:
    """How validation samples the held-out masks, typed (`from_args`: train_mask_dit.py's flags of the same names)."""

    num_inference_steps: int
    guidance_scale: float
    mask_guidance_scale: float
    seed: int | None
    sampler: str
    time_shift: float | None
    num_validation_images: int  # held-out masks shown and scored (PSNR, SSIM, mask IoU)
    metrics_num_samples: int  # held-out masks sampled for --validation_metrics
    output_dir: str

    @classmethod
    def from_args(cls, args) -> "MaskSampling":
        return cls(**{field.name: getattr(args, field.name) for field in fields(cls)})

    def sample(self, pipeline, batch: dict, device) -> torch.Tensor:
        """Samples [B, 3, H, W] in [0, 1] from the batch's masks (and captions, when the model reads them)."""
        return generate_from_mask(pipeline, batch["mask"].to(device),
                                  batch["captions"] if pipeline.text_encoder else None, self.num_inference_steps,
                                  self.guidance_scale, self.mask_guidance_scale, seed=self.seed or 0,
                                  sampler=self.sampler, time_shift=self.time_shift)


@torch.no_grad()
def log_samples(accelerator, pipeline, held_out, sampling: MaskSampling, step) -> dict:
    """Generate from held-out masks; PSNR / SSIM against the ground truth; IoU of the simple segmenter."""
    count = min(sampling.num_validation_images, len(held_out))
    batch = collate_pairs([held_out[i] for i in range(count)])
    mask, truth = batch["mask"].to(accelerator.device), ((batch["pixel_values"] + 1) / 2).to(accelerator.device)
    samples = sampling.sample(pipeline, batch, accelerator.device)
    metrics = {
        "val/psnr": psnr(samples, truth).mean().item(),
        "val/ssim": ssim(samples, truth).mean().item(),
        "val/mask_iou": mask_iou(segment_structures(samples), mask).mean().item(),
        "val/mask_iou_ground_truth": mask_iou(segment_structures(truth), mask).mean().item(),
    }
    tiles = comparison_tiles(mask, truth, samples)
    path = save_and_log_images(accelerator, tiles, sampling.output_dir, "mask_gt_sample", step, columns=3)
    logger.info(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) + f" -> {path}")
    return metrics


def held_out_quality(accelerator, pipeline, held_out, sampling: MaskSampling, quality) -> dict:
    """--validation_metrics (utils/quality.py) on the first --metrics_num_samples held-out pairs: samples from their
    masks (and captions) against their images; on the main process, shared (QualityMetrics.on_main_process)."""
    from utils.quality import to_uint8

    def samples():
        batch = collate_pairs([held_out[i] for i in range(min(sampling.metrics_num_samples, len(held_out)))])
        generated = sampling.sample(pipeline, batch, accelerator.device)
        return to_uint8(generated.cpu() * 2 - 1), list(batch["captions"]), to_uint8(batch["pixel_values"])

    return quality.on_main_process(accelerator, samples)
