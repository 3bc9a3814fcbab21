"""Scoring MSHNet on a test split: the metrics of one pass (overall, per part of a multi-part set, the Pd-Fa
curve), the predicted masks, the prediction grid, and the result as a row of the papers' tables."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image
from scipy.special import expit

from utils.segmentation.data import tensor_to_image
from utils.segmentation.metrics import PdFaCurve, SegmentationMetrics
from utils.segmentation.mshnet import HEADS



class EvalResult:
    """The metrics of one evaluation pass: overall, per part of the data set (SIRST3), and the Pd-Fa curve."""

    def __init__(self, sources: list[str], compat: str | None, roc_bins: int | None):
        self.parts = sorted(set(sources))
        self.overall = SegmentationMetrics(compat=compat)
        self.by_part = {part: SegmentationMetrics(compat=compat) for part in self.parts} if len(self.parts) > 1 else {}
        self.curve = PdFaCurve(roc_bins, compat=compat) if roc_bins else None

    def update(self, logits: np.ndarray, target: np.ndarray, source: str) -> np.ndarray:
        """One sample's logits and mask [H, W]; returns its binary prediction (uint8)."""
        pred = (logits > 0).astype(np.uint8)
        self.overall.update(pred[None], target[None])
        if self.by_part:
            self.by_part[source].update(pred[None], target[None])
        if self.curve is not None:
            self.curve.update(expit(logits.astype(np.float64))[None], target[None])
        return pred

    def metrics(self, head: str, eval_size: str) -> dict:
        result = {**self.overall.compute(), "head": head, "eval_size": eval_size}
        if self.by_part:
            result["per_dataset"] = {part: metrics.compute() for part, metrics in self.by_part.items()}
        return result


@torch.no_grad()
def evaluate(accelerator, model, eval_loader, eval_set, warm_flag: bool, metric_compat: str, base_size: int,
             predictions_dir: str | None = None, roc_bins: int | None = None):
    """Segment the evaluation split; metrics are computed on the host from gathered logits.

    Scores `model(x, warm_flag)`, as the reference's main.py does: the main head during warm-up, the fused
    output after it (and in --mode test); the metrics say which under "head". Frames evaluated at their
    native size are cropped back from the padding before scoring. Returns (metrics, EvalResult, {dataset
    index: binary prediction [H, W] uint8}) on every process; without `predictions_dir`, up to 64
    predictions are kept in memory for the prediction grid; masks are written as PNGs under predictions_dir.
    """
    model.eval()
    result = EvalResult(eval_set.sources, None if metric_compat == "corrected" else metric_compat, roc_bins)
    kept = {}
    for batch in eval_loader:
        _, logits = model(batch["pixel_values"], warm_flag)
        sizes = batch.get("size", torch.tensor(logits.shape[-2:]).expand(len(logits), 2).to(logits.device))
        # gather_for_metrics drops the samples accelerate repeated to even out the last batch.
        logits, target, index, sizes = accelerator.gather_for_metrics(
            (logits.float(), batch["mask"], batch["index"], sizes))
        logits, target = logits.cpu().numpy()[:, 0], target.cpu().numpy()[:, 0]
        for sample_logits, sample_target, sample_index, (height, width) in zip(
                logits, target, index.cpu().tolist(), sizes.cpu().tolist()):
            pred = result.update(sample_logits[:height, :width], sample_target[:height, :width],
                                 eval_set.sources[sample_index])
            if predictions_dir is not None and accelerator.is_main_process:
                path = os.path.join(predictions_dir, *prediction_subdir(eval_set, sample_index),
                                    f"{eval_set.names[sample_index]}.png")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                Image.fromarray(pred * 255, mode="L").save(path)
            elif predictions_dir is None and len(kept) < 64:
                kept[sample_index] = pred
    model.train()
    return result.metrics(HEADS[warm_flag], "native" if eval_set.native_size else f"{base_size}"), result, kept


def prediction_subdir(eval_set, index: int) -> tuple[str, ...]:
    """Masks of a multi-part set (SIRST3) go into one folder per part."""
    return (eval_set.sources[index],) if len(set(eval_set.sources)) > 1 else ()


def prediction_grid(eval_set, predictions: dict, num_images: int) -> np.ndarray | None:
    """Rows of [image | ground truth | prediction] for the first `num_images` test samples, uint8 [H, W, 3]."""
    rows = []
    for index in sorted(predictions)[:num_images]:
        sample = eval_set[index]
        height, width = predictions[index].shape
        image = tensor_to_image(sample["pixel_values"])[:height, :width]
        truth = np.repeat(sample["mask"][0, :height, :width].numpy()[..., None] * 255, 3, axis=2).astype(np.uint8)
        pred = np.repeat(predictions[index][..., None] * 255, 3, axis=2).astype(np.uint8)
        rows.append(np.concatenate([image, truth, pred], axis=1))
    if rows and len({row.shape for row in rows}) > 1:  # native-size frames of several sizes: pad to the widest
        height, width = max(row.shape[0] for row in rows), max(row.shape[1] for row in rows)
        rows = [np.pad(row, ((0, height - row.shape[0]), (0, width - row.shape[1]), (0, 0))) for row in rows]
    return np.concatenate(rows, axis=0) if rows else None


PUBLISHED = {"IRSTD-1K": (67.16, 93.88, 15.03), "NUDT-SIRST": (80.55, 97.99, 11.77)}


def table_rows(metrics: dict, dataset: str) -> list[str]:
    """The result as a row of the papers' tables (mIoU, nIoU, Pd, F1 x1e-2; Fa x1e-6), one per part of the set."""
    def row(name, m):
        cells = [f"{100 * m[k]:.2f}" if m[k] is not None else "-" for k in ("mIoU", "nIoU", "Pd")]
        fa = f"{m['Fa_1e-6']:.2f}" if m["Fa_1e-6"] is not None else "-"
        f1 = f"{100 * m['F1']:.2f}" if m["F1"] is not None else "-"
        return f"| MSHNet (this run) | {name} | {' | '.join(cells)} | {fa} | {f1} |"

    lines = ["| Method | Dataset | mIoU (x1e-2) | nIoU (x1e-2) | Pd (x1e-2) | Fa (x1e-6) | F1 (x1e-2) |",
             "|---|---|---|---|---|---|---|", row(dataset, metrics)]
    lines += [row(part, part_metrics) for part, part_metrics in metrics.get("per_dataset", {}).items()]
    for name in [dataset, *metrics.get("per_dataset", {})]:
        if name in PUBLISHED:
            miou, pd, fa = PUBLISHED[name]
            lines.append(f"| MSHNet (README, published) | {name} | {miou} | - | {pd} | {fa} | - |")
    return lines

