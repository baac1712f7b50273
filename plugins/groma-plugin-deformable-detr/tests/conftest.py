"""Fixtures of the deformable-detr tests: the golden sets, a proposer loaded with their weights, their features."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
from groma_plugin_deformable_detr import DeformableDetrOptions, DeformableDetrProposer, build_proposer

from groma_core.reference import load_reference_weights
from groma_core.stages import BuildContext
from groma_core.testing.fixtures import GoldenSet, golden_sets, require_golden_sets
from groma_core.testing.golden import fixture_features
from groma_core.types import ImageFeatures

LEVELS = ["last-3", "last-2", "last-1", "last"]


def golden_features(golden: GoldenSet, images: list[str]) -> ImageFeatures:
    """The tokenizer's levels for ``images`` (batched in that order), made from the fixture's DINOv2 hidden states."""
    return fixture_features(golden, images)


def golden_proposer(golden: GoldenSet, **overrides) -> DeformableDetrProposer:
    """The proposer configured from the set's reference config, with the set's weights, in eval mode."""
    options = DeformableDetrOptions.from_reference_config(golden.groma_config).model_copy(update=overrides)
    channels = golden.groma_config["perceiver_cfg"]["vis_encoder_cfg"]["hidden_size"]
    stage = build_proposer(options, BuildContext(level_channels=dict.fromkeys(LEVELS, channels)))
    load_reference_weights(stage, golden.weights(), where=str(golden.dir))
    return stage.eval()


@pytest.fixture(scope="session", params=golden_sets() or [None], ids=lambda p: p.name if p else "no-golden-set")
def golden(request) -> GoldenSet:
    if request.param is None:
        require_golden_sets()  # raises, naming where the sets were looked for: no silent skip
    return GoldenSet(request.param)


@pytest.fixture(scope="session")
def golden_stage(golden) -> DeformableDetrProposer:
    """The set's proposer with default options."""
    return golden_proposer(golden)


@pytest.fixture
def make_proposer(golden):
    """``make_proposer(**option_overrides)``: a proposer of the set with some options changed."""
    return lambda **overrides: golden_proposer(golden, **overrides)


@pytest.fixture
def make_features(golden):
    """``make_features(images)``: the set's features of these images, batched in order."""
    return lambda images: golden_features(golden, images)
