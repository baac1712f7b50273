"""The ``owlv2`` proposer: contract, agreement with transformers' OWLv2 and its post-processing, box mapping from
the padded square back to the original image, options and errors."""

from __future__ import annotations

import pytest
import torch
from groma_plugin_detectors import Owlv2Options, Owlv2Proposer, padded_square_to_original
from PIL import Image
from pydantic import ValidationError
from transformers import Owlv2ForObjectDetection, Owlv2ImageProcessorPil

from groma_core.errors import InputError
from groma_core.plugins import PluginManager

PATCHES = 64  # the tiny model: 64 px input in 8 px patches


def proposer(**options) -> Owlv2Proposer:
    return Owlv2Proposer(Owlv2Options(**options)).eval()


def test_registered_under_its_name():
    entry = PluginManager().get("region_proposer", "owlv2")
    assert entry.distribution == "groma-plugin-detectors" and entry.config is Owlv2Options


def test_contract_kit(owlv2_dir, images, check_contract):
    props = check_contract(proposer(pretrained=str(owlv2_dir), top_k=20), images)
    assert [b.shape[0] for b in props.boxes] == [20, 20]
    for scores in props.scores:
        assert torch.all(scores[:-1] >= scores[1:]), "proposals come best first"


def test_agrees_with_transformers_owlv2_and_its_post_processing(owlv2_dir, images, features_of):
    """The full transformers model (text tower and a text query included) and its processor's
    post_process_object_detection give the same boxes, in pixels of the original image, and objectness."""
    stage = proposer(pretrained=str(owlv2_dir), top_k=None)
    full = Owlv2ForObjectDetection.from_pretrained(owlv2_dir).eval()
    processor = Owlv2ImageProcessorPil.from_pretrained(owlv2_dir)
    for image in images:
        width, height = image.size
        pixel_values = processor(images=[image], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            out = full(input_ids=torch.tensor([[1, 7, 9, 2]]), pixel_values=pixel_values)
        (result,) = processor.post_process_object_detection(out, threshold=-1.0, target_sizes=[(height, width)])
        boxes = result["boxes"] / torch.tensor([width, height, width, height])
        scores = out.objectness_logits[0].sigmoid()
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        inside = ((centres >= 0) & (centres <= 1)).all(dim=1)
        assert 0 < inside.sum() < PATCHES, "a non-square image leaves some patches in the padding"
        order = torch.sort(scores[inside], descending=True, stable=True).indices
        props = stage(features_of([image]))
        got_boxes, got_scores = props.boxes[0], props.scores[0]
        torch.testing.assert_close(got_boxes, boxes[inside][order], atol=1e-5, rtol=0)
        torch.testing.assert_close(got_scores, scores[inside][order], atol=1e-5, rtol=0)


def test_boxes_land_on_the_same_pixels_as_on_the_padded_image(owlv2_dir, features_of):
    """OWLv2 sees a landscape image as the black square below it: the same detections, in the original's frame."""
    image = Image.new("RGB", (96, 60), (200, 200, 200))
    image.paste((180, 40, 40), (10, 12, 50, 44))
    square = Image.new("RGB", (96, 96), (0, 0, 0))
    square.paste(image, (0, 0))
    stage = proposer(pretrained=str(owlv2_dir), top_k=None)
    on_image, on_square = stage(features_of([image])), stage(features_of([square]))
    assert on_square.boxes[0].shape[0] == PATCHES
    # the square's boxes in the original's normalized frame: y scales by 96 / 60
    expected = on_square.boxes[0] * torch.tensor([1.0, 96 / 60, 1.0, 96 / 60])
    centres_y = (expected[:, 1] + expected[:, 3]) / 2
    keep = (centres_y >= 0) & (centres_y <= 1)
    assert 0 < keep.sum() < PATCHES, "some of the square's patches lie below the image"
    torch.testing.assert_close(on_image.boxes[0], expected[keep], atol=1e-5, rtol=0)
    torch.testing.assert_close(on_image.scores[0], on_square.scores[0][keep], atol=1e-5, rtol=0)


def test_padded_square_to_original_by_hand():
    boxes = torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.0, 0.0, 1.0, 0.5]])
    wide = padded_square_to_original(boxes, (200, 100))  # the square is 200 x 200; the image its top half
    torch.testing.assert_close(wide, torch.tensor([[0.25, 0.5, 0.5, 1.0], [0.0, 0.0, 1.0, 1.0]]))
    tall = padded_square_to_original(boxes, (50, 100))  # the square is 100 x 100; the image its left half
    torch.testing.assert_close(tall, torch.tensor([[0.5, 0.25, 1.0, 0.5], [0.0, 0.0, 2.0, 0.5]]))


