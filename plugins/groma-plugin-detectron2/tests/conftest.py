"""Fixtures of the detectron2 tests. The proposer's tests run only where ``import detectron2`` works."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
from PIL import Image

from groma_core.stages import RegionProposer
from groma_core.testing.contract import check_region_proposer, sample_features, sample_images
from groma_core.types import ImageFeatures, Proposals

#: a Faster R-CNN R18-FPN from the model zoo's R50 config, shrunk to run in a second on CPU; random weights give
#: every class about 1/81, so the score threshold is 0 to keep detections
TINY_FASTER_RCNN = {
    "config_file": "COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml",
    "config_overrides": {
        "MODEL.RESNETS.DEPTH": 18,
        "MODEL.RESNETS.RES2_OUT_CHANNELS": 64,
        "MODEL.FPN.OUT_CHANNELS": 32,
        "MODEL.ROI_BOX_HEAD.FC_DIM": 64,
        "MODEL.RPN.PRE_NMS_TOPK_TEST": 200,
        "MODEL.RPN.POST_NMS_TOPK_TEST": 50,
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.0,
        "INPUT.MIN_SIZE_TEST": 96,
        "INPUT.MAX_SIZE_TEST": 160,
    },
}


@pytest.fixture
def images() -> list[Image.Image]:
    return sample_images()


@pytest.fixture
def tiny_options() -> dict:
    options = TINY_FASTER_RCNN
    return {"config_file": options["config_file"], "config_overrides": dict(options["config_overrides"])}


@pytest.fixture
def features_of():
    """``features_of(images)``: random feature maps (the detector does not read them) carrying the images."""

    def make(images: list[Image.Image]) -> ImageFeatures:
        features = sample_features(batch=len(images))
        features.images = list(images)
        return features

    return make


@pytest.fixture
def check_contract(features_of):
    """``check_contract(stage, images)``: the core's contract kit on a pixel-based proposer."""

    def check(stage: RegionProposer, images: list[Image.Image]) -> Proposals:
        return check_region_proposer(stage, features_of(images))

    return check
