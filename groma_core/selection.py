"""Region selection: candidates + user boxes -> the ordered regions that ``<r0>``, ``<r1>``, ... refer to."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from groma_core.boxes import box_iou, nms_with_threshold
from groma_core.types import Proposals, Regions


class SelectionConfig(BaseModel):
    """How proposals become regions (the reference's values by default)."""

    model_config = ConfigDict(extra="forbid")

    nms_iou: float = Field(
        0.6, ge=0.0, le=1.0, description="suppress a candidate whose IoU with a better one is above this"
    )
    score_threshold: float = Field(0.15, ge=0.0, le=1.0, description="keep candidates scoring strictly above this")
    max_regions: int = Field(100, ge=1, description="at most this many regions (= number of <rK> tokens)")
    refer_score: float = Field(1.0, description="score given to user boxes")
    ground_score: float = Field(0.2, description="score given to ground-truth boxes during training")
    shuffle: bool = Field(False, description="randomly permute the regions (the reference does, unseeded, in training)")
    seed: int | None = Field(None, description="seed of the shuffle; None draws from torch's global generator")
    left_to_right: bool = Field(
        False,
        description="not in the reference (false): regions ordered by their box centre, left to right (then top to "
        "bottom), in training and inference alike, so that <r0> is the leftmost region and a caption that names "
        "shapes from left to right points at increasing K",
    )

    @model_validator(mode="after")
    def _one_order(self) -> SelectionConfig:
        if self.left_to_right and self.shuffle:
            raise ValueError("left_to_right and shuffle both order the regions: set one of them")
        return self


def select_regions(
    proposals: Proposals,
    config: SelectionConfig | None = None,
    refer_boxes: list[Tensor] | None = None,
    ground_boxes: list[Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> Regions:
    """Join user boxes (score ``refer_score``) and ground-truth boxes (``ground_score``) to the proposals, apply
    the score threshold, NMS and the top-k cap, fall back to the best candidate when nothing survives, and find
    the region index of every user / ground-truth box (argmax IoU, as the reference)."""
    config = config or SelectionConfig()
    batch = len(proposals.boxes)
    refer_boxes = refer_boxes if refer_boxes is not None else [None] * batch
    ground_boxes = ground_boxes if ground_boxes is not None else [None] * batch
    if len(refer_boxes) != batch or len(ground_boxes) != batch:
        raise ValueError(
            f"region selection: {batch} images but {len(refer_boxes)} refer-box lists and "
            f"{len(ground_boxes)} ground-box lists"
        )
    if generator is None and config.shuffle and config.seed is not None:
        generator = torch.Generator().manual_seed(config.seed)
    out_boxes, out_scores, refer_idx, ground_idx, source_idx = [], [], [], [], []
    for i in range(batch):
        boxes = proposals.boxes[i].float()
        scores = proposals.scores[i].float()
        device = boxes.device
        extra_b, extra_s = [boxes], [scores]
        refer = _as_boxes(refer_boxes[i], device)
        ground = _as_boxes(ground_boxes[i], device)
        extra_b += [refer, ground]
        extra_s += [
            torch.full((len(refer),), config.refer_score, device=device),
            torch.full((len(ground),), config.ground_score, device=device),
        ]
        cand, cand_scores = torch.cat(extra_b), torch.cat(extra_s)
        keep = nms_with_threshold(cand, cand_scores, config.nms_iou, config.score_threshold, config.max_regions)
        if keep.numel() == 0 and cand.shape[0] > 0:
            keep = cand_scores.argmax().reshape(1)
        if config.shuffle and keep.numel() > 1:
            perm = torch.randperm(keep.numel(), generator=generator).to(device)
            keep = keep[perm]
        if config.left_to_right and keep.numel() > 1:
            centre = (cand[keep, :2] + cand[keep, 2:]) / 2
            by_y = torch.argsort(centre[:, 1], stable=True)  # top to bottom among equal x ...
            keep, centre = keep[by_y], centre[by_y]
            keep = keep[torch.argsort(centre[:, 0], stable=True)]  # ... left to right first
        regions = cand[keep]
        n_proposals = boxes.shape[0]
        source_idx.append(torch.where(keep < n_proposals, keep, torch.full_like(keep, -1)))
        out_boxes.append(regions)
        out_scores.append(cand_scores[keep])
        refer_idx.append(_match(refer, regions))
        ground_idx.append(_match(ground, regions))
    return Regions(out_boxes, out_scores, refer_idx, ground_idx, source_idx)


def _as_boxes(boxes: Tensor | None, device: torch.device) -> Tensor:
    if boxes is None:
        return torch.zeros(0, 4, device=device)
    return boxes.to(device=device, dtype=torch.float32).reshape(-1, 4)


def _match(boxes: Tensor, regions: Tensor) -> Tensor:
    if boxes.shape[0] == 0 or regions.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=regions.device)
    return box_iou(boxes, regions).argmax(dim=1)
