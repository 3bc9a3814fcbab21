"""utils/segmentation/metrics.py: mIoU, nIoU, Pd and Fa on constructed masks (hits, misses, false alarms, empties)."""

import numpy as np
import pytest

from utils.segmentation.metrics import PdFaCurve, SegmentationMetrics, components, match_targets

H = W = 32


def blank():
    return np.zeros((H, W), dtype=bool)


def square(mask, row, col, side=2):
    mask[row : row + side, col : col + side] = True
    return mask


def compute(pred, target):
    metrics = SegmentationMetrics()
    metrics.update(np.stack(pred), np.stack(target))
    return metrics.compute()


def test_perfect_prediction():
    target = square(blank(), 5, 5)
    result = compute([target], [target])
    assert result["mIoU"] == 1 and result["nIoU"] == 1 and result["Pd"] == 1 and result["Fa_1e-6"] == 0


def test_missed_target():
    result = compute([blank()], [square(blank(), 5, 5)])
    assert result["mIoU"] == 0 and result["Pd"] == 0 and result["Fa_1e-6"] == 0
    assert result["num_targets"] == 1 and result["num_detected"] == 0


def test_false_alarm_pixels_over_all_pixels():
    target = square(blank(), 5, 5)
    pred = square(target.copy(), 20, 20, side=3)  # the hit plus a 9-pixel false alarm
    result = compute([pred], [target])
    assert result["Pd"] == 1
    assert result["false_alarm_pixels"] == 9
    assert result["Fa_1e-6"] == pytest.approx(1e6 * 9 / (H * W))
    assert result["mIoU"] == pytest.approx(4 / 13)


def test_detection_needs_centroid_closer_than_three_pixels():
    target = square(blank(), 10, 10)
    shifted_2 = square(blank(), 10, 12)  # touching, centroid 2 px away: detected
    assert match_targets(shifted_2, target) == (1, 1, 0)
    shifted_3 = square(blank(), 10, 13)  # centroid 3 px away: not < 3, so a miss and a false alarm
    assert match_targets(shifted_3, target) == (1, 0, 4)
    diagonal = square(blank(), 12, 12)  # centroid 2*sqrt(2) = 2.83 px away: detected
    assert match_targets(diagonal, target) == (1, 1, 0)


def test_components_are_eight_connected():
    mask = blank()
    mask[3, 3] = mask[4, 4] = mask[5, 5] = True  # a diagonal line: one component
    centroids, areas = components(mask)
    assert len(areas) == 1 and areas[0] == 3
    np.testing.assert_allclose(centroids[0], [4, 4])


def test_each_predicted_component_detects_at_most_one_target():
    target = blank()
    target[10, 10] = target[10, 13] = True  # two targets 3 px apart
    pred = blank()
    pred[10, 11:13] = True  # one component between them, centroid 1.5 px from each
    assert match_targets(pred, target) == (2, 1, 0)


def test_unmatched_components_found_by_identity_not_by_area():
    # The reference drops every false alarm whose area equals a matched component's area.
    target = square(blank(), 5, 5)
    pred = square(square(blank(), 5, 5), 20, 20)  # hit (area 4) + false alarm (also area 4)
    assert match_targets(pred, target) == (1, 1, 4)


def test_empty_images():
    result = compute([blank(), blank()], [blank(), blank()])
    assert result["nIoU"] == 0.0  # the papers' reference code: inter / (eps + union) = 0 for an empty frame
    assert result["nIoU_target_frames"] is None  # no frame holds a target
    assert result["mIoU"] is None and result["Pd"] is None  # undefined without any target pixel / target
    assert result["Fa_1e-6"] == 0 and result["num_images"] == 2
    with_false_alarm = compute([square(blank(), 1, 1)], [blank()])
    assert with_false_alarm["nIoU"] == 0 and with_false_alarm["mIoU"] == 0
    assert with_false_alarm["Fa_1e-6"] == pytest.approx(1e6 * 4 / (H * W))


def test_miou_is_dataset_level_and_niou_is_per_image_mean():
    big_target, big_pred = square(blank(), 0, 0, side=10), square(blank(), 0, 0, side=10)  # IoU 1 (100 px)
    small_target, small_pred = square(blank(), 20, 20), blank()  # IoU 0 (4 px)
    result = compute([big_pred, small_pred], [big_target, small_target])
    assert result["mIoU"] == pytest.approx(100 / 104)
    assert result["nIoU"] == pytest.approx(0.5)


def test_reset_clears_every_count():
    metrics = SegmentationMetrics()
    metrics.update(np.stack([blank()]), np.stack([square(blank(), 5, 5)]))
    metrics.reset()  # the reference kept its target count across evaluations
    metrics.update(np.stack([square(blank(), 5, 5)]), np.stack([square(blank(), 5, 5)]))
    result = metrics.compute()
    assert result["num_targets"] == 1 and result["Pd"] == 1 and result["num_images"] == 1


