"""MSHNet for infrared small-target segmentation, and its scale- and location-sensitive loss.

Architecture and loss follow the paper "Infrared Small Target Detection with Scale and
Location Sensitivity" (Liu et al., CVPR 2024): a U-Net with widths 16/32/64/128/256 whose
blocks are residual blocks with channel + spatial attention, a bilinear up-sampling decoder,
one 1x1 side head per decoder level (full, 1/2, 1/4 and 1/8 resolution) and a 3x3 conv that
fuses the up-sampled side outputs. Parameter names match the published checkpoints, so
their `state_dict` loads as is; with 3 input channels the model has 4,065,513 parameters.

During the warm-up epochs (`warm_flag=False`) only the full-resolution head is used and
trained with the soft-IoU loss; afterwards all heads are supervised with the SLS loss on
labels down-sampled by max-pooling (`multiscale_sls_loss`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

WIDTHS = (16, 32, 64, 128, 256)
BLOCKS_PER_STAGE = (2, 2, 2, 2)


HEADS = {False: "main", True: "fused"}  # what model(x, warm_flag) scores: the full-resolution head, or the fusion


class ChannelAttention(nn.Module):
    """CBAM channel attention: a shared 2-layer MLP (reduction 16) over avg- and max-pooled features.

    Returns weights [B, C, 1, 1] in (0, 1) to multiply the input by.
    """

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = channels // reduction
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=False)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=False)

    def _mlp(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(pooled), inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self._mlp(F.adaptive_avg_pool2d(x, 1))
        peak = self._mlp(F.adaptive_max_pool2d(x, 1))
        return torch.sigmoid(avg + peak)


class SpatialAttention(nn.Module):
    """CBAM spatial attention: a 7x7 conv over the channel mean and max. Returns weights [B, 1, H, W]."""

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch.max, not amax: the reference's op (gradient to one channel on ties), and its backward
        # is 1.8x faster on CPU at 16 x 256^2 (amax's backward builds a tie mask and divides by its count).
        stats = torch.cat([x.mean(dim=1, keepdim=True), torch.max(x, dim=1, keepdim=True).values], dim=1)
        return torch.sigmoid(self.conv1(stats))


class ResidualAttentionBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, then channel and spatial attention, plus a (projected) shortcut."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = None
        if in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1), nn.BatchNorm2d(out_channels))
        self.ca = ChannelAttention(out_channels)
        self.sa = SpatialAttention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.shortcut is None else self.shortcut(x)
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)  # in place, as the reference: less memory traffic
        out = self.bn2(self.conv2(out))
        out = self.ca(out) * out
        out = self.sa(out) * out
        out += residual
        return F.relu(out, inplace=True)


def _stage(in_channels: int, out_channels: int, num_blocks: int = 1) -> nn.Sequential:
    blocks = [ResidualAttentionBlock(in_channels, out_channels)]
    blocks += [ResidualAttentionBlock(out_channels, out_channels) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


def _upsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=True)


class MSHNet(nn.Module):
    """The MSHNet segmentation network.

    Input [B, C, H, W] with H and W multiples of 16 (four 2x poolings). Outputs are logits.
    """

    def __init__(self, input_channels: int = 3):
        super().__init__()
        c0, c1, c2, c3, c4 = WIDTHS
        b0, b1, b2, b3 = BLOCKS_PER_STAGE
        self.conv_init = nn.Conv2d(input_channels, c0, 1)
        self.encoder_0 = _stage(c0, c0)
        self.encoder_1 = _stage(c0, c1, b0)
        self.encoder_2 = _stage(c1, c2, b1)
        self.encoder_3 = _stage(c2, c3, b2)
        self.middle_layer = _stage(c3, c4, b3)
        self.decoder_3 = _stage(c3 + c4, c3, b2)
        self.decoder_2 = _stage(c2 + c3, c2, b1)
        self.decoder_1 = _stage(c1 + c2, c1, b0)
        self.decoder_0 = _stage(c0 + c1, c0)
        self.output_0 = nn.Conv2d(c0, 1, 1)
        self.output_1 = nn.Conv2d(c1, 1, 1)
        self.output_2 = nn.Conv2d(c2, 1, 1)
        self.output_3 = nn.Conv2d(c3, 1, 1)
        self.final = nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, x: torch.Tensor, warm_flag: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Returns (side_masks, mask), all logits.

        warm_flag False (warm-up): ([], mask [B, 1, H, W] from the full-resolution head).
        warm_flag True: ([m0 [B,1,H,W], m1 [B,1,H/2,W/2], m2 [B,1,H/4,W/4], m3 [B,1,H/8,W/8]],
        mask [B, 1, H, W] fused from the four up-sampled side outputs).
        """
        height, width = x.shape[-2:]
        if height % 16 or width % 16:
            raise ValueError(f"MSHNet needs height and width divisible by 16, got {height}x{width}")
        e0 = self.encoder_0(self.conv_init(x))
        e1 = self.encoder_1(F.max_pool2d(e0, 2))
        e2 = self.encoder_2(F.max_pool2d(e1, 2))
        e3 = self.encoder_3(F.max_pool2d(e2, 2))
        middle = self.middle_layer(F.max_pool2d(e3, 2))
        d3 = self.decoder_3(torch.cat([e3, _upsample(middle, 2)], dim=1))
        d2 = self.decoder_2(torch.cat([e2, _upsample(d3, 2)], dim=1))
        d1 = self.decoder_1(torch.cat([e1, _upsample(d2, 2)], dim=1))
        d0 = self.decoder_0(torch.cat([e0, _upsample(d1, 2)], dim=1))
        if not warm_flag:
            return [], self.output_0(d0)
        side = [self.output_0(d0), self.output_1(d1), self.output_2(d2), self.output_3(d3)]
        fused = torch.cat([side[0], _upsample(side[1], 2), _upsample(side[2], 4), _upsample(side[3], 8)], dim=1)
        return side, self.final(fused)