def test_text_tower_is_dropped(owlv2_dir):
    stage = proposer(pretrained=str(owlv2_dir))
    full = Owlv2ForObjectDetection.from_pretrained(owlv2_dir)
    assert not hasattr(stage.detector.owlv2, "text_model") and not hasattr(stage.detector, "class_head")
    kept = {k for k in stage.state_dict()}
    assert kept and all(k.startswith("detector.") for k in kept)
    assert {k.removeprefix("detector.") for k in kept} < set(full.state_dict())
    assert not any("text_model" in k for k in kept)


def test_top_k_and_clipping(owlv2_dir, images, features_of):
    features = features_of(images)
    every = proposer(pretrained=str(owlv2_dir), top_k=None)(features)
    best = proposer(pretrained=str(owlv2_dir), top_k=5)(features)
    clipped = proposer(pretrained=str(owlv2_dir), top_k=None, clip_boxes=True)(features)
    for i in range(2):
        torch.testing.assert_close(best.boxes[i], every.boxes[i][:5])
        torch.testing.assert_close(clipped.boxes[i], every.boxes[i].clamp(0, 1))
        assert clipped.boxes[i].min() >= 0 and clipped.boxes[i].max() <= 1


def test_input_size_other_than_the_models_interpolates_positions(owlv2_dir, features_of):
    stage = proposer(pretrained=str(owlv2_dir), input_size=96, top_k=None)
    assert stage.interpolate_pos_encoding and stage.preprocess([Image.new("RGB", (30, 30))]).shape == (1, 3, 96, 96)
    (boxes,) = stage(features_of([Image.new("RGB", (40, 40), (90, 90, 90))])).boxes
    assert boxes.shape == ((96 // 8) ** 2, 4)
    with pytest.raises(ValueError, match="input_size 60 is not a multiple of the patch size 8"):
        proposer(pretrained=str(owlv2_dir), input_size=60)


def test_random_model_from_architecture(tiny_owlv2, images, check_contract):
    stage = proposer(architecture=tiny_owlv2)
    assert stage.input_size == 64 and not stage.interpolate_pos_encoding
    check_contract(stage, images)


def test_frozen_and_always_in_eval_mode(owlv2_dir):
    stage = proposer(pretrained=str(owlv2_dir)).train()
    assert stage.training and not stage.detector.training
    assert not any(p.requires_grad for p in stage.parameters())


def test_builds_full_size_on_the_meta_device():
    with torch.device("meta"):
        stage = Owlv2Proposer(Owlv2Options())
    assert all(p.device.type == "meta" for p in stage.parameters())
    assert stage.input_size == stage.detector.config.vision_config.image_size


def test_missing_images_are_a_clear_error(owlv2_dir, images, features_of):
    stage = proposer(pretrained=str(owlv2_dir))
    features = features_of(images)
    features.images = None
    with pytest.raises(InputError, match=r"'owlv2' region proposer .* ImageFeatures.images is None"):
        stage(features)
    features.images = images[:1]
    with pytest.raises(InputError, match="1 original images for a batch of 2"):
        stage(features)


def test_option_errors(tmp_path, tiny_owlv2):
    with pytest.raises(ValidationError, match="either `pretrained`"):
        Owlv2Options(pretrained=str(tmp_path), architecture=tiny_owlv2)
    with pytest.raises(ValidationError, match=r"vision_config.patch_sise: not an argument .* 'patch_size'"):
        Owlv2Options(architecture={"vision_config": {"patch_sise": 8}})
    with pytest.raises(FileNotFoundError, match="is not a model directory"):
        Owlv2Proposer(Owlv2Options(pretrained=str(tmp_path)))
