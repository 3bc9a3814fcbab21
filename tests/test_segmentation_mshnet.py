"""utils/segmentation/mshnet.py: MSHNet's shapes, size and parameter names, and the SLS loss on hand-computed cases."""

import math

import pytest
import torch
import torch.nn.functional as F

from utils.segmentation.mshnet import MSHNet, location_loss, multiscale_sls_loss, sls_iou_loss, soft_iou_loss

BIG = 30.0  # sigmoid(±30) is 0/1 to float32 precision, so predictions below are exact binary masks


def binary_logits(mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask > 0, torch.tensor(BIG), torch.tensor(-BIG))


def test_parameter_count_matches_the_published_model():
    assert sum(p.numel() for p in MSHNet(3).parameters()) == 4_065_513
    # Only the 1x1 input conv depends on the channel count: 16 weights per input channel.
    assert sum(p.numel() for p in MSHNet(1).parameters()) == 4_065_513 - 2 * 16


def test_state_dict_uses_the_reference_parameter_names():
    keys = set(MSHNet(3).state_dict())
    for key in ("conv_init.weight", "encoder_0.0.conv1.weight", "encoder_1.0.shortcut.0.weight",
                "encoder_1.1.ca.fc1.weight", "middle_layer.1.sa.conv1.weight", "decoder_0.0.bn2.running_mean",
                "output_3.weight", "final.weight", "final.bias"):
        assert key in keys
    assert "encoder_0.0.shortcut.0.weight" not in keys  # same width in and out: identity shortcut


