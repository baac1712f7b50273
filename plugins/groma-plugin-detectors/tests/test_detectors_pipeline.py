"""The detector proposers inside a whole Groma pipeline at tiny size (tiny DINOv2, mlvl-roialign, tiny Vicuna),
and the ablation recipes that swap them into the Groma-7B recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from groma_core.api import build
from groma_core.inference import CAPTION_PROMPT, REGION_PROMPT, Groma, Request
from groma_core.recipe import read_recipe_file, validate_recipe
from groma_core.testing.tiny import make_sentencepiece
from groma_core.types import ImageFeatures

RECIPES = Path(__file__).resolve().parents[3] / "recipes"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tokenizer")
    make_sentencepiece(directory)
    return directory


def tiny_pipeline(region_proposer: dict, tokenizer_dir: Path):
    """recipes/groma-tiny.yaml with its region proposer swapped; the score threshold is lowered to 0 so that the
    random tiny detectors' proposals are all candidates."""
    recipe = yaml.safe_load((RECIPES / "groma-tiny.yaml").read_text())
    recipe["region_proposer"] = region_proposer
    recipe["language_backbone"]["tokenizer"] = str(tokenizer_dir)
    recipe["region_selection"]["score_threshold"] = 0.0
    recipe["generation"]["max_new_tokens"] = 6
    return build(validate_recipe(recipe)).eval()


def picture() -> Image.Image:
    image = Image.new("RGB", (120, 80), (235, 235, 235))
    image.paste((200, 30, 30), (10, 10, 60, 50))
    image.paste((30, 60, 200), (70, 30, 110, 75))
    return image


@pytest.mark.parametrize("plugin", ["owlv2", "rt-detr"])
def test_grounded_answers_refer_to_the_detectors_proposals(plugin, owlv2_dir, rt_detr_dir, tokenizer_dir):
    pretrained = {"owlv2": owlv2_dir, "rt-detr": rt_detr_dir}[plugin]
    model = tiny_pipeline({"plugin": plugin, "pretrained": str(pretrained), "top_k": 10}, tokenizer_dir)
    image = picture()
    user_box = (20.0, 16.0, 50.0, 40.0)
    caption, region = Groma(model).answer(
        [Request(image, [(CAPTION_PROMPT, None)]), Request(image, [(REGION_PROMPT, None)], [user_box])]
    )
    proposals = model.region_proposer(ImageFeatures(torch.zeros(1, 1, 1), {}, images=[image]))
    candidates = proposals.boxes[0]
    assert 1 <= caption.regions.shape[0] <= 10
    for box in caption.regions:  # every region the caption can refer to is one of the detector's proposals
        assert (candidates - box).abs().max(dim=1).values.min() < 1e-5
    user = torch.tensor(user_box) / torch.tensor([120.0, 80.0, 120.0, 80.0])
    assert (region.regions - user).abs().max(dim=1).values.min() < 1e-6, "the user's box joins the regions"
    assert isinstance(caption.text, str) and isinstance(region.text, str)


@pytest.mark.parametrize("name, plugin", [("ablation-owlv2", "owlv2"), ("ablation-rt-detr", "rt-detr")])
def test_ablation_recipe_swaps_only_the_proposer(name, plugin):
    recipe = validate_recipe(read_recipe_file(RECIPES / f"{name}.yaml"))
    assert recipe.stages["region_proposer"].plugin == plugin
    ablation = read_recipe_file(RECIPES / f"{name}.yaml")
    groma = read_recipe_file(RECIPES / "groma-7b.yaml")
    changed = {k for k in groma.keys() | ablation.keys() if groma.get(k) != ablation.get(k)}
    assert changed == {"name", "description", "region_proposer"}


def test_pretrained_under_an_unknown_users_home_is_a_clear_error():
    """``~someone/...`` for a user this machine does not know is a missing directory, not a RuntimeError from
    ``Path.expanduser``."""
    from groma_plugin_detectors.common import check_pretrained, saved_processor

    with pytest.raises(FileNotFoundError, match="owlv2: pretrained='~nosuchuser-groma/owlv2' is not a model directory"):
        check_pretrained("~nosuchuser-groma/owlv2", "owlv2")
    assert saved_processor("~nosuchuser-groma/owlv2") is None
