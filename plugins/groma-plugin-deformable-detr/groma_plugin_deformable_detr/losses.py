"""Groma's stage-1 detection losses: Hungarian matching and the focal / L1 / GIoU set losses of the proposer.

The reference trains the proposer with transformers 4.32's ``DeformableDetrHungarianMatcher`` and its
``DeformableDetrLoss`` subclass ``DeformableDetrLossX``: the last decoder layer, every other decoder layer
(auxiliary losses) and the encoder proposals (two-stage) are each matched to the targets and supervised.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from groma_core.boxes import cxcywh_to_xyxy

#: detection data sources and the objectness head each one trains (``extras`` key of the proposer)
SOURCE_LOGITS = {"coco": "logits_coco", "sa1b": "logits_sa1b"}

#: focal parameters of the matching cost, fixed in transformers' ``DeformableDetrHungarianMatcher``
MATCH_FOCAL_ALPHA = 0.25
MATCH_FOCAL_GAMMA = 2.0
#: focal gamma of the classification loss, fixed in transformers' ``DeformableDetrLoss.loss_labels``
LOSS_FOCAL_GAMMA = 2.0

#: transformers 4.32 ``DeformableDetrConfig`` defaults of the loss fields (the reference saves its config as a diff);
#: ``cls_loss_coefficient`` is Groma's own field, 2 by default in ``train_det.py``
_REFERENCE_DEFAULTS: dict[str, Any] = {
    "class_cost": 1,
    "bbox_cost": 5,
    "giou_cost": 2,
    "cls_loss_coefficient": 2,
    "bbox_loss_coefficient": 5,
    "giou_loss_coefficient": 2,
    "focal_alpha": 0.25,
    "auxiliary_loss": False,
}


class DetectionLossWeights(BaseModel):
    """Matching costs, loss coefficients and switches of the detection losses (the released training's values)."""

    model_config = ConfigDict(extra="forbid")

    class_cost: float = Field(default=2.0, ge=0.0, description="weight of the focal-style class cost in the matching")
    bbox_cost: float = Field(default=5.0, ge=0.0, description="weight of the L1 (cxcywh) cost in the matching")
    giou_cost: float = Field(default=2.0, ge=0.0, description="weight of the -GIoU cost in the matching")
    cls: float = Field(default=2.0, ge=0.0, description="coefficient of the sigmoid focal classification loss")
    bbox: float = Field(default=5.0, ge=0.0, description="coefficient of the L1 box loss")
    giou: float = Field(default=2.0, ge=0.0, description="coefficient of the GIoU box loss")
    focal_alpha: float = Field(
        default=0.25, ge=0.0, le=1.0, description="alpha of the focal loss (the matching cost always uses 0.25)"
    )
    auxiliary: bool = Field(default=True, description="also supervise every decoder layer before the last one")
    encoder: bool = Field(default=True, description="also supervise the encoder proposals (two-stage)")
    all_reduce_num_boxes: bool = Field(
        default=False,
        description="normalise by the mean box count over processes (DETR); the reference uses the local count",
    )

    @model_validator(mode="after")
    def _some_cost(self) -> DetectionLossWeights:
        if self.class_cost == 0 and self.bbox_cost == 0 and self.giou_cost == 0:
            raise ValueError("class_cost, bbox_cost and giou_cost are all 0: the matching needs at least one cost")
        return self

    @classmethod
    def from_reference_config(cls, groma_config: dict[str, Any]) -> DetectionLossWeights:
        """Weights equal to the reference ``GromaConfig.to_dict()``'s ``perceiver_cfg.ddetr_cfg``."""
        cfg = {**_REFERENCE_DEFAULTS, **(groma_config["perceiver_cfg"].get("ddetr_cfg") or {})}
        return cls(
            class_cost=cfg["class_cost"],
            bbox_cost=cfg["bbox_cost"],
            giou_cost=cfg["giou_cost"],
            cls=cfg["cls_loss_coefficient"],
            bbox=cfg["bbox_loss_coefficient"],
            giou=cfg["giou_loss_coefficient"],
            focal_alpha=cfg["focal_alpha"],
            auxiliary=cfg["auxiliary_loss"],
        )


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise generalized IoU (N, M) of xyxy boxes."""
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    inner = (torch.min(boxes1[:, None, 2:], boxes2[:, 2:]) - torch.max(boxes1[:, None, :2], boxes2[:, :2])).clamp(0)
    intersection = inner[..., 0] * inner[..., 1]
    union = area1[:, None] + area2 - intersection
    outer = (torch.max(boxes1[:, None, 2:], boxes2[:, 2:]) - torch.min(boxes1[:, None, :2], boxes2[:, :2])).clamp(0)
    enclosing = outer[..., 0] * outer[..., 1]
    return intersection / union - (enclosing - union) / enclosing


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float, gamma: float) -> Tensor:
    """Element-wise sigmoid focal loss (RetinaNet) of ``logits`` against 0/1 ``targets``."""
    prob = logits.sigmoid()
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = loss * (1 - p_t) ** gamma
    return (alpha * targets + (1 - alpha) * (1 - targets)) * loss


def match_cost(logits: Tensor, boxes: Tensor, targets: Tensor, weights: DetectionLossWeights) -> Tensor:
    """Matching cost (Q, n) between the Q predictions of one image (``logits`` (Q, 1), cxcywh ``boxes`` (Q, 4))
    and its n cxcywh ``targets``: weighted focal-style class cost, L1 distance and -GIoU."""
    prob = logits[:, 0].float().sigmoid()
    boxes, targets = boxes.float(), targets.float()
    alpha, gamma = MATCH_FOCAL_ALPHA, MATCH_FOCAL_GAMMA
    negative = (1 - alpha) * prob**gamma * -(1 - prob + 1e-8).log()
    positive = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
    class_cost = (positive - negative)[:, None].expand(-1, len(targets))
    bbox_cost = torch.cdist(boxes, targets, p=1)
    giou_cost = -generalized_box_iou(cxcywh_to_xyxy(boxes), cxcywh_to_xyxy(targets))
    return weights.bbox_cost * bbox_cost + weights.class_cost * class_cost + weights.giou_cost * giou_cost


@torch.no_grad()
def hungarian_match(
    logits: Tensor, boxes: Tensor, targets: Sequence[Tensor], weights: DetectionLossWeights, what: str = "outputs"
) -> list[tuple[Tensor, Tensor]]:
    """One-to-one matching per image of predictions (``logits`` (B, Q, 1), cxcywh ``boxes`` (B, Q, 4)) to the
    cxcywh ``targets`` [(n_i, 4)]: a list of (query indices, target indices), query indices ascending."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as error:
        raise ImportError("the detection losses need scipy (Hungarian matching): pip install scipy") from error
    matches = []
    empty = torch.zeros(0, dtype=torch.int64)
    for image, target in enumerate(targets):
        if len(target) == 0:
            matches.append((empty, empty))
            continue
        cost = match_cost(logits[image], boxes[image], target, weights).cpu()
        if not torch.isfinite(cost).all():
            raise FloatingPointError(f"detection loss: non-finite matching cost for image {image} of the {what}")
        rows, cols = linear_sum_assignment(cost.numpy())
        matches.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
    return matches


def set_losses(
    logits: Tensor,
    boxes: Tensor,
    targets: Sequence[Tensor],
    matches: Sequence[tuple[Tensor, Tensor]],
    num_boxes: float,
    focal_alpha: float,
) -> dict[str, Tensor]:
    """``loss_ce`` (sigmoid focal loss over every query, matched ones positive), ``loss_bbox`` (L1) and
    ``loss_giou`` (1 - GIoU) of the matched boxes, each divided by ``num_boxes``; computed in float32."""
    logits, boxes = logits.float(), boxes.float()
    device = logits.device
    image_index = torch.cat([torch.full_like(rows, i) for i, (rows, _) in enumerate(matches)]).to(device)
    query_index = torch.cat([rows for rows, _ in matches]).to(device)
    positives = torch.zeros_like(logits)
    positives[image_index, query_index, 0] = 1.0
    num_queries = logits.shape[1]
    # transformers averages the focal loss over the queries and multiplies back by their number
    focal = sigmoid_focal_loss(logits, positives, focal_alpha, LOSS_FOCAL_GAMMA)
    loss_ce = focal.mean(1).sum() / num_boxes * num_queries

    matched = boxes[image_index, query_index]
    matched_targets = torch.cat([target[cols] for target, (_, cols) in zip(targets, matches)]).to(device).float()
    loss_bbox = (matched - matched_targets).abs().sum() / num_boxes
    giou = generalized_box_iou(cxcywh_to_xyxy(matched), cxcywh_to_xyxy(matched_targets)).diagonal()
    loss_giou = (1 - giou).sum() / num_boxes
    return {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}


def count_boxes(targets: Sequence[Tensor], all_reduce: bool, device: torch.device) -> float:
    """The loss normaliser: the batch's target count (at least 1); with ``all_reduce`` and an initialised process
    group, the mean count over processes (at least 1)."""
    count = torch.tensor([float(sum(len(t) for t in targets))], device=device)
    if all_reduce and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(count)
        count = count / torch.distributed.get_world_size()
    return count.clamp(min=1).item()


def _batch_source(source: str | Sequence[str], batch: int) -> str:
    """The single source of a detection batch (``source`` may name it once or once per image)."""
    names = [source] if isinstance(source, str) else list(source)
    if not names:
        raise ValueError("detection loss: source is an empty list; name the batch's source ('coco' or 'sa1b')")
    if not isinstance(source, str) and len(names) != batch:
        raise ValueError(f"detection loss: source lists {len(names)} images, the batch has {batch}")
    unknown = sorted({name for name in names if name not in SOURCE_LOGITS})
    if unknown:
        raise ValueError(f"detection loss: unknown source {unknown[0]!r}; expected one of {sorted(SOURCE_LOGITS)}")
    if len(set(names)) > 1:
        raise ValueError(
            f"detection loss: the batch mixes sources {sorted(set(names))}; each detection batch must come from one "
            "source, which selects the objectness head it trains (the reference's collator asserts this)"
        )
    return names[0]


def _target_boxes(targets: Sequence[Mapping[str, Tensor]], batch: int) -> list[Tensor]:
    """The targets' cxcywh boxes, validated."""
    if len(targets) != batch:
        raise ValueError(f"detection loss: got {len(targets)} targets for a batch of {batch} images")
    boxes = []
    for i, target in enumerate(targets):
        if "boxes" not in target:
            raise ValueError(f"detection loss: targets[{i}] has no 'boxes' (keys: {sorted(target)})")
        box = torch.as_tensor(target["boxes"], dtype=torch.float32)
        if box.ndim != 2 or box.shape[1] != 4:
            raise ValueError(f"detection loss: targets[{i}]['boxes'] must have shape (n, 4), got {tuple(box.shape)}")
        if not torch.isfinite(box).all() or (box[:, 2:] < 0).any():
            raise ValueError(
                f"detection loss: targets[{i}]['boxes'] must be finite normalized (cx, cy, w, h) with w, h >= 0, "
                f"got {box.tolist()}"
            )
        boxes.append(box)
    return boxes


def _outputs(extras: Mapping[str, Tensor], logits_key: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-layer logits (B, L, Q, 1) and boxes (B, L, Q, 4), encoder logits (B, S, 1) and boxes (B, S, 4)."""
    needed = (logits_key, "boxes_cxcywh", "encoder_logits", "encoder_boxes_cxcywh")
    missing = [key for key in needed if key not in extras]
    if missing:
        raise KeyError(f"detection loss: Proposals.extras lacks {missing}; pass a deformable-detr forward's extras")
    logits, boxes = extras[logits_key], extras["boxes_cxcywh"]
    encoder_logits, encoder_boxes = extras["encoder_logits"], extras["encoder_boxes_cxcywh"]
    if logits.ndim != 4 or logits.shape[-1] != 1 or boxes.shape != (*logits.shape[:3], 4):
        raise ValueError(
            f"detection loss: extras[{logits_key!r}] must be (B, L, Q, 1) and extras['boxes_cxcywh'] (B, L, Q, 4), "
            f"got {tuple(logits.shape)} and {tuple(boxes.shape)}"
        )
    if (
        encoder_logits.ndim != 3
        or encoder_logits.shape[0] != logits.shape[0]
        or encoder_logits.shape[-1] != 1
        or encoder_boxes.shape != (*encoder_logits.shape[:2], 4)
    ):
        raise ValueError(
            f"detection loss: extras['encoder_logits'] must be (B={logits.shape[0]}, S, 1) and "
            f"extras['encoder_boxes_cxcywh'] (B, S, 4), got {tuple(encoder_logits.shape)} and "
            f"{tuple(encoder_boxes.shape)}"
        )
    return logits, boxes, encoder_logits, encoder_boxes


def detection_loss(
    extras: Mapping[str, Tensor],
    targets: Sequence[Mapping[str, Tensor]],
    source: str | Sequence[str],
    weights: DetectionLossWeights | None = None,
) -> dict[str, Tensor]:
    """Groma's stage-1 detection losses of one batch.

    ``extras``: ``Proposals.extras`` of the ``deformable-detr`` proposer (built with ``frozen: false``);
    ``targets``: one dict per image with ``boxes`` (n, 4), normalized cxcywh (class-agnostic);
    ``source``: ``"coco"`` or ``"sa1b"`` (or one per image, all equal), the objectness head to train.

    Returns ``loss_ce``, ``loss_bbox``, ``loss_giou`` of the last decoder layer, the same with suffix ``_{i}`` for
    decoder layer i < L - 1 and ``_enc`` for the encoder proposals, and ``loss``, their weighted sum.
    """
    weights = weights or DetectionLossWeights()
    logits_key = SOURCE_LOGITS[_batch_source(source, len(targets))]
    logits, boxes, encoder_logits, encoder_boxes = _outputs(extras, logits_key)
    target_boxes = [box.to(boxes.device) for box in _target_boxes(targets, logits.shape[0])]
    num_boxes = count_boxes(target_boxes, weights.all_reduce_num_boxes, boxes.device)

    last = logits.shape[1] - 1
    outputs = [("", f"decoder layer {last}", logits[:, last], boxes[:, last])]
    if weights.auxiliary:
        outputs += [(f"_{i}", f"decoder layer {i}", logits[:, i], boxes[:, i]) for i in range(last)]
    if weights.encoder:
        outputs.append(("_enc", "encoder proposals", encoder_logits, encoder_boxes))

    coefficients = {"loss_ce": weights.cls, "loss_bbox": weights.bbox, "loss_giou": weights.giou}
    losses: dict[str, Tensor] = {}
    total = torch.zeros((), device=boxes.device)
    for suffix, what, output_logits, output_boxes in outputs:
        matches = hungarian_match(output_logits, output_boxes, target_boxes, weights, what)
        terms = set_losses(output_logits, output_boxes, target_boxes, matches, num_boxes, weights.focal_alpha)
        for name, value in terms.items():
            losses[name + suffix] = value
            total = total + coefficients[name] * value
    losses["loss"] = total
    return losses
