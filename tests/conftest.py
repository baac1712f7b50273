"""Shared fixtures: a tiny real pipeline (conv tokenizer, grid proposer, RoI pooling, LLaMA) built from a recipe."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from PIL import Image

from groma_core.plugins import PluginManager
from groma_core.testing import tiny


@pytest.fixture(scope="session")
def sp_dir(tmp_path_factory):
    """A directory with a freshly trained LLaMA-style SentencePiece model."""
    d = tmp_path_factory.mktemp("sp")
    tiny.make_sentencepiece(d)
    return d


@pytest.fixture
def manager():
    """A plugin manager with the installed plugins plus the tiny test stages."""
    pm = PluginManager()
    pm.register_plugin(tiny, name="tiny", distribution="groma-core-tests")
    return pm


@pytest.fixture
def tiny_recipe(sp_dir):
    return tiny.recipe_dict(sp_dir)


@pytest.fixture
def tiny_model(tiny_recipe, manager):
    from groma_core.api import build
    from groma_core.recipe import validate_recipe

    torch.manual_seed(0)
    return build(validate_recipe(tiny_recipe, manager), manager=manager).eval()


@pytest.fixture
def images():
    """Two RGB images of different sizes with a few coloured shapes."""
    a = Image.new("RGB", (80, 60), (240, 240, 240))
    a.paste((200, 20, 20), (5, 5, 40, 30))
    b = Image.new("RGB", (50, 90), (10, 10, 10))
    b.paste((20, 200, 20), (10, 40, 45, 85))
    return [a, b]
