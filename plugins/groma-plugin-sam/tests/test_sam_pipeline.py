"""The whole Groma pipeline at tiny size with SAM as region proposer, and the ablation recipe."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from groma_core.api import build
from groma_core.inference import Groma, Request
from groma_core.plugins import PluginManager
from groma_core.recipe import load_recipe, validate_recipe
from groma_core.testing.tiny import make_sentencepiece
from groma_core.types import GroundedAnswer

RECIPES = Path(__file__).resolve().parents[3] / "recipes"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("tok")
    make_sentencepiece(directory)
    return str(directory)


@pytest.fixture
def sam_model(tokenizer_dir, sam_checkpoint, tiny_options):
    """recipes/groma-tiny.yaml (tiny dinov2, mlvl-roialign, vicuna) with the tiny SAM as region proposer."""
    recipe = yaml.safe_load((RECIPES / "groma-tiny.yaml").read_text())
    recipe["region_proposer"] = {
        "plugin": "sam",
        **tiny_options,
        "pretrained": sam_checkpoint,
        "pred_iou_thresh": 0.0,
        "stability_score_thresh": 0.0,
        "return_masks": True,
    }
    recipe["language_backbone"]["tokenizer"] = tokenizer_dir
    recipe["region_selection"]["score_threshold"] = 0.0
    recipe["generation"]["max_new_tokens"] = 6
    return build(validate_recipe(recipe, PluginManager())).eval()


def test_answers_come_with_regions_proposed_by_sam(sam_model, images):
    answers = Groma(sam_model).answer(
        [Request(images[0], [("[grounding]Describe the image.", None)]), Request(images[1], [("What is this?", None)])]
    )
    assert len(answers) == 2 and all(isinstance(a, GroundedAnswer) for a in answers)
    pixels = sam_model.image_tokenizer.preprocess(images)
    proposals = sam_model.region_proposer(sam_model.encode_images(pixels, images))
    for answer, image, boxes, masks in zip(answers, images, proposals.boxes, proposals.extras["masks"]):
        assert answer.image_size == image.size and answer.regions.shape[0] > 0
        for region in answer.regions:
            assert torch.isclose(boxes, region, atol=1e-6).all(dim=1).any(), "every region is one of SAM's boxes"
        assert masks.shape[1:] == (image.size[1], image.size[0])


def test_user_boxes_join_sams_proposals(sam_model, images):
    answer = Groma(sam_model).answer(
        [Request(images[0], [("What is <roi><refer_box></roi><refer_feat>?", None)], [(8, 8, 50, 40)])]
    )[0]
    box = torch.tensor([8 / 90, 8 / 60, 50 / 90, 40 / 60])
    assert torch.isclose(answer.regions, box, atol=1e-6).all(dim=1).any()


def test_ablation_recipe_swaps_only_the_proposer():
    manager = PluginManager()
    recipe = load_recipe(
        RECIPES / "ablation-sam.yaml", ["region_proposer.pretrained=/models/sam_vit_b_01ec64.pth"], manager
    )
    assert recipe.stages["region_proposer"].plugin == "sam"
    assert recipe.stages["region_proposer"].options.pretrained == "/models/sam_vit_b_01ec64.pth"
    assert recipe.core.weights_exclude == ["region_proposer"]
    reference = load_recipe(RECIPES / "groma-7b.yaml", (), manager)
    for kind in ("image_tokenizer", "region_encoder", "language_backbone"):
        assert recipe.stages[kind].plugin == reference.stages[kind].plugin
        assert recipe.stages[kind].options == reference.stages[kind].options
    assert recipe.core.region_selection == reference.core.region_selection
    assert recipe.core.generation == reference.core.generation


def test_trains_with_sam_as_the_frozen_proposer(sam_model, tmp_path):
    """The ablation's training: language stages with SAM proposing on each sample's original image (issue: `groma
    train` used to stop at 'features.images is None')."""
    from groma_core.data import ShapesConfig, write_shapes_dataset
    from groma_core.schema import DatasetSpec
    from groma_core.training import TrainingConfig, run_training
    from groma_core.training.datasets import open_dataset

    write_shapes_dataset(tmp_path / "shapes", ShapesConfig(images=6, seed=2, width=(64, 96), height=(64, 80)))
    spec = DatasetSpec(format="rec", ann="annotations/rec_train.json", images="images")
    data = {"rec": open_dataset(spec, sam_model, tmp_path / "shapes", "rec")}
    sam = sam_model.region_proposer
    before = {k: v.clone() for k, v in sam.state_dict().items()}
    calls = []
    sam.register_forward_hook(lambda module, args, out: calls.append(len(args[0].images)))
    stage = {"name": "referring", "train": ["image_projector", "language_backbone"], "freeze": ["region_proposer"],
             "data": [{"name": "rec"}], "batch_size": 2, "lr": 1e-3, "max_steps": 2}
    result = run_training(sam_model.train(), TrainingConfig.model_validate({"stages": [stage], "progress": False}),
                          data, tmp_path / "run")
    assert calls == [2, 2], "SAM proposed on the two original images of each step"
    assert all(torch.equal(before[k], v) for k, v in sam.state_dict().items())
    assert result.steps == {"referring": 2} and all(map(math.isfinite, result.last_loss.values()))