def test_accepts_channel_dimension_and_float_masks():
    target = square(blank(), 5, 5)[None, None].astype(np.float32)
    metrics = SegmentationMetrics()
    metrics.update(target.copy(), target)
    assert metrics.compute()["mIoU"] == 1


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        SegmentationMetrics().update(np.zeros((1, 8, 8)), np.zeros((1, 8, 9)))


def reference_niou(preds, targets):
    """nIoU as the ACM/DNANet-lineage code the papers' tables come from computes it: per image
    inter / (eps + union), then the mean over images (written from the formula, independently)."""
    eps = np.spacing(1)
    ious = [np.logical_and(p, t).sum() / (eps + np.logical_or(p, t).sum()) for p, t in zip(preds, targets)]
    return float(np.mean(ious))


def test_niou_follows_the_papers_convention_on_a_set_with_empty_frames():
    rng = np.random.default_rng(0)
    preds, targets = [], []
    for index in range(40):
        target = blank() if index % 7 == 0 else square(blank(), *rng.integers(2, 26, 2), side=int(rng.integers(1, 5)))
        pred = blank() if index % 5 == 0 else square(blank(), *rng.integers(2, 26, 2), side=int(rng.integers(1, 5)))
        if index % 3 == 0:
            pred |= target
        preds.append(pred)
        targets.append(target)
    result = compute(preds, targets)
    assert result["nIoU"] == pytest.approx(reference_niou(preds, targets), abs=1e-12)
    with_target = [i for i, t in enumerate(targets) if t.any()]
    assert len(with_target) < len(targets)
    assert result["nIoU_target_frames"] == pytest.approx(
        reference_niou([preds[i] for i in with_target], [targets[i] for i in with_target]), abs=1e-12)


def test_pixel_precision_recall_f1():
    target = square(blank(), 0, 0, side=4)  # 16 px
    pred = square(blank(), 0, 0, side=2) | square(blank(), 20, 20, side=2)  # 4 px hit + 4 px false
    result = compute([pred], [target])
    assert result["precision"] == pytest.approx(4 / 8) and result["recall"] == pytest.approx(4 / 16)
    assert result["F1"] == pytest.approx(2 * 0.5 * 0.25 / 0.75)
    assert compute([blank()], [target])["F1"] is None  # nothing predicted: precision undefined


def test_mshnet_compat_reproduces_the_reference_fa_and_is_labelled():
    target = square(blank(), 5, 5)
    pred = square(square(blank(), 5, 5), 20, 20)  # hit (area 4) + false alarm (also area 4)
    assert match_targets(pred, target, compat="mshnet") == (1, 1, 0)  # the reference drops the equal-area alarm
    pred_other_area = square(square(blank(), 5, 5), 20, 20, side=3)
    assert match_targets(pred_other_area, target, compat="mshnet") == (1, 1, 9)
    metrics = SegmentationMetrics(compat="mshnet")
    metrics.update(np.stack([pred]), np.stack([target]))
    assert metrics.compute()["Fa_1e-6"] == 0 and metrics.compute()["metric_compat"] == "mshnet"
    assert compute([pred], [target])["metric_compat"] == "corrected"
    with pytest.raises(ValueError, match="compat"):
        SegmentationMetrics(compat="basicirstd")


def test_pd_fa_curve_sweeps_the_probability_threshold():
    target = square(blank(), 5, 5)
    probabilities = np.full((H, W), 0.05)  # background
    probabilities[5:7, 5:7] = 0.75  # the target, found up to threshold 0.7
    probabilities[20:22, 20:22] = 0.35  # a false alarm up to threshold 0.3
    curve = PdFaCurve(bins=10)
    curve.update(probabilities[None], target[None])
    rows = {round(row["threshold"], 2): row for row in curve.rows()}
    assert len(rows) == 11
    assert rows[0.0]["Fa_1e-6"] == pytest.approx(1e6) and rows[0.0]["Pd"] == 0  # one frame-wide component
    assert rows[0.3]["Pd"] == 1 and rows[0.3]["Fa_1e-6"] == pytest.approx(1e6 * 4 / (H * W))
    assert rows[0.4]["Pd"] == 1 and rows[0.4]["Fa_1e-6"] == 0 and rows[0.4]["F1"] == 1
    assert rows[0.8]["Pd"] == 0 and rows[0.8]["TPR"] == 0 and rows[1.0]["FPR"] == 0
    assert rows[0.3]["FPR"] == pytest.approx(4 / (H * W - 4))
