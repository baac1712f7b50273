"""Fixtures of the sam tests: a tiny SAM with seeded weights, saved in both layouts, images and features."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from groma_plugin_sam import SamOptions, to_segment_anything
from groma_plugin_sam.checkpoint import config_from_options
from PIL import Image
from transformers import SamModel

from groma_core.plugins import PluginManager
from groma_core.stages import BuildContext
from groma_core.types import ImageFeatures

#: a SAM small enough for CPU tests: 64 px input, 8 x 8 image embedding, 32 wide, 16 point prompts
TINY = {
    "image_size": 64,
    "patch_size": 8,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "window_size": 3,
    "global_attn_indexes": [1],
    "prompt_embed_dim": 32,
    "decoder_num_attention_heads": 2,
    "decoder_mlp_dim": 64,
    "iou_head_hidden_dim": 32,
    "points_per_side": 4,
}


def seeded_sam(seed: int = 0) -> SamModel:
    """A tiny SamModel whose weights are drawn at the scale of a trained SAM (unit-variance activations, the
    positional encoding's Gaussian matrix with std 1 as segment-anything draws it), so masks and scores vary."""
    torch.manual_seed(seed)
    model = SamModel(config_from_options(SamOptions(**TINY))).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "positional_embedding" in name:
                p.copy_(noise)
            elif p.ndim == 1:
                p.copy_(1.0 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
            else:
                p.copy_(noise / p[0].numel() ** 0.5)
    return model


@pytest.fixture
def tiny_options() -> dict:
    """Size and grid options of the tiny SAM (a fresh copy per test)."""
    return {**TINY, "global_attn_indexes": list(TINY["global_attn_indexes"])}


@pytest.fixture(scope="session")
def tiny_sam() -> SamModel:
    return seeded_sam()


@pytest.fixture(scope="session")
def sam_checkpoint(tiny_sam, tmp_path_factory) -> str:
    """The tiny SAM saved as an official segment-anything checkpoint (.pth, segment-anything key names)."""
    path = tmp_path_factory.mktemp("sa") / "sam_tiny.pth"
    torch.save(to_segment_anything(tiny_sam.state_dict(), tiny_sam.config), path)
    return str(path)


@pytest.fixture(scope="session")
def sam_directory(tiny_sam, tmp_path_factory) -> str:
    """The tiny SAM saved with transformers' save_pretrained."""
    path = tmp_path_factory.mktemp("hf") / "sam_tiny"
    tiny_sam.save_pretrained(path)
    return str(path)


@pytest.fixture
def images() -> list[Image.Image]:
    """Two RGB images of different sizes and aspect ratios with coloured rectangles."""
    a = Image.new("RGB", (90, 60), (230, 230, 230))
    a.paste((200, 30, 30), (8, 8, 50, 40))
    a.paste((20, 40, 200), (55, 20, 85, 55))
    b = Image.new("RGB", (48, 100), (20, 20, 20))
    b.paste((30, 200, 60), (10, 50, 40, 90))
    return [a, b]


def _with_images(images: list[Image.Image]) -> ImageFeatures:
    g = torch.Generator().manual_seed(0)
    levels = {n: torch.randn(len(images), 8, 4, 4, generator=g) for n in ("last-3", "last-2", "last-1", "last")}
    return ImageFeatures(tokens=levels["last"].flatten(2).transpose(1, 2), levels=levels, images=list(images))


@pytest.fixture
def with_images():
    """``with_images(images)``: image features of a batch (random maps of the standard levels) carrying the
    original images."""
    return _with_images


@pytest.fixture
def features(images) -> ImageFeatures:
    return _with_images(images)


@pytest.fixture
def make_proposer(sam_checkpoint):
    """``make_proposer(**options)``: the registered ``sam`` proposer on the tiny checkpoint, in eval mode; the
    quality filters are off unless given (the seeded weights predict low IoUs)."""

    def make(**options):
        entry = PluginManager().get("region_proposer", "sam")
        merged = {**TINY, "pretrained": sam_checkpoint, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
        merged.update(options)
        return entry.build(entry.config.model_validate(merged), BuildContext()).eval()

    return make
