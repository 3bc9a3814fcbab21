"""Infrared small-target metrics: mIoU, nIoU, probability of detection (Pd), false-alarm rate (Fa).

All inputs are binary masks on the host (NumPy), gathered from every process first
(`accelerator.gather_for_metrics`, which drops the samples padded in to even out batches).

- mIoU: dataset-level IoU of the target class, sum(|P∩T|) / sum(|P∪T|) over all images.
- nIoU: mean of per-image IoUs. An image with neither target nor prediction scores 1.
- Pd:   targets detected / targets. Targets and predictions are 8-connected components; a
        target is detected when a not-yet-matched predicted component's centroid lies within
        `distance` (3) px of the target's centroid (targets in label order, first match wins).
- Fa:   pixels of predicted components that matched no target / all pixels. `compute()`
        reports it x1e-6 (as papers do) under "Fa_1e-6".

Differences from the reference implementation (on purpose): the target count is reset with
everything else in `reset()`, and unmatched components are found by identity, not by
comparing areas (which dropped every false alarm whose area equalled a matched one's).
"""

from __future__ import annotations

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


def match_targets(pred: np.ndarray, target: np.ndarray, distance: float = 3.0) -> tuple[int, int, int]:
    """Match one image's predicted components to its targets.

    pred, target: binary masks [H, W]. Returns (num_targets, num_detected, false_alarm_pixels):
    every target takes the first unmatched predicted component whose centroid is closer than
    `distance` px; false-alarm pixels are the areas of the predicted components left unmatched.
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
    return len(target_centroids), detected, int(pred_areas[unmatched].sum()) if unmatched else 0


def intersection_union(pred: np.ndarray, target: np.ndarray) -> tuple[int, int]:
    """|P∩T| and |P∪T| in pixels for binary masks of the same shape."""
    pred, target = pred.astype(bool), target.astype(bool)
    return int(np.logical_and(pred, target).sum()), int(np.logical_or(pred, target).sum())


class SegmentationMetrics:
    """Accumulates mIoU, nIoU, Pd and Fa over batches of binary masks; `reset()` clears everything."""

    def __init__(self, distance: float = 3.0):
        self.distance = distance
        self.reset()

    def reset(self) -> None:
        self.total_intersection = 0
        self.total_union = 0
        self.image_ious: list[float] = []
        self.num_targets = 0
        self.num_detected = 0
        self.false_alarm_pixels = 0
        self.total_pixels = 0

    def update(self, pred: np.ndarray, target: np.ndarray) -> None:
        """pred, target: binary masks [B, H, W] or [B, 1, H, W] (bool, or numbers where > 0 is target)."""
        pred, target = np.asarray(pred) > 0, np.asarray(target) > 0
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {pred.shape} != target shape {target.shape}")
        if pred.ndim == 4:
            pred, target = pred[:, 0], target[:, 0]
        if pred.ndim != 3:
            raise ValueError(f"expected masks [B, H, W] or [B, 1, H, W], got shape {pred.shape}")
        for image_pred, image_target in zip(pred, target):
            intersection, union = intersection_union(image_pred, image_target)
            self.total_intersection += intersection
            self.total_union += union
            self.image_ious.append(intersection / union if union else 1.0)
            targets, detected, false_alarm = match_targets(image_pred, image_target, self.distance)
            self.num_targets += targets
            self.num_detected += detected
            self.false_alarm_pixels += false_alarm
            self.total_pixels += image_pred.size

    def compute(self) -> dict[str, float | int | None]:
        """mIoU, nIoU, Pd in [0, 1] (None when undefined: no union / no targets) and Fa x1e-6."""
        num_images = len(self.image_ious)
        return {
            "mIoU": self.total_intersection / self.total_union if self.total_union else None,
            "nIoU": float(np.mean(self.image_ious)) if num_images else None,
            "Pd": self.num_detected / self.num_targets if self.num_targets else None,
            "Fa_1e-6": 1e6 * self.false_alarm_pixels / self.total_pixels if self.total_pixels else None,
            "num_images": num_images,
            "num_targets": self.num_targets,
            "num_detected": self.num_detected,
            "false_alarm_pixels": self.false_alarm_pixels,
        }
