"""Fixtures of the clip tests: tiny options and a seeded tiny tokenizer."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from groma_plugin_clip import ClipImageTokenizer, ClipOptions, build_clip

from groma_core.stages import BuildContext

#: a tiny tower pretrained at 56 px (a 4x4 patch grid of 14 px patches)
TINY_SIZES = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "patch_size": 14,
    "image_size": 56,
}


@pytest.fixture
def tiny_options() -> dict:
    """Options of a tiny tower read at its pretraining size, 56 px."""
    return {**TINY_SIZES, "input_size": 56}


@pytest.fixture
def make_tiny():
    """``make_tiny(**options)``: a seeded tiny tokenizer in eval mode."""

    def make(**options) -> ClipImageTokenizer:
        torch.manual_seed(0)
        return build_clip(ClipOptions(**options), BuildContext()).eval()

    return make
