"""The ``rt-detr`` proposer: contract, agreement with transformers' RT-DETR and its post-processing, frozen
BatchNorm, options and errors."""

from __future__ import annotations

import pytest
import torch
from groma_plugin_detectors import RTDetrOptions, RTDetrProposer
from PIL import Image
from pydantic import ValidationError
from transformers import RTDetrForObjectDetection, RTDetrImageProcessorPil

from groma_core.boxes import cxcywh_to_xyxy
from groma_core.errors import InputError
from groma_core.plugins import PluginManager

QUERIES = 20  # the tiny model's num_queries


def proposer(**options) -> RTDetrProposer:
    return RTDetrProposer(RTDetrOptions(**options)).eval()


def test_registered_under_its_name():
    entry = PluginManager().get("region_proposer", "rt-detr")
    assert entry.distribution == "groma-plugin-detectors" and entry.config is RTDetrOptions


def test_contract_kit(rt_detr_dir, images, check_contract):
    props = check_contract(proposer(pretrained=str(rt_detr_dir), top_k=12), images)
    assert [b.shape[0] for b in props.boxes] == [12, 12]
    for scores in props.scores:
        assert torch.all(scores[:-1] >= scores[1:]), "proposals come best first"


def test_agrees_with_transformers_rt_detr_and_its_post_processing(rt_detr_dir, images, features_of):
    """Every query becomes a proposal scored by its best class (sigmoid); each detection of transformers'
    post_process_object_detection, in pixels of the original image, is one of the proposals."""
    stage = proposer(pretrained=str(rt_detr_dir), top_k=None)
    full = RTDetrForObjectDetection.from_pretrained(rt_detr_dir).eval()
    processor = RTDetrImageProcessorPil.from_pretrained(rt_detr_dir)
    props = stage(features_of(images))
    with torch.no_grad():
        out = full(pixel_values=processor(images=images, return_tensors="pt")["pixel_values"])
    sizes = [(image.height, image.width) for image in images]
    results = processor.post_process_object_detection(out, threshold=0.0, target_sizes=sizes)
    for i, (width, height) in enumerate(image.size for image in images):
        scores = out.logits[i].sigmoid().max(dim=-1).values
        order = torch.sort(scores, descending=True, stable=True).indices
        assert props.boxes[i].shape == (QUERIES, 4)
        torch.testing.assert_close(props.boxes[i], cxcywh_to_xyxy(out.pred_boxes[i])[order], atol=1e-5, rtol=0)
        torch.testing.assert_close(props.scores[i], scores[order], atol=1e-5, rtol=0)
        detections = results[i]["boxes"] / torch.tensor([width, height, width, height])
        assert len(detections) > 0
        for box, score in zip(detections, results[i]["scores"]):
            match = (props.boxes[i] - box).abs().max(dim=1).values < 1e-5
            assert match.any() and props.scores[i][match].max() >= score - 1e-6
        torch.testing.assert_close(props.scores[i][0], results[i]["scores"].max(), atol=1e-6, rtol=0)


def test_softmax_models_score_without_the_no_object_class(tiny_rt_detr, images, features_of):
    stage = proposer(architecture={**tiny_rt_detr, "use_focal_loss": False}, input_size=64, top_k=None)
    with torch.no_grad():
        out = stage.detector(pixel_values=stage.preprocess(images))
    expected = out.logits.softmax(dim=-1)[..., :-1].max(dim=-1).values.sort(dim=-1, descending=True).values
    props = stage(features_of(images))
    torch.testing.assert_close(torch.stack(props.scores), expected, atol=1e-6, rtol=0)


def test_top_k_and_clipping(rt_detr_dir, images, features_of):
    features = features_of(images)
    every = proposer(pretrained=str(rt_detr_dir), top_k=None)(features)
    best = proposer(pretrained=str(rt_detr_dir), top_k=5)(features)
    clipped = proposer(pretrained=str(rt_detr_dir), top_k=None, clip_boxes=True)(features)
    for i in range(2):
        torch.testing.assert_close(best.boxes[i], every.boxes[i][:5])
        torch.testing.assert_close(clipped.boxes[i], every.boxes[i].clamp(0, 1))


def test_input_size_comes_from_the_saved_processor_or_the_option(rt_detr_dir, tiny_rt_detr):
    assert proposer(pretrained=str(rt_detr_dir)).input_size == 64
    stage = proposer(pretrained=str(rt_detr_dir), input_size=96)
    assert stage.preprocess([Image.new("RGB", (30, 50))]).shape == (1, 3, 96, 96)
    assert proposer(architecture=tiny_rt_detr).input_size == 640
    with pytest.raises(ValueError, match="input_size 80 is not a multiple of the largest feature stride 32"):
        proposer(pretrained=str(rt_detr_dir), input_size=80)
    with pytest.raises(ValueError, match=r"input_size 96 differs from the model's anchor_image_size \[64, 64\]"):
        proposer(architecture={**tiny_rt_detr, "anchor_image_size": [64, 64]}, input_size=96)


def test_frozen_batch_norm_statistics_survive_training_mode(rt_detr_dir, images, features_of):
    stage = proposer(pretrained=str(rt_detr_dir)).train()
    assert stage.training and not stage.detector.training
    assert not any(p.requires_grad for p in stage.parameters())
    before = {k: v.clone() for k, v in stage.state_dict().items() if "running_" in k}
    assert before, "the tiny RT-DETR has BatchNorm layers"
    stage(features_of(images))
    assert all(torch.equal(v, stage.state_dict()[k]) for k, v in before.items())


def test_builds_full_size_on_the_meta_device():
    with torch.device("meta"):
        stage = RTDetrProposer(RTDetrOptions())
    assert all(p.device.type == "meta" for p in stage.parameters())
    assert stage.input_size == 640 and stage.detector.config.num_queries == 300


def test_missing_images_are_a_clear_error(rt_detr_dir, images, features_of):
    features = features_of(images)
    features.images = None
    with pytest.raises(InputError, match=r"'rt-detr' region proposer .* ImageFeatures.images is None"):
        proposer(pretrained=str(rt_detr_dir))(features)


def test_option_errors(tmp_path, tiny_rt_detr):
    with pytest.raises(ValidationError, match="either `pretrained`"):
        RTDetrOptions(pretrained=str(tmp_path), architecture=tiny_rt_detr)
    with pytest.raises(ValidationError, match=r"architecture.d_modle: not an argument of RTDetrConfig .* 'd_model'"):
        RTDetrOptions(architecture={"d_modle": 32})
    with pytest.raises(ValidationError, match=r"backbone_config.hidden_size: .* RTDetrResNetConfig"):
        RTDetrOptions(architecture={"backbone_config": {"model_type": "rt_detr_resnet", "hidden_size": 3}})
    with pytest.raises(ValidationError, match="d_model"):
        RTDetrOptions(architecture={"d_model": "wide"})
    with pytest.raises(ValidationError, match="top_k"):
        RTDetrOptions(top_k=0)
