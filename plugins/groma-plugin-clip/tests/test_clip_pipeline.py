"""The clip tokenizer inside whole Groma pipelines: a tiny one that generates, and the ablation-clip recipe."""

from __future__ import annotations

import pytest
import torch
import yaml
from groma_plugin_clip import ClipImageTokenizer
from PIL import Image

from groma_core.api import _construct, build
from groma_core.inference import Groma, Request
from groma_core.plugins import PluginManager
from groma_core.recipe import load_recipe, recipes_dir, validate_recipe
from groma_core.testing.tiny import make_sentencepiece
from groma_core.types import GroundedAnswer

#: a tiny CLIP tower pretrained at 224 px, read at 336 px (position table interpolated): 24 x 24 patches of 64
#: channels (the tiny default plugins' width; the proposer needs at least its 300 queries of positions), 144 tokens
TINY_CLIP = {
    "plugin": "clip",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "patch_size": 14,
    "image_size": 224,
    "input_size": 336,
}


def read_shipped(name: str) -> dict:
    return yaml.safe_load((recipes_dir() / f"{name}.yaml").read_text())


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    """groma-tiny (tiny deformable-detr, mlvl-roialign, vicuna) with the tiny clip tower as its image tokenizer."""
    tokenizer = make_sentencepiece(tmp_path_factory.mktemp("sp"))
    recipe = read_shipped("groma-tiny")
    recipe["image_tokenizer"] = dict(TINY_CLIP)
    recipe["language_backbone"]["tokenizer"] = str(tokenizer.parent)
    manager = PluginManager()
    return build(validate_recipe(recipe, manager), manager=manager).eval()


def test_a_tiny_pipeline_with_clip_answers_grounded_requests(tiny_pipeline):
    model = tiny_pipeline
    assert isinstance(model.image_tokenizer, ClipImageTokenizer)
    assert (model.image_tokenizer.num_tokens, model.image_tokenizer.token_dim) == (144, 256)
    scene = Image.new("RGB", (160, 96), (230, 230, 230))
    scene.paste((200, 30, 30), (16, 16, 80, 64))
    requests = [
        Request(scene, [("[grounding]Describe the image.", None)]),
        Request(scene, [("What is <roi><refer_box></roi><refer_feat>?", None)], [[16, 16, 80, 64]]),
    ]
    with torch.no_grad():
        answers = Groma(model).answer(requests, max_new_tokens=6)
    assert len(answers) == 2 and all(isinstance(a, GroundedAnswer) for a in answers)
    for answer in answers:
        assert answer.image_size == (160, 96)
        assert answer.regions.ndim == 2 and answer.regions.shape[1] == 4 and answer.regions.shape[0] <= 100
    user_box = torch.tensor([16 / 160, 16 / 96, 80 / 160, 64 / 96])
    assert torch.isclose(answers[1].regions, user_box, atol=1e-6).all(dim=1).any(), "the user box is a region"
    with torch.no_grad():
        again = Groma(model).answer(requests[:1], max_new_tokens=6)
    assert again[0].raw_text == answers[0].raw_text


def test_the_ablation_recipe_swaps_only_the_image_tokenizer():
    ablation, groma = read_shipped("ablation-clip"), read_shipped("groma-7b")
    assert ablation["image_tokenizer"]["plugin"] == "clip" and groma["image_tokenizer"]["plugin"] == "dinov2"
    unchanged = set(groma) - {"name", "description", "image_tokenizer"}
    assert set(ablation) == set(groma)
    assert {k: ablation[k] for k in unchanged} == {k: groma[k] for k in unchanged}


def test_the_ablation_recipe_builds_at_full_size_on_the_meta_device():
    manager = PluginManager()
    recipe = load_recipe("ablation-clip", manager=manager)
    with torch.device("meta"):
        model = _construct(recipe, manager)
    tokenizer = model.image_tokenizer
    assert isinstance(tokenizer, ClipImageTokenizer) and tokenizer.image_size == (336, 336)
    assert (tokenizer.num_tokens, tokenizer.token_dim) == (144, 4096)
    assert tokenizer.level_sizes["last"] == (24, 24) and tokenizer.level_channels["last"] == 1024
    assert sum(p.numel() for p in tokenizer.parameters()) == 303_507_456
