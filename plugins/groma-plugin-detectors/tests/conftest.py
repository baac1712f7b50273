"""Fixtures of the detector-proposer tests: tiny OWLv2 / RT-DETR architectures, saved copies, images with pixels."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import copy

import pytest
import torch
from PIL import Image

from groma_core.stages import RegionProposer
from groma_core.testing.contract import check_region_proposer, sample_features, sample_images
from groma_core.types import ImageFeatures, Proposals

#: OWLv2 with a 2-layer ViT on 64 px inputs in 8 px patches: 8 x 8 = 64 proposals per image
TINY_OWLV2 = {
    "vision_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 64,
        "patch_size": 8,
    }
}

#: RT-DETR with a 4-stage basic ResNet-vd (transformers' own backbone, no timm) and 20 queries over 5 classes
TINY_RT_DETR = {
    "backbone_config": {
        "model_type": "rt_detr_resnet",
        "embedding_size": 16,
        "hidden_sizes": [16, 32, 64, 128],
        "depths": [1, 1, 1, 1],
        "layer_type": "basic",
        "out_indices": [2, 3, 4],
    },
    "encoder_in_channels": [32, 64, 128],
    "encoder_hidden_dim": 32,
    "encoder_ffn_dim": 64,
    "encoder_attention_heads": 4,
    "d_model": 32,
    "decoder_in_channels": [32, 32, 32],
    "decoder_ffn_dim": 64,
    "decoder_attention_heads": 4,
    "decoder_layers": 2,
    "num_queries": 20,
    "num_labels": 5,
}


@pytest.fixture
def features_of():
    """``features_of(images)``: random feature maps (the detectors do not read them) carrying the images."""

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


@pytest.fixture
def tiny_owlv2() -> dict:
    return copy.deepcopy(TINY_OWLV2)


@pytest.fixture
def tiny_rt_detr() -> dict:
    return copy.deepcopy(TINY_RT_DETR)


@pytest.fixture
def images() -> list[Image.Image]:
    """The contract kit's two images: 96 x 64 (landscape) and 64 x 112 (portrait)."""
    return sample_images()


@pytest.fixture(scope="session")
def owlv2_dir(tmp_path_factory):
    """A tiny full ``Owlv2ForObjectDetection`` (text tower included) saved with its image processor.

    The last layers of its box and objectness heads are re-initialised small, so that, as in a trained OWLv2,
    each box sits near its patch (transformers' random init saturates the sigmoid) and objectness spreads around
    0.5."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessorPil

    text = {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "vocab_size": 50,
        "max_position_embeddings": 8,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    torch.manual_seed(0)
    model = Owlv2ForObjectDetection(Owlv2Config(text_config=text, projection_dim=16, **TINY_OWLV2)).eval()
    for head in (model.box_head, model.objectness_head):
        torch.nn.init.normal_(head.dense2.weight, std=0.005)
        torch.nn.init.zeros_(head.dense2.bias)
    directory = tmp_path_factory.mktemp("owlv2")
    model.save_pretrained(directory)
    Owlv2ImageProcessorPil(size={"height": 64, "width": 64}).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def rt_detr_dir(tmp_path_factory):
    """A tiny ``RTDetrForObjectDetection`` saved with an image processor resizing to 64 px."""
    from transformers import RTDetrConfig, RTDetrForObjectDetection, RTDetrImageProcessorPil

    torch.manual_seed(0)
    model = RTDetrForObjectDetection(RTDetrConfig(**TINY_RT_DETR)).eval()
    directory = tmp_path_factory.mktemp("rt-detr")
    model.save_pretrained(directory)
    RTDetrImageProcessorPil(size={"height": 64, "width": 64}).save_pretrained(directory)
    return directory