@pytest.mark.parametrize("size", [32, 64])
def test_forward_shapes_in_warmup_and_multiscale_mode(size):
    model = MSHNet(3).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        side, mask = model(x, warm_flag=False)
        assert side == [] and mask.shape == (2, 1, size, size)
        side, mask = model(x, warm_flag=True)
    assert mask.shape == (2, 1, size, size)
    assert [tuple(s.shape) for s in side] == [(2, 1, size // 2**k, size // 2**k) for k in range(4)]


def test_forward_rejects_sizes_that_do_not_pool_four_times():
    with pytest.raises(ValueError, match="divisible by 16"):
        MSHNet(3)(torch.randn(1, 3, 40, 40), warm_flag=False)


def test_warmup_output_is_the_full_resolution_head():
    model = MSHNet(3).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        (head0, *_), _ = model(x, warm_flag=True)
        _, warm_mask = model(x, warm_flag=False)
    torch.testing.assert_close(warm_mask, head0)


def one_pixel_target_and_two_pixel_prediction():
    target = torch.zeros(1, 1, 4, 4)
    target[0, 0, 1, 1] = 1
    pred = target.clone()
    pred[0, 0, 1, 2] = 1
    return binary_logits(pred), target


def test_soft_iou_loss_hand_computed():
    logits, target = one_pixel_target_and_two_pixel_prediction()
    # intersection 1, union 2, smooth 1: 1 - (1 + 1) / (2 + 1)
    assert soft_iou_loss(logits, target).item() == pytest.approx(1 / 3, abs=1e-6)


def test_sls_loss_in_warmup_is_plain_iou_loss():
    logits, target = one_pixel_target_and_two_pixel_prediction()
    assert sls_iou_loss(logits, target, in_warmup=True).item() == pytest.approx(0.5, abs=1e-6)


def test_sls_loss_scale_weight_hand_computed():
    logits, target = one_pixel_target_and_two_pixel_prediction()
    # |P| = 2, |T| = 1: d = ((2 - 1) / 2)^2 = 1/4, alpha = (1 + 1/4) / (2 + 1/4) = 5/9, IoU = 1/2.
    expected = 1 - (5 / 9) * 0.5
    assert sls_iou_loss(logits, target, in_warmup=False, with_location=False).item() == pytest.approx(expected, abs=1e-6)
    with_location = sls_iou_loss(logits, target, in_warmup=False).item()
    assert with_location == pytest.approx(expected + location_loss(torch.sigmoid(logits), target).item(), abs=1e-6)


def test_sls_scale_weight_penalises_small_targets_more():
    """Same IoU, but the size mismatch costs more the smaller the target (the point of SLS)."""
    def loss_for(target_side):
        target = torch.zeros(1, 1, 32, 32)
        target[0, 0, :target_side, :target_side] = 1
        pred = torch.zeros_like(target)
        pred[0, 0, : 2 * target_side, :target_side] = 1  # twice the target: IoU 1/2 at every size
        return sls_iou_loss(binary_logits(pred), target, in_warmup=False, with_location=False).item()

    assert loss_for(2) > loss_for(8)


def test_location_loss_hand_computed():
    target = torch.zeros(1, 1, 4, 4)
    target[0, 0, 1, 2] = 1  # centre (x, y) = (2/4 / 16, 1/4 / 16)
    assert location_loss(target.clone(), target).item() == pytest.approx(0.0, abs=1e-6)
    pred = torch.zeros_like(target)
    pred[0, 0, 2, 1] = 1  # mirrored: same length, angle atan(2) instead of atan(1/2)
    expected = 4 / math.pi**2 * (math.atan(2.0) - math.atan(0.5)) ** 2
    assert location_loss(pred, target).item() == pytest.approx(expected, rel=1e-4)
    near, farther = torch.zeros_like(target), torch.zeros_like(target)
    near[0, 0, 1, 1] = 1
    farther[0, 0, 2, 2] = 1  # twice the centre vector, same direction: only the length term, 1 - 1/2
    assert location_loss(farther, near).item() == pytest.approx(0.5, abs=1e-4)


def test_location_loss_batch_is_the_mean_of_samples():
    torch.manual_seed(0)
    pred, target = torch.rand(3, 1, 8, 8), (torch.rand(3, 1, 8, 8) > 0.8).float()
    per_sample = [location_loss(pred[i : i + 1], target[i : i + 1]).item() for i in range(3)]
    assert location_loss(pred, target).item() == pytest.approx(sum(per_sample) / 3, rel=1e-5)


def test_multiscale_loss_uses_maxpooled_labels_per_level():
    torch.manual_seed(0)
    target = torch.zeros(2, 1, 16, 16)
    target[0, 0, 5, 7] = 1  # a one-pixel target must survive every down-sampling
    target[1, 0, 2:4, 9:12] = 1
    side = [torch.randn(2, 1, 16 // 2**k, 16 // 2**k) for k in range(4)]
    mask = torch.randn(2, 1, 16, 16)
    levels = [target, F.max_pool2d(target, 2), F.max_pool2d(target, 4), F.max_pool2d(target, 8)]
    assert all(level.sum(dim=(1, 2, 3)).min() >= 1 for level in levels)
    expected = sls_iou_loss(mask, target, False) + sum(sls_iou_loss(s, t, False) for s, t in zip(side, levels))
    assert multiscale_sls_loss(side, mask, target, in_warmup=False).item() == pytest.approx(expected.item() / 5, rel=1e-6)
    # Warm-up: no side outputs, just the main head's IoU loss.
    assert multiscale_sls_loss([], mask, target, in_warmup=True).item() == pytest.approx(
        sls_iou_loss(mask, target, True).item(), rel=1e-6)


def test_loss_backpropagates_to_every_parameter_after_warmup():
    model = MSHNet(3)
    x = torch.randn(2, 3, 32, 32)
    target = torch.zeros(2, 1, 32, 32)
    target[:, :, 10:12, 20:22] = 1
    side, mask = model(x, warm_flag=True)
    loss = multiscale_sls_loss(side, mask, target, in_warmup=False)
    loss.backward()
    assert torch.isfinite(loss)
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert missing == []


def test_losses_compute_in_float32_under_bf16_inputs():
    logits, target = one_pixel_target_and_two_pixel_prediction()
    loss = sls_iou_loss(logits.bfloat16(), target.bfloat16(), in_warmup=False)
    assert loss.dtype == torch.float32
