"""The ``detectron2`` proposer: a detectron2 model run on the original images, its boxes made class-agnostic."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from detectron2 import model_zoo
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.data import transforms as T
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Instances
from torch import Tensor

from groma_core.errors import InputError
from groma_core.stages import RegionProposer, module_dtype
from groma_core.types import ImageFeatures, Proposals
from groma_plugin_detectron2.options import Detectron2Options


def load_config(options: Detectron2Options) -> CfgNode:
    """detectron2's default config merged with the config file (a path, else a model-zoo name) and the overrides."""
    cfg = get_cfg()
    path = Path(os.path.expanduser(options.config_file))
    if not path.is_file():
        try:
            path = Path(model_zoo.get_config_file(options.config_file))
        except RuntimeError:
            raise FileNotFoundError(
                f"detectron2: config_file {options.config_file!r} is neither a file nor a model-zoo config name "
                "(e.g. COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml)"
            ) from None
    cfg.merge_from_file(str(path))
    overrides = [item for key, value in options.config_overrides.items() for item in (key, value)]
    cfg.merge_from_list(overrides)
    if options.top_k is not None:
        cfg.TEST.DETECTIONS_PER_IMAGE = max(cfg.TEST.DETECTIONS_PER_IMAGE, options.top_k)
    cfg.MODEL.DEVICE = "cpu"  # the pipeline moves the stage; detectron2 follows its pixel_mean buffer
    if cfg.INPUT.FORMAT not in ("RGB", "BGR"):
        raise ValueError(f"detectron2: INPUT.FORMAT {cfg.INPUT.FORMAT!r} is not supported (RGB or BGR)")
    cfg.freeze()
    return cfg


class Detectron2Proposer(RegionProposer):
    """Proposals of a detectron2 model on the original images (``features.images``): its final instances or its
    RPN's proposals, class labels dropped, boxes scaled back to the original image and normalized."""

    needs_images = True

    def __init__(self, options: Detectron2Options):
        super().__init__()
        self.options = options
        self.cfg = load_config(options)
        # what detectron2.modeling.build_model does, minus moving to cfg.MODEL.DEVICE: the pipeline places stages,
        # and a move would fail on parameters created on the meta device
        model = META_ARCH_REGISTRY.get(self.cfg.MODEL.META_ARCHITECTURE)(self.cfg)
        if options.weights is not None:
            DetectionCheckpointer(model).load(options.weights)
        if options.source == "rpn" and getattr(model, "proposal_generator", None) is None:
            raise ValueError(
                f"detectron2: source 'rpn' needs a model with a region proposal network; "
                f"{self.cfg.MODEL.META_ARCHITECTURE} has no proposal_generator (use source 'instances')"
            )
        model.requires_grad_(False)
        self.model = model.eval()
        min_size, max_size = self.cfg.INPUT.MIN_SIZE_TEST, self.cfg.INPUT.MAX_SIZE_TEST
        self.resize = T.ResizeShortestEdge([min_size, min_size], max_size)

    def train(self, mode: bool = True) -> Detectron2Proposer:
        """Frozen detector: it stays in eval mode whatever the pipeline's mode."""
        super().train(mode)
        self.model.eval()
        return self

    def model_input(self, image: Any) -> dict[str, Any]:
        """One image as detectron2 models take it: resized per INPUT.MIN/MAX_SIZE_TEST, (3, h, w) float in
        INPUT.FORMAT channel order, with the original height and width for the output scaling."""
        array = np.asarray(image.convert("RGB"))
        if self.cfg.INPUT.FORMAT == "BGR":
            array = array[:, :, ::-1]
        height, width = array.shape[:2]
        resized = self.resize.get_transform(array).apply_image(array)
        pixels = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)), dtype=module_dtype(self.model))
        return {"image": pixels, "height": height, "width": width}

    def _rpn(self, inputs: list[dict[str, Any]]) -> Instances:
        model = self.model
        if not hasattr(model, "preprocess_image"):  # ProposalNetwork: its outputs are the RPN's proposals
            return model(inputs)[0]["proposals"]
        images = model.preprocess_image(inputs)
        proposals, _ = model.proposal_generator(images, model.backbone(images.tensor), None)
        return detector_postprocess(proposals[0], inputs[0]["height"], inputs[0]["width"])

    @torch.no_grad()
    def detect(self, image: Any) -> tuple[Tensor, Tensor]:
        """Boxes (N, 4) in pixels of the original image (xyxy, clipped to it) and class-agnostic scores (N,)."""
        inputs = [self.model_input(image)]
        if self.options.source == "rpn":
            result = self._rpn(inputs)
        else:
            output = self.model(inputs)[0]
            result = output["instances"] if "instances" in output else output["proposals"]
        if result.has("pred_boxes"):
            return result.pred_boxes.tensor.float(), result.scores.float()
        return result.proposal_boxes.tensor.float(), result.objectness_logits.float().sigmoid()

    def forward(self, features: ImageFeatures) -> Proposals:
        images = features.images
        if images is None:
            raise InputError(
                "the 'detectron2' region proposer runs its own detector on the original images, but "
                "ImageFeatures.images is None: call the model with the images (model.answer / caption / locate, "
                "or generate(..., images=[...])), or set features.images to the batch's PIL images"
            )
        if len(images) != features.batch_size:
            raise InputError(
                f"the 'detectron2' region proposer got {len(images)} original images for a batch of "
                f"{features.batch_size} feature maps"
            )
        out_boxes, out_scores = [], []
        for image in images:  # one at a time: detectron2 pads a batch to its largest image, which shifts results
            boxes, scores = self.detect(image)
            width, height = image.size
            boxes = boxes / boxes.new_tensor([width, height, width, height])
            order = torch.sort(scores, descending=True, stable=True).indices
            if self.options.top_k is not None:
                order = order[: self.options.top_k]
            out_boxes.append(boxes[order].contiguous())
            out_scores.append(scores[order].contiguous())
        return Proposals(out_boxes, out_scores)
