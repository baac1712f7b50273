"""Fixtures of the dinov2 tests: the golden sets, a tokenizer loaded with their weights, tiny options."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from groma_plugin_dinov2 import Dinov2ImageTokenizer, Dinov2Options, build_dinov2

from groma_core.reference import load_reference_weights
from groma_core.stages import BuildContext
from groma_core.testing.fixtures import GoldenSet, golden_sets, require_golden_sets


def golden_tokenizer(golden: GoldenSet, **overrides) -> Dinov2ImageTokenizer:
    """The set's tokenizer (options from its reference config, then ``overrides``) with its weights, in eval mode."""
    options = Dinov2Options.from_reference_config(golden.groma_config).model_dump(exclude_unset=True)
    stage = build_dinov2(Dinov2Options(**{**options, **overrides}), BuildContext())
    load_reference_weights(stage, golden.weights(), where=str(golden.dir))
    return stage.eval()


@pytest.fixture(scope="session", params=golden_sets() or [None], ids=lambda p: p.name if p else "no-golden-set")
def golden(request) -> GoldenSet:
    if request.param is None:
        require_golden_sets()  # raises, naming where the sets were looked for: no silent skip
    return GoldenSet(request.param)


@pytest.fixture(scope="session")
def golden_stage(golden) -> Dinov2ImageTokenizer:
    """The set's tokenizer with default options."""
    return golden_tokenizer(golden)


@pytest.fixture
def make_golden(golden):
    """``make_golden(**option_overrides)``: a tokenizer of the set with some options changed."""
    return lambda **overrides: golden_tokenizer(golden, **overrides)


@pytest.fixture
def tiny_options() -> dict:
    """Options of a tiny encoder read at 112 px (an 8x8 patch grid) for fast behavioural tests."""
    return {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4, "input_size": 112}


@pytest.fixture
def make_tiny():
    """``make_tiny(**options)``: a seeded tiny tokenizer in eval mode."""

    def make(**options) -> Dinov2ImageTokenizer:
        torch.manual_seed(0)
        return build_dinov2(Dinov2Options(**options), BuildContext()).eval()

    return make
