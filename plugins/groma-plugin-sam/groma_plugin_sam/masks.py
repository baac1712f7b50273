"""The mask arithmetic of segment-anything's automatic mask generator, in PyTorch: point grid, upscaling of the
decoder's low-resolution logits, stability score and boxes around masks."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F


def point_grid(points_per_side: int) -> np.ndarray:
    """(n^2, 2) float64 points (x, y) evenly spaced in [0, 1]^2, cell centres, x varying fastest."""
    offset = 1 / (2 * points_per_side)
    side = np.linspace(offset, 1 - offset, points_per_side)
    xs = np.tile(side[None, :], (points_per_side, 1))
    ys = np.tile(side[:, None], (1, points_per_side))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def upscale_logits(low_res: Tensor, input_size: int, resized: tuple[int, int], original: tuple[int, int]) -> Tensor:
    """Decoder logits (N, h, w) -> (N, H, W) logits of the original image: bilinear to the padded input square,
    padding cropped, bilinear to the original size (``Sam.postprocess_masks``)."""
    masks = F.interpolate(low_res[:, None], (input_size, input_size), mode="bilinear", align_corners=False)
    masks = masks[..., : resized[0], : resized[1]]
    return F.interpolate(masks, original, mode="bilinear", align_corners=False)[:, 0]


def stability_score(logits: Tensor, mask_threshold: float, offset: float) -> Tensor:
    """IoU between the masks thresholded at ``mask_threshold + offset`` and ``- offset`` (N,) float32; NaN for a
    mask empty at both thresholds."""
    high = (logits > (mask_threshold + offset)).flatten(1).sum(1)
    low = (logits > (mask_threshold - offset)).flatten(1).sum(1)
    return high.to(torch.float32) / low.to(torch.float32)


def mask_boxes(masks: Tensor) -> Tensor:
    """Boxes (N, 4) int64 around non-empty boolean masks (N, H, W): first and last row/column holding a mask pixel,
    as segment-anything's ``batched_mask_to_box`` (x2, y2 are the last pixel's indices, not its far edge)."""
    if masks.shape[0] == 0:
        return torch.zeros(0, 4, dtype=torch.long, device=masks.device)
    rows = masks.any(dim=2)
    cols = masks.any(dim=1)
    height, width = masks.shape[-2:]
    top = rows.to(torch.uint8).argmax(dim=1)
    bottom = height - 1 - rows.flip(1).to(torch.uint8).argmax(dim=1)
    left = cols.to(torch.uint8).argmax(dim=1)
    right = width - 1 - cols.flip(1).to(torch.uint8).argmax(dim=1)
    return torch.stack([left, top, right, bottom], dim=1)
