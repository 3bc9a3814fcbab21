"""Infrared small-target metrics: mIoU, nIoU, probability of detection (Pd), false-alarm rate (Fa).

All inputs are binary masks on the host (NumPy), gathered from every process first
(`accelerator.gather_for_metrics`, which drops the samples padded in to even out batches).

- mIoU: dataset-level IoU of the target class, sum(|P∩T|) / sum(|P∪T|) over all images.
- nIoU: mean of per-image IoUs, |P∩T| / |P∪T| with 0 for an image with neither target nor
        prediction: the convention of the reference code the papers' tables come from
        (ACM/DNANet lineage, `inter / (eps + union)`). `nIoU_target_frames` is the same mean
        over the frames that hold a target only (empty frames affect it through Fa alone).
- Precision, recall, F1: pixel level, over the whole set (as SCTransNet/DNANet report F1).
- Pd:   targets detected / targets. Targets and predictions are 8-connected components; a
        target is detected when a not-yet-matched predicted component's centroid lies within
        `distance` (3) px of the target's centroid (targets in label order, first match wins).
- Fa:   pixels of predicted components that matched no target / all pixels. `compute()`
        reports it x1e-6 (as papers do) under "Fa_1e-6".

Differences from the MSHNet reference implementation (on purpose): the target count is reset
with everything else in `reset()`, and unmatched components are found by identity, not by
comparing areas (which dropped every false alarm whose area equalled a matched one's).
`compat="mshnet"` reproduces that Fa, for comparison with the numbers the MSHNet repository
publishes; results computed so are labelled `"metric_compat": "mshnet"`.

`PdFaCurve` sweeps the decision threshold on the sigmoid probability (0, 1/bins, ..., 1, as the
reference's ROCMetric/PD_FA) and gives Pd, Fa, pixel TPR/FPR, precision, recall and F1 per
threshold: the Pd-Fa ROC curve that DNANet/SCTransNet plot.
"""

from __future__ import annotations

import os

