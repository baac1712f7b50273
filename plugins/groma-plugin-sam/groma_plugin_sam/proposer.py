"""The ``sam`` region proposer: Segment Anything's automatic masks of the original images as Groma's candidate
regions."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from torch import Tensor

from groma_core.errors import InputError
from groma_core.stages import RegionProposer
from groma_core.types import ImageFeatures, Proposals
from groma_plugin_sam.checkpoint import build_sam_model
from groma_plugin_sam.generator import GeneratedMasks, generate_masks
from groma_plugin_sam.options import SamOptions


class SamProposer(RegionProposer):
    """Proposals from SAM's automatic mask generation on the original images (``features.images``).

    ``forward(features)`` -> :class:`Proposals` with, per image, the boxes of the masks that survive SAM's filters
    and NMS (normalized xyxy of the original image, best first) and their scores (predicted IoU, or predicted
    IoU x stability, clamped to [0, 1]). ``extras``: ``"predicted_iou"``, ``"stability_score"``, ``"point_coords"``
    (prompt points in pixels) per image, and ``"masks"`` ((N, H, W) bool, original resolution) with
    ``return_masks``. The image tokenizer's features are not used. SAM is frozen.
    """

    needs_images = True

    def __init__(self, options: SamOptions):
        super().__init__()
        self.options = options
        if options.backend == "segment-anything":
            from groma_plugin_sam.official import build_official_model

            self.model = build_official_model(options)
        else:
            self.model = build_sam_model(options)
        self.model.requires_grad_(False)

    def train(self, mode: bool = True) -> SamProposer:
        """SAM stays in eval mode (it is never trained here)."""
        super().train(mode)
        self.model.eval()
        return self

    def forward(self, features: ImageFeatures) -> Proposals:
        """Propose the boxes of SAM's automatic masks of each original image."""
        images = features.images
        if images is None:
            raise InputError(
                "the 'sam' region proposer reads the original images, but features.images is None: pass the PIL "
                "images along (GromaModel.answer/caption/... do; otherwise generate(..., images=images) or "
                "encode_images(pixel_values, images))"
            )
        if len(images) != features.batch_size:
            raise InputError(f"features.images holds {len(images)} images for a batch of {features.batch_size}")
        boxes, scores = [], []
        extras: dict[str, list[Any]] = {"predicted_iou": [], "stability_score": [], "point_coords": []}
        if self.options.return_masks:
            extras["masks"] = []
        for i, image in enumerate(images):
            if not isinstance(image, Image.Image):
                raise InputError(f"features.images[{i}] must be a PIL image, got {type(image).__name__}")
            generated = self._generate(image)
            boxes.append(self._normalized(generated.boxes, image.size))
            scores.append(self._scores(generated))
            extras["predicted_iou"].append(generated.predicted_iou)
            extras["stability_score"].append(generated.stability_score)
            extras["point_coords"].append(generated.point_coords)
            if self.options.return_masks:
                extras["masks"].append(generated.masks)
        return Proposals(boxes, scores, extras)

    def _generate(self, image: Image.Image) -> GeneratedMasks:
        if self.options.backend == "segment-anything":
            from groma_plugin_sam.official import generate_official

            return generate_official(self.model, image, self.options, self.options.return_masks)
        return generate_masks(self.model, image, self.options, self.options.return_masks)

    def _normalized(self, boxes: Tensor, size: tuple[int, int]) -> Tensor:
        width, height = size
        edges = boxes.clone()
        if self.options.box_convention == "edges":
            edges[:, 2:] += 1
        scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=boxes.device)
        return (edges / scale).to(torch.float32)

    def _scores(self, generated: GeneratedMasks) -> Tensor:
        score = generated.predicted_iou
        if self.options.score == "iou-times-stability":
            score = score * generated.stability_score
        return score.clamp(0.0, 1.0).to(torch.float32)
