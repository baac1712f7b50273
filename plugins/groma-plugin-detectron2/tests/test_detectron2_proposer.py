"""The ``detectron2`` proposer, run only where ``import detectron2`` works: contract, agreement with detectron2's
own DefaultPredictor and ProposalNetwork, weights, a whole tiny pipeline, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

detectron2 = pytest.importorskip("detectron2")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from detectron2.engine import DefaultPredictor  # noqa: E402
from groma_plugin_detectron2 import Detectron2Options, Detectron2Proposer  # noqa: E402
from PIL import Image  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from groma_core.api import build  # noqa: E402
from groma_core.errors import InputError  # noqa: E402
from groma_core.inference import CAPTION_PROMPT, Groma, Request  # noqa: E402
from groma_core.plugins import PluginManager  # noqa: E402
from groma_core.recipe import validate_recipe  # noqa: E402
from groma_core.testing.tiny import make_sentencepiece  # noqa: E402
from groma_core.types import ImageFeatures  # noqa: E402

RECIPES = Path(__file__).resolve().parents[3] / "recipes"


def proposer(**options) -> Detectron2Proposer:
    torch.manual_seed(0)
    return Detectron2Proposer(Detectron2Options(**options)).eval()


def by_score(boxes: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.sort(scores, descending=True, stable=True).indices
    return boxes[order], scores[order]


def test_registered_under_its_name():
    manager = PluginManager()
    entry = manager.get("region_proposer", "detectron2")
    assert entry.distribution == "groma-plugin-detectron2" and entry.config is Detectron2Options
    record = next(r for r in manager.records if r.distribution == "groma-plugin-detectron2")
    assert record.status == "ok"


@pytest.mark.parametrize("source", ["instances", "rpn"])
def test_contract_kit(source, tiny_options, images, check_contract):
    props = check_contract(proposer(**tiny_options, source=source, top_k=20), images)
    for boxes, scores in zip(props.boxes, props.scores):
        assert 0 < boxes.shape[0] <= 20 and torch.all(scores[:-1] >= scores[1:])
        assert boxes.min() >= 0 and boxes.max() <= 1  # detectron2 clips to the image


def test_instances_agree_with_detectron2s_default_predictor(tiny_options, images):
    """DefaultPredictor takes BGR arrays and returns instances in pixels of the original image; the proposer's
    boxes are the same, normalized."""
    stage = proposer(**tiny_options, top_k=None)
    cfg = stage.cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = ""  # nothing to download: the weights come from the stage
    predictor = DefaultPredictor(cfg)
    predictor.model.load_state_dict(stage.model.state_dict())
    for image in images:
        width, height = image.size
        instances = predictor(np.asarray(image)[:, :, ::-1])["instances"]
        scale = torch.tensor([width, height, width, height])
        expected = by_score(instances.pred_boxes.tensor / scale, instances.scores)
        props = stage(ImageFeatures(torch.zeros(1, 1, 1), {}, images=[image]))
        assert props.boxes[0].shape[0] > 0
        torch.testing.assert_close(props.boxes[0], expected[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(props.scores[0], expected[1], atol=1e-5, rtol=0)


def test_rpn_source_equals_a_proposal_network_with_the_same_weights(tiny_options, images, features_of):
    stage = proposer(**tiny_options, source="rpn", top_k=None)
    rpn_only = {**tiny_options["config_overrides"], "MODEL.META_ARCHITECTURE": "ProposalNetwork"}
    network = proposer(config_file=tiny_options["config_file"], config_overrides=rpn_only, top_k=None)
    state = {k: v for k, v in stage.model.state_dict().items() if not k.startswith("roi_heads.")}
    network.model.load_state_dict(state)
    ours, theirs = stage(features_of(images)), network(features_of(images))
    for i in range(len(images)):
        assert 0 < ours.boxes[i].shape[0] <= 50  # MODEL.RPN.POST_NMS_TOPK_TEST
        torch.testing.assert_close(ours.boxes[i], theirs.boxes[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.scores[i], theirs.scores[i], atol=1e-6, rtol=0)


def test_weights_load_through_detection_checkpointer(tiny_options, images, features_of, tmp_path):
    trained = proposer(**tiny_options)
    torch.save(trained.model.state_dict(), tmp_path / "model.pth")
    torch.manual_seed(1)
    loaded = Detectron2Proposer(Detectron2Options(**tiny_options, weights=str(tmp_path / "model.pth"))).eval()
    a, b = trained(features_of(images)), loaded(features_of(images))
    for i in range(len(images)):
        torch.testing.assert_close(a.boxes[i], b.boxes[i])


def test_frozen_and_always_in_eval_mode(tiny_options):
    stage = proposer(**tiny_options).train()
    assert stage.training and not stage.model.training
    assert not any(p.requires_grad for p in stage.parameters())


def test_whole_tiny_pipeline(tiny_options, tmp_path):
    make_sentencepiece(tmp_path)
    recipe = yaml.safe_load((RECIPES / "groma-tiny.yaml").read_text())
    recipe["region_proposer"] = {"plugin": "detectron2", **tiny_options, "top_k": 10}
    recipe["language_backbone"]["tokenizer"] = str(tmp_path)
    recipe["region_selection"]["score_threshold"] = 0.0
    recipe["generation"]["max_new_tokens"] = 6
    model = build(validate_recipe(recipe)).eval()
    image = Image.new("RGB", (120, 80), (235, 235, 235))
    image.paste((200, 30, 30), (10, 10, 60, 50))
    (answer,) = Groma(model).answer([Request(image, [(CAPTION_PROMPT, None)])])
    candidates = model.region_proposer(ImageFeatures(torch.zeros(1, 1, 1), {}, images=[image])).boxes[0]
    assert 1 <= answer.regions.shape[0] <= 10
    for box in answer.regions:
        assert (candidates - box).abs().max(dim=1).values.min() < 1e-5


def test_errors(tiny_options, images, features_of):
    stage = proposer(**tiny_options)
    features = features_of(images)
    features.images = None
    with pytest.raises(InputError, match="ImageFeatures.images is None"):
        stage(features)
    with pytest.raises(FileNotFoundError, match="neither a file nor a model-zoo config name"):
        proposer(config_file="COCO-Detection/no_such_model.yaml")
    with pytest.raises(ValidationError, match="LazyConfig"):
        Detectron2Options(config_file="new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py")
    with pytest.raises(ValidationError, match="not detectron2 config keys"):
        Detectron2Options(config_overrides={"model.weights": ""})
    retinanet = {"INPUT.MIN_SIZE_TEST": 96, "INPUT.MAX_SIZE_TEST": 160}
    with pytest.raises(ValueError, match="RetinaNet has no proposal_generator"):
        proposer(config_file="COCO-Detection/retinanet_R_50_FPN_1x.yaml", config_overrides=retinanet, source="rpn")
