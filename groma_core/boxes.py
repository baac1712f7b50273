"""Box conversions, IoU and non-maximum suppression in pure PyTorch (no torchvision)."""

from __future__ import annotations

import torch
from torch import Tensor


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(cx, cy, w, h) -> (x1, y1, x2, y2), computed as the reference's ``center_to_corners_format``."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """(x1, y1, x2, y2) -> (cx, cy, w, h)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1)


#: width of :func:`box_geometry`'s rows
BOX_GEOMETRY = 6


def box_geometry(boxes: Tensor) -> Tensor:
    """(..., 4) normalised xyxy -> (..., 6): centre x, y, width, height, log width, log height (sizes floored at
    1e-3, so a degenerate box has a finite log): where a box is and how big, in a form a linear map reads both
    position ("leftmost") and size and aspect ("biggest", a square against a rectangle)."""
    size = (boxes[..., 2:] - boxes[..., :2]).clamp(min=1e-3)
    return torch.cat([(boxes[..., :2] + boxes[..., 2:]) / 2, size, size.log()], -1)


#: width of :func:`box_relations`' last dimension
BOX_RELATIONS = 7


def box_relations(boxes: Tensor) -> Tensor:
    """(..., K, 4) normalised xyxy -> (..., K, K, 7): how box k lies against box j, each feature squashed by tanh
    to (-1, 1): the gap by which k is wholly right of, left of, below and above j (positive only when it is, as
    "the circle right of the star" needs), the offset of k's centre from j's in x and y, and the log of k's area over
    j's (halved)."""
    t, a = boxes[..., :, None, :], boxes[..., None, :, :]  # target k, anchor j
    centre_t, centre_a = (t[..., :2] + t[..., 2:]) / 2, (a[..., :2] + a[..., 2:]) / 2
    area = (boxes[..., 2:] - boxes[..., :2]).clamp(min=1e-3).prod(-1).log()
    return torch.stack([
        torch.tanh(8 * (t[..., 0] - a[..., 2])),
        torch.tanh(8 * (a[..., 0] - t[..., 2])),
        torch.tanh(8 * (t[..., 1] - a[..., 3])),
        torch.tanh(8 * (a[..., 1] - t[..., 3])),
        torch.tanh(4 * (centre_t[..., 0] - centre_a[..., 0])),
        torch.tanh(4 * (centre_t[..., 1] - centre_a[..., 1])),
        torch.tanh((area[..., :, None] - area[..., None, :]) / 2),
    ], -1)


def box_area(boxes: Tensor) -> Tensor:
    """Area of xyxy boxes (may be negative for inverted boxes, as in torchvision)."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise IoU (N, M) of xyxy boxes, with torchvision's arithmetic (intersection clamped at zero)."""
    area_a, area_b = box_area(a), box_area(b)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS: indices of kept boxes in descending score order; a box is dropped when its IoU with a kept,
    higher-scoring box is strictly greater than ``iou_threshold``. Ties keep input order (stable sort)."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    sorted_boxes = boxes[order]
    over = box_iou(sorted_boxes, sorted_boxes) > iou_threshold
    n = order.numel()
    suppressed = torch.zeros(n, dtype=torch.bool, device=boxes.device)
    keep: list[int] = []
    over_rows = over.cpu()
    suppressed_cpu = suppressed.cpu()
    for i in range(n):
        if suppressed_cpu[i]:
            continue
        keep.append(i)
        suppressed_cpu |= over_rows[i]
    return order[torch.tensor(keep, dtype=torch.long, device=boxes.device)]


def nms_with_threshold(
    boxes: Tensor, scores: Tensor, iou_threshold: float, score_threshold: float, max_num: int
) -> Tensor:
    """mmcv's ``nms(..., score_threshold, max_num)``: keep ``score > score_threshold`` (strictly), run NMS, keep
    the first ``max_num``; indices refer to the unfiltered input."""
    valid = torch.nonzero(scores > score_threshold).flatten()
    keep = nms(boxes[valid], scores[valid], iou_threshold)
    if max_num > 0:
        keep = keep[:max_num]
    return valid[keep]


def check_boxes(boxes: Tensor, what: str = "boxes") -> Tensor:
    """Validate normalized xyxy boxes: shape (N, 4), finite, within [0, 1], x2 > x1 and y2 > y1."""
    if not isinstance(boxes, Tensor):
        boxes = torch.as_tensor(boxes, dtype=torch.float32)
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{what}: expected shape (N, 4), got {tuple(boxes.shape)}")
    if not torch.isfinite(boxes).all():
        bad = torch.nonzero(~torch.isfinite(boxes).all(-1)).flatten().tolist()
        raise ValueError(f"{what}: box {bad[0]} is not finite: {boxes[bad[0]].tolist()}")
    outside = ((boxes < 0) | (boxes > 1)).any(-1)
    if outside.any():
        i = int(torch.nonzero(outside).flatten()[0])
        raise ValueError(f"{what}: box {i} {boxes[i].tolist()} is outside [0, 1] (boxes are normalized xyxy)")
    inverted = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
    if inverted.any():
        i = int(torch.nonzero(inverted).flatten()[0])
        raise ValueError(f"{what}: box {i} {boxes[i].tolist()} needs x2 > x1 and y2 > y1")
    return boxes.float()


Frame = tuple[float, float, float, float]
"""Where an original image lies in a tokenizer's input, in normalized input units: (scale_x, scale_y, offset_x,
offset_y), so that ``x_input = offset_x + scale_x * x_original`` (identity: (1, 1, 0, 0))."""

IDENTITY_FRAME: Frame = (1.0, 1.0, 0.0, 0.0)


def to_input_frame(boxes: Tensor, frame: Frame) -> Tensor:
    """Normalized xyxy boxes of the original image -> normalized xyxy boxes of the tokenizer's input."""
    if tuple(frame) == IDENTITY_FRAME:
        return boxes
    sx, sy, ox, oy = frame
    scale = boxes.new_tensor([sx, sy, sx, sy])
    offset = boxes.new_tensor([ox, oy, ox, oy])
    return boxes * scale + offset


def from_input_frame(boxes: Tensor, frame: Frame) -> Tensor:
    """Normalized xyxy boxes of the tokenizer's input -> normalized xyxy boxes of the original image, clipped to it
    (a box that reaches into the padding is cut at the image's edge). The identity frame returns the boxes as
    they are (the reference reports unclipped boxes)."""
    if tuple(frame) == IDENTITY_FRAME:
        return boxes
    sx, sy, ox, oy = frame
    scale = boxes.new_tensor([sx, sy, sx, sy])
    offset = boxes.new_tensor([ox, oy, ox, oy])
    return ((boxes - offset) / scale).clamp(0.0, 1.0)