import numpy as np
from scipy import ndimage

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-connected components of a 2-D binary mask: (centroids [N, 2] as (row, col), areas [N])."""
    labels, count = ndimage.label(mask, structure=EIGHT_CONNECTED)
    if count == 0:
        return np.zeros((0, 2)), np.zeros((0,), dtype=np.int64)
    index = np.arange(1, count + 1)
    centroids = np.asarray(ndimage.center_of_mass(np.ones_like(labels), labels, index), dtype=np.float64)
    areas = np.asarray(ndimage.sum_labels(np.ones_like(labels), labels, index), dtype=np.int64)
    return centroids.reshape(count, 2), areas


METRIC_COMPAT = (None, "mshnet")


def match_targets(pred: np.ndarray, target: np.ndarray, distance: float = 3.0,
                  compat: str | None = None) -> tuple[int, int, int]:
    """Match one image's predicted components to its targets.

    pred, target: binary masks [H, W]. Returns (num_targets, num_detected, false_alarm_pixels):
    every target takes the first unmatched predicted component whose centroid is closer than
    `distance` px; false-alarm pixels are the areas of the predicted components left unmatched
    (compat "mshnet": of the components whose area equals no matched component's area).
    """
    pred_centroids, pred_areas = components(pred)
    target_centroids, _ = components(target)
    unmatched = list(range(len(pred_areas)))
    detected = 0
    for centroid in target_centroids:
        for position, component in enumerate(unmatched):
            if np.linalg.norm(pred_centroids[component] - centroid) < distance:
                detected += 1
                del unmatched[position]
                break
    if compat == "mshnet":
        matched_areas = set(np.delete(pred_areas, unmatched).tolist())
        return len(target_centroids), detected, int(sum(a for a in pred_areas.tolist() if a not in matched_areas))
    return len(target_centroids), detected, int(pred_areas[unmatched].sum()) if unmatched else 0


def intersection_union(pred: np.ndarray, target: np.ndarray) -> tuple[int, int]:
    """|P∩T| and |P∪T| in pixels for binary masks of the same shape."""
    pred, target = pred.astype(bool), target.astype(bool)
    return int(np.logical_and(pred, target).sum()), int(np.logical_or(pred, target).sum())


def _as_masks(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, target = np.asarray(pred), np.asarray(target) > 0
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} != target shape {target.shape}")
    if pred.ndim == 4:
        pred, target = pred[:, 0], target[:, 0]
    if pred.ndim != 3:
        raise ValueError(f"expected masks [B, H, W] or [B, 1, H, W], got shape {pred.shape}")
    return pred, target


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def _f1(precision: float | None, recall: float | None) -> float | None:
    if precision is None or recall is None:
        return None
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


class SegmentationMetrics:
    """Accumulates mIoU, nIoU, Pd, Fa, F1 over batches of binary masks; `reset()` clears everything."""

    def __init__(self, distance: float = 3.0, compat: str | None = None):
        if compat not in METRIC_COMPAT:
            raise ValueError(f"compat must be one of {METRIC_COMPAT}, got {compat!r}")
        self.distance, self.compat = distance, compat
        self.reset()

    def reset(self) -> None:
        self.total_intersection = 0
        self.total_union = 0
        self.total_predicted = 0
        self.total_target = 0
        self.image_ious: list[float] = []
        self.image_has_target: list[bool] = []
        self.num_targets = 0
        self.num_detected = 0
        self.false_alarm_pixels = 0
        self.total_pixels = 0

    def update(self, pred: np.ndarray, target: np.ndarray) -> None:
        """pred, target: binary masks [B, H, W] or [B, 1, H, W] (bool, or numbers where > 0 is target)."""
        pred, target = _as_masks(pred, target)
        pred = pred > 0
        for image_pred, image_target in zip(pred, target):
            intersection, union = intersection_union(image_pred, image_target)
            self.total_intersection += intersection
            self.total_union += union
            self.total_predicted += int(image_pred.sum())
            self.total_target += int(image_target.sum())
            self.image_ious.append(intersection / union if union else 0.0)  # the papers' convention
            self.image_has_target.append(bool(image_target.any()))
            targets, detected, false_alarm = match_targets(image_pred, image_target, self.distance, self.compat)
            self.num_targets += targets
            self.num_detected += detected
            self.false_alarm_pixels += false_alarm
            self.total_pixels += image_pred.size

    def compute(self) -> dict[str, float | int | None]:
        """mIoU, nIoU, Pd, F1 in [0, 1] (None when undefined: no union / no targets) and Fa x1e-6."""
        num_images = len(self.image_ious)
        target_ious = [iou for iou, has in zip(self.image_ious, self.image_has_target) if has]
        precision = _ratio(self.total_intersection, self.total_predicted)
        recall = _ratio(self.total_intersection, self.total_target)
        return {
            "mIoU": _ratio(self.total_intersection, self.total_union),
            "nIoU": float(np.mean(self.image_ious)) if num_images else None,
            "nIoU_target_frames": float(np.mean(target_ious)) if target_ious else None,
            "Pd": _ratio(self.num_detected, self.num_targets),
            "Fa_1e-6": 1e6 * self.false_alarm_pixels / self.total_pixels if self.total_pixels else None,
            "precision": precision,
            "recall": recall,
            "F1": _f1(precision, recall),
            "metric_compat": self.compat or "corrected",
            "num_images": num_images,
            "num_targets": self.num_targets,
            "num_detected": self.num_detected,
            "false_alarm_pixels": self.false_alarm_pixels,
        }


class PdFaCurve:
    """Pd, Fa and pixel TPR/FPR/precision/recall/F1 at thresholds k/bins (k = 0..bins) of the sigmoid probability.

    A pixel is predicted as target when its probability is > the threshold (the reference's rule; at 0 every
    pixel is, at 1 none is). `update` takes probabilities [B, (1,) H, W] in [0, 1] and binary targets.
    """

    def __init__(self, bins: int = 10, distance: float = 3.0, compat: str | None = None):
        self.thresholds = [k / bins for k in range(bins + 1)]
        self.curves = [SegmentationMetrics(distance, compat) for _ in self.thresholds]

    def update(self, probabilities: np.ndarray, target: np.ndarray) -> None:
        probabilities, target = _as_masks(probabilities, target)
        for threshold, metrics in zip(self.thresholds, self.curves):
            metrics.update(probabilities > threshold, target)

    def rows(self) -> list[dict]:
        rows = []
        for threshold, metrics in zip(self.thresholds, self.curves):
            result = metrics.compute()
            negatives = metrics.total_pixels - metrics.total_target
            false_positive_pixels = metrics.total_predicted - metrics.total_intersection
            rows.append({"threshold": threshold, "Pd": result["Pd"], "Fa_1e-6": result["Fa_1e-6"],
                         "TPR": result["recall"], "FPR": _ratio(false_positive_pixels, negatives),
                         "precision": result["precision"], "recall": result["recall"], "F1": result["F1"],
                         "mIoU": result["mIoU"]})
        return rows

    def write(self, directory: str, title: str = "Pd-Fa curve") -> tuple[str, str]:
        """roc.csv (one row per threshold) and roc.png (Pd against Fa, and pixel TPR against FPR) in `directory`."""
        import csv

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.rows()
        csv_path, png_path = os.path.join(directory, "roc.csv"), os.path.join(directory, "roc.png")
        with open(csv_path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        figure, (left, right) = plt.subplots(1, 2, figsize=(9, 4))
        points = [(r["Fa_1e-6"], r["Pd"]) for r in rows if r["Pd"] is not None]
        if points:
            left.plot(*zip(*points), marker="o")
        left.set(xlabel="Fa (x1e-6)", ylabel="Pd", title=title)
        pixel = [(r["FPR"], r["TPR"]) for r in rows if r["TPR"] is not None and r["FPR"] is not None]
        if pixel:
            right.plot(*zip(*pixel), marker="o")
        right.set(xlabel="pixel FPR", ylabel="pixel TPR", title="pixel ROC")
        figure.tight_layout()
        figure.savefig(png_path, dpi=100)
        plt.close(figure)
        return csv_path, png_path
