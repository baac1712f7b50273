"""The ``rt-detr`` proposer: RT-DETR's queries scored class-agnostically, on the original images."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import model_validator
from torch import Tensor

from groma_core.boxes import cxcywh_to_xyxy
from groma_core.stages import module_device, module_dtype
from groma_core.types import ImageFeatures, Proposals
from groma_plugin_detectors.common import (
    DetectorOptions,
    FrozenDetectorProposer,
    best_first,
    check_architecture,
    check_pretrained,
    load_processor,
    original_images,
    saved_input_side,
    saved_processor,
)

#: the resolution of the released RT-DETR checkpoints and of transformers' RT-DETR image processor
DEFAULT_INPUT_SIZE = 640


class RTDetrOptions(DetectorOptions):
    """An RT-DETR detector (``RTDetrForObjectDetection``).

    ``architecture`` takes ``RTDetrConfig`` arguments; its ``backbone_config`` may be a dict with a ``model_type``
    (``rt_detr_resnet``, transformers' own ResNet-vd, builds offline). A backbone dict must name its
    ``out_indices`` (three stages, matching ``encoder_in_channels``).
    """

    @model_validator(mode="after")
    def _architecture_is_an_rt_detr_config(self) -> RTDetrOptions:
        from transformers import RTDetrConfig

        check_architecture(RTDetrConfig, self.architecture)
        try:
            RTDetrConfig(**self.architecture)
        except Exception as exc:  # noqa: BLE001 - transformers raises several types for a bad config
            raise ValueError(f"architecture: {exc}") from None
        return self


def _processor_class():
    try:
        from transformers import RTDetrImageProcessorPil
    except ImportError:  # transformers 4.x: the plain name is the PIL processor
        from transformers import RTDetrImageProcessor as RTDetrImageProcessorPil
    return RTDetrImageProcessorPil


class RTDetrProposer(FrozenDetectorProposer):
    """Proposals from RT-DETR: every decoder query's box, scored by its best class probability (sigmoid for the
    focal-loss models, softmax without the last class otherwise, as transformers' post-processing), on the
    original images (``features.images``) resized to a square without keeping the aspect ratio."""

    def __init__(self, options: RTDetrOptions):
        super().__init__()
        from transformers import RTDetrConfig, RTDetrForObjectDetection

        self.options = options
        if options.pretrained is not None:
            path = check_pretrained(options.pretrained, "rt-detr")
            detector = RTDetrForObjectDetection.from_pretrained(str(path))
        else:
            detector = RTDetrForObjectDetection(RTDetrConfig(**options.architecture))
        detector.requires_grad_(False)
        self.detector = detector.eval()

        config = detector.config
        processor_file = saved_processor(options.pretrained)
        anchors = _anchor_side(config)
        side = options.input_size or saved_input_side(processor_file) or anchors or DEFAULT_INPUT_SIZE
        if anchors is not None and anchors != side:
            raise ValueError(
                f"rt-detr: input_size {side} differs from the model's anchor_image_size {config.anchor_image_size}; "
                "its anchors only fit that size"
            )
        stride = max(config.feat_strides)
        if side % stride:
            raise ValueError(
                f"rt-detr: input_size {side} is not a multiple of the largest feature stride {stride} (the encoder "
                "upsamples each map onto the next finer one)"
            )
        self.processor = load_processor(_processor_class(), processor_file, side)
        self.input_size = side

    @torch.no_grad()
    def detect(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        """Per query: boxes (B, Q, 4) normalized xyxy and class-agnostic scores (B, Q)."""
        pixel_values = pixel_values.to(module_device(self.detector), module_dtype(self.detector))
        out = self.detector(pixel_values=pixel_values)
        logits = out.logits.float()
        if self.detector.config.use_focal_loss:
            probabilities = logits.sigmoid()
        else:
            probabilities = logits.softmax(dim=-1)[..., :-1]
        return cxcywh_to_xyxy(out.pred_boxes.float()), probabilities.max(dim=-1).values

    def forward(self, features: ImageFeatures) -> Proposals:
        images = original_images(features, "rt-detr")
        boxes, scores = self.detect(self.preprocess(images))
        out_boxes, out_scores = [], []
        for image_boxes, image_scores in zip(boxes, scores):
            if self.options.clip_boxes:
                image_boxes = image_boxes.clamp(0.0, 1.0)
            image_boxes, image_scores = best_first(image_boxes, image_scores, self.options.top_k)
            out_boxes.append(image_boxes)
            out_scores.append(image_scores)
        return Proposals(out_boxes, out_scores)


def _anchor_side(config: Any) -> int | None:
    size = config.anchor_image_size
    if size is None:
        return None
    if isinstance(size, int):
        return size
    height, width = size
    if height != width:
        raise ValueError(f"rt-detr: anchor_image_size {size} is not square; this proposer feeds square inputs")
    return height
