"""The ``owlv2`` proposer: OWLv2's class-agnostic objectness head on the original images."""

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

#: the text tower is dropped after building, so a random model gets the smallest one transformers accepts
THROWAWAY_TEXT_CONFIG = {
    "hidden_size": 8,
    "intermediate_size": 8,
    "num_hidden_layers": 1,
    "num_attention_heads": 1,
    "vocab_size": 8,
    "max_position_embeddings": 4,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


class Owlv2Options(DetectorOptions):
    """An OWLv2 detector (``Owlv2ForObjectDetection``); only its image tower, box head and objectness head run.

    ``architecture`` takes ``Owlv2Config`` arguments, typically ``vision_config: {...}``; without ``text_config``
    a minimal text tower is built, since it is dropped anyway.
    """

    @model_validator(mode="after")
    def _architecture_is_an_owlv2_config(self) -> Owlv2Options:
        from transformers import Owlv2Config

        check_architecture(Owlv2Config, self.architecture)
        try:
            _owlv2_config(self.architecture)
        except Exception as exc:  # noqa: BLE001 - transformers raises several types for a bad config
            raise ValueError(f"architecture: {exc}") from None
        return self


def _owlv2_config(architecture: dict[str, Any]):
    from transformers import Owlv2Config

    arguments = {"text_config": THROWAWAY_TEXT_CONFIG, **architecture}
    return Owlv2Config(**arguments)


def _processor_class():
    try:
        from transformers import Owlv2ImageProcessorPil
    except ImportError:  # transformers 4.x: the plain name is the PIL processor
        from transformers import Owlv2ImageProcessor as Owlv2ImageProcessorPil
    return Owlv2ImageProcessorPil


def padded_square_to_original(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Normalized xyxy boxes of the zero-padded square image that OWLv2 sees (the image at its top-left corner,
    side max(w, h)) -> normalized xyxy boxes of the original image of ``size`` (w, h)."""
    width, height = size
    side = max(width, height)
    return boxes * boxes.new_tensor([side / width, side / height, side / width, side / height])


class Owlv2Proposer(FrozenDetectorProposer):
    """Proposals from OWLv2: one box per image patch, scored by ``sigmoid(objectness_logits)``, on the original
    images (``features.images``) with OWLv2's own preprocessing (pad to a square, resize, CLIP normalization)."""

    def __init__(self, options: Owlv2Options):
        super().__init__()
        from transformers import Owlv2ForObjectDetection

        self.options = options
        if options.pretrained is not None:
            path = check_pretrained(options.pretrained, "owlv2")
            detector = Owlv2ForObjectDetection.from_pretrained(str(path))
        else:
            detector = Owlv2ForObjectDetection(_owlv2_config(options.architecture))
        # class-agnostic proposals need neither the text tower nor the text-conditioned class head
        for name in ("text_model", "text_projection", "visual_projection", "logit_scale"):
            delattr(detector.owlv2, name)
        del detector.class_head
        detector.requires_grad_(False)
        self.detector = detector.eval()

        vision = detector.config.vision_config
        processor_file = saved_processor(options.pretrained)
        side = options.input_size or saved_input_side(processor_file) or vision.image_size
        if side % vision.patch_size:
            raise ValueError(
                f"owlv2: input_size {side} is not a multiple of the patch size {vision.patch_size}; "
                f"use e.g. {side - side % vision.patch_size or vision.patch_size}"
            )
        self.processor = load_processor(_processor_class(), processor_file, side)
        self.input_size = side
        self.interpolate_pos_encoding = side != vision.image_size

    @torch.no_grad()
    def detect(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        """Per patch: boxes (B, P, 4) normalized xyxy of the padded square input and objectness scores (B, P)."""
        pixel_values = pixel_values.to(module_device(self.detector), module_dtype(self.detector))
        interpolate = self.interpolate_pos_encoding
        feature_map, _ = self.detector.image_embedder(pixel_values=pixel_values, interpolate_pos_encoding=interpolate)
        patches = feature_map.flatten(1, 2)
        logits = self.detector.objectness_predictor(patches)
        boxes = self.detector.box_predictor(patches, feature_map, interpolate_pos_encoding=interpolate)
        return cxcywh_to_xyxy(boxes.float()), logits.float().sigmoid()

    def forward(self, features: ImageFeatures) -> Proposals:
        images = original_images(features, "owlv2")
        boxes, scores = self.detect(self.preprocess(images))
        out_boxes, out_scores = [], []
        for image, image_boxes, image_scores in zip(images, boxes, scores):
            mapped = padded_square_to_original(image_boxes, image.size)
            centres = (mapped[:, :2] + mapped[:, 2:]) / 2
            inside = ((centres >= 0) & (centres <= 1)).all(dim=1)  # patches of the padding propose nothing
            mapped, kept_scores = mapped[inside], image_scores[inside]
            if self.options.clip_boxes:
                mapped = mapped.clamp(0.0, 1.0)
            mapped, kept_scores = best_first(mapped, kept_scores, self.options.top_k)
            out_boxes.append(mapped)
            out_scores.append(kept_scores)
        return Proposals(out_boxes, out_scores)