# ----------------------------------------------------------------------------------------------
# Losses. All take logits [B, 1, H, W] and binary targets [B, 1, H, W] in {0, 1}, and compute in
# float32 (the pixel sums are too large for bf16 under TPU mixed precision).
# ----------------------------------------------------------------------------------------------


def soft_iou_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - mean over the batch of (|P∩T| + smooth) / (|P∪T| + smooth), with P = sigmoid(logits)."""
    pred = torch.sigmoid(logits.float())
    target = target.float()
    intersection = (pred * target).sum(dim=(1, 2, 3))
    union = pred.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3)) - intersection
    return 1 - ((intersection + smooth) / (union + smooth)).mean()


def location_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The SLS location term, averaged over the batch.

    pred: probabilities [B, 1, H, W]; target [B, 1, H, W]. Each map's "centre" is the mean
    over all pixels of (x / W, y / H) weighted by the map (as in the reference, not divided
    by the map's mass). The loss is 1 - |c_pred| / |c_target| (shorter over longer) plus the
    squared angle difference of the two centre vectors scaled by 4 / pi^2.
    """
    height, width = pred.shape[-2:]
    x_coords = torch.arange(width, device=pred.device, dtype=pred.dtype).view(1, 1, 1, width) / width
    y_coords = torch.arange(height, device=pred.device, dtype=pred.dtype).view(1, 1, height, 1) / height

    def centre(weights):
        return (x_coords * weights).mean(dim=(1, 2, 3)), (y_coords * weights).mean(dim=(1, 2, 3))

    pred_x, pred_y = centre(pred)
    target_x, target_y = centre(target.to(pred.dtype))
    angle = (4 / torch.pi**2) * torch.square(
        torch.arctan(pred_y / (pred_x + eps)) - torch.arctan(target_y / (target_x + eps))
    )
    pred_length = torch.sqrt(pred_x**2 + pred_y**2 + eps)
    target_length = torch.sqrt(target_x**2 + target_y**2 + eps)
    length_ratio = torch.minimum(pred_length, target_length) / (torch.maximum(pred_length, target_length) + eps)
    return (1 - length_ratio + angle).mean()


def sls_iou_loss(logits: torch.Tensor, target: torch.Tensor, in_warmup: bool, with_location: bool = True) -> torch.Tensor:
    """Scale- and location-sensitive IoU loss of one output.

    in_warmup=True (warm-up epochs): 1 - mean IoU (no smoothing). Afterwards each image's IoU is
    weighted by alpha = (min(|P|, |T|) + d) / (max(|P|, |T|) + d) with d = ((|P| - |T|) / 2)^2,
    so size mismatches cost more for small targets, and the location loss is added.
    """
    pred = torch.sigmoid(logits.float())
    target = target.float()
    intersection = (pred * target).sum(dim=(1, 2, 3))
    pred_area = pred.sum(dim=(1, 2, 3))
    target_area = target.sum(dim=(1, 2, 3))
    iou = intersection / (pred_area + target_area - intersection)
    if in_warmup:
        return 1 - iou.mean()
    spread = torch.square((pred_area - target_area) / 2)
    alpha = (torch.minimum(pred_area, target_area) + spread) / (torch.maximum(pred_area, target_area) + spread)
    loss = 1 - (alpha * iou).mean()
    if with_location:
        loss = loss + location_loss(pred, target)
    return loss


def multiscale_sls_loss(
    side_masks: list[torch.Tensor], mask: torch.Tensor, target: torch.Tensor, in_warmup: bool
) -> torch.Tensor:
    """The training loss of MSHNet: SLS loss of the main mask and of every side output, averaged.

    side_masks: MSHNet's side outputs ([] during warm-up), the k-th at 1/2^k resolution;
    the target is max-pooled by 2 for each level so a small target never vanishes.
    """
    total = sls_iou_loss(mask, target, in_warmup)
    level_target = target
    for level, side in enumerate(side_masks):
        if level > 0:
            level_target = F.max_pool2d(level_target, 2)
        total = total + sls_iou_loss(side, level_target, in_warmup)
    return total / (len(side_masks) + 1)
