"""Automatic mask generation on transformers' ``SamModel``, as segment-anything's ``SamAutomaticMaskGenerator``
does it on the whole image (no crop layers): a grid of single-point prompts decoded in batches with three masks
each, the predicted-IoU filter, the stability-score filter, boxes from the binary masks, then box NMS."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from transformers import SamModel

from groma_core.boxes import nms
from groma_core.stages import module_device, module_dtype
from groma_plugin_sam.masks import mask_boxes, point_grid, stability_score, upscale_logits
from groma_plugin_sam.options import SamOptions
from groma_plugin_sam.preprocess import preprocess_image, to_input_frame


@dataclass
class GeneratedMasks:
    """The masks of one image that survive the filters and NMS, best (highest predicted IoU) first.

    ``boxes`` (N, 4) float32: segment-anything's boxes in pixels of the image (x1, y1 = first mask column/row,
    x2, y2 = last ones); ``predicted_iou`` and ``stability_score`` (N,) float32; ``point_coords`` (N, 2) float32:
    the prompt point (x, y) in pixels; ``masks`` (N, H, W) bool at the image's resolution, or None.
    """

    boxes: Tensor
    predicted_iou: Tensor
    stability_score: Tensor
    point_coords: Tensor
    masks: Tensor | None = None


@dataclass(frozen=True)
class Geometry:
    """Sizes of one image: the SAM input side, the resized image inside it and the original, as (height, width)."""

    input_size: int
    resized: tuple[int, int]
    original: tuple[int, int]


@dataclass
class Candidates:
    """Masks that passed the per-mask filters: decoder logits (N, h, w), predicted IoU, stability score, boxes
    (segment-anything's, float32) and prompt points (N, 2)."""

    low_res: Tensor
    predicted_iou: Tensor
    stability_score: Tensor
    boxes: Tensor
    points: Tensor

    @staticmethod
    def cat(parts: list[Candidates]) -> Candidates:
        return Candidates(*(torch.cat([getattr(p, f) for p in parts]) for f in Candidates.__dataclass_fields__))

    def __getitem__(self, index: Tensor) -> Candidates:
        return Candidates(*(getattr(self, f)[index] for f in Candidates.__dataclass_fields__))


def filter_candidates(
    low_res: Tensor, predicted_iou: Tensor, points: Tensor, geometry: Geometry, options: SamOptions
) -> Candidates:
    """The masks of one decoded batch that pass the predicted-IoU filter (strictly above ``pred_iou_thresh``) and
    the stability filter (at least ``stability_score_thresh``) and are not empty at ``mask_threshold``."""
    if options.pred_iou_thresh > 0:
        keep = predicted_iou > options.pred_iou_thresh
        low_res, predicted_iou, points = low_res[keep], predicted_iou[keep], points[keep]
    logits = upscale_logits(low_res, geometry.input_size, geometry.resized, geometry.original)
    stability = stability_score(logits, options.mask_threshold, options.stability_score_offset)
    masks = logits > options.mask_threshold
    keep = masks.flatten(1).any(dim=1)
    if options.stability_score_thresh > 0:
        keep &= stability >= options.stability_score_thresh
    return Candidates(
        low_res[keep], predicted_iou[keep], stability[keep], mask_boxes(masks[keep]).float(), points[keep]
    )


def select_masks(candidates: Candidates, geometry: Geometry, options: SamOptions, want_masks: bool) -> GeneratedMasks:
    """NMS over all candidates of an image (by predicted IoU, at ``box_nms_thresh``), best first; the binary masks
    of the survivors at the original resolution when ``want_masks``."""
    keep = nms(candidates.boxes, candidates.predicted_iou, options.box_nms_thresh)
    kept = candidates[keep]
    masks = None
    if want_masks:
        logits = upscale_logits(kept.low_res, geometry.input_size, geometry.resized, geometry.original)
        masks = logits > options.mask_threshold
    return GeneratedMasks(kept.boxes, kept.predicted_iou, kept.stability_score, kept.points, masks)


@torch.no_grad()
def generate_masks(sam: SamModel, image: Image.Image, options: SamOptions, want_masks: bool = False) -> GeneratedMasks:
    """Run the automatic mask generator of ``options`` on one RGB image."""
    device, dtype = module_device(sam), module_dtype(sam)
    rgb = image.convert("RGB")
    width, height = rgb.size
    input_size = sam.config.vision_config.image_size
    pixels, resized = preprocess_image(rgb, input_size)
    geometry = Geometry(input_size, resized, (height, width))
    embeddings = sam.get_image_embeddings(pixels.to(device, dtype))
    points = point_grid(options.points_per_side) * np.array([[width, height]])

    parts = []
    for start in range(0, len(points), options.points_per_batch):
        batch = points[start : start + options.points_per_batch]
        coords = torch.as_tensor(to_input_frame(batch, (height, width), resized), device=device)
        labels = torch.ones(coords.shape[0], dtype=torch.int, device=device)
        out = sam(
            image_embeddings=embeddings,
            input_points=coords[None, :, None, :],
            input_labels=labels[None, :, None],
            multimask_output=True,
        )
        low_res = out.pred_masks[0].flatten(0, 1).float()
        prompts = torch.as_tensor(batch, dtype=torch.float32, device=device)
        prompts = prompts.repeat_interleave(low_res.shape[0] // len(batch), dim=0)
        parts.append(filter_candidates(low_res, out.iou_scores[0].flatten(0, 1).float(), prompts, geometry, options))
    return select_masks(Candidates.cat(parts), geometry, options, want_masks)
