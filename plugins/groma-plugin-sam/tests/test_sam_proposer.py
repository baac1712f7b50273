"""The registered ``sam`` region proposer: call contract, options, masks, errors."""

from __future__ import annotations

import pytest
import torch
from groma_plugin_sam import SamOptions, SamProposer
from groma_plugin_sam.masks import mask_boxes
from groma_plugin_sam.official import segment_anything_status

from groma_core.boxes import box_iou
from groma_core.errors import InputError
from groma_core.stages import BuildContext
from groma_core.testing import contract
from groma_core.types import ImageFeatures


def test_sam_keeps_the_region_proposer_contract(make_proposer, features, images, with_images):
    stage = make_proposer()
    props = contract.check_region_proposer(stage, features)
    assert all(b.shape[0] > 0 for b in props.boxes)
    with torch.no_grad():
        single = stage(with_images(images[1:]))
    torch.testing.assert_close(props.scores[1], single.scores[0], rtol=0, atol=1e-5)


def test_missing_images_are_a_clear_error(make_proposer, features):
    stage = make_proposer()
    with pytest.raises(InputError, match=r"reads the original images, but features\.images is None"):
        stage(ImageFeatures(features.tokens, features.levels))
    with pytest.raises(InputError, match="holds 1 images for a batch of 2"):
        stage(ImageFeatures(features.tokens, features.levels, images=features.images[:1]))
    with pytest.raises(InputError, match=r"features\.images\[1\] must be a PIL image, got Tensor"):
        stage(ImageFeatures(features.tokens, features.levels, images=[features.images[0], torch.zeros(3)]))


def test_masks_are_returned_at_the_original_resolution_and_match_the_boxes(make_proposer, features):
    props = make_proposer(return_masks=True)(features)
    for image, boxes, masks, points in zip(
        features.images, props.boxes, props.extras["masks"], props.extras["point_coords"]
    ):
        width, height = image.size
        assert masks.dtype == torch.bool and masks.shape == (boxes.shape[0], height, width)
        pixels = boxes * torch.tensor([width, height, width, height])
        torch.testing.assert_close(mask_boxes(masks).float(), pixels, rtol=0, atol=1e-4)
        assert torch.all(points >= 0) and torch.all(points[:, 0] <= width) and torch.all(points[:, 1] <= height)
    assert "masks" not in make_proposer()(features).extras


def test_scores_and_extras(make_proposer, features):
    props = make_proposer()(features)
    for scores, iou in zip(props.scores, props.extras["predicted_iou"]):
        torch.testing.assert_close(scores, iou.clamp(0, 1))
        assert torch.all(scores[:-1] >= scores[1:]) or torch.all(iou[:-1] >= iou[1:])  # best first
    both = make_proposer(score="iou-times-stability")(features)
    for scores, iou, stability in zip(both.scores, both.extras["predicted_iou"], both.extras["stability_score"]):
        torch.testing.assert_close(scores, (iou * stability).clamp(0, 1))


def test_quality_thresholds_can_leave_no_proposal(make_proposer, features):
    props = make_proposer(pred_iou_thresh=50.0, return_masks=True)(features)
    for boxes, scores, masks, image in zip(props.boxes, props.scores, props.extras["masks"], features.images):
        assert boxes.shape == (0, 4) and boxes.dtype == torch.float32 and scores.shape == (0,)
        assert masks.shape == (0, image.size[1], image.size[0])


def test_edges_convention_adds_one_pixel_to_the_far_corner(make_proposer, features):
    inclusive = make_proposer()(features)
    edges = make_proposer(box_convention="edges")(features)
    for image, a, b in zip(features.images, inclusive.boxes, edges.boxes):
        width, height = image.size
        torch.testing.assert_close(b - a, torch.tensor([0, 0, 1 / width, 1 / height]).expand_as(a))


def test_nms_removes_overlapping_masks(make_proposer, features):
    loose = make_proposer(box_nms_thresh=1.0)(features)
    tight = make_proposer(box_nms_thresh=0.3)(features)
    for image, many, few in zip(features.images, loose.boxes, tight.boxes):
        assert many.shape[0] == 3 * 16 and 0 < few.shape[0] < many.shape[0]  # 16 prompts x 3 masks, none empty
        width, height = image.size
        pixels = few * torch.tensor([width, height, width, height])
        overlap = box_iou(pixels, pixels).fill_diagonal_(0)
        assert overlap.max() <= 0.3


def test_points_per_batch_does_not_change_the_result(make_proposer, features):
    a, b = make_proposer(points_per_batch=64)(features), make_proposer(points_per_batch=5)(features)
    for x, y in zip(a.boxes + a.scores, b.boxes + b.scores):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


def test_transformers_directory_gives_the_proposals_of_the_checkpoint_file(make_proposer, sam_directory, features):
    a, b = make_proposer()(features), make_proposer(pretrained=sam_directory)(features)
    for x, y in zip(a.boxes + a.scores, b.boxes + b.scores):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_sam_is_frozen_and_stays_in_eval_mode(make_proposer):
    stage = make_proposer().train()
    assert not any(p.requires_grad for p in stage.parameters())
    assert not stage.model.training


def test_builds_on_the_meta_device_at_full_size():
    with torch.device("meta"):
        stage = SamProposer(SamOptions())
    params = sum(p.numel() for p in stage.parameters())
    assert stage.model.vision_encoder.pos_embed.device.type == "meta"
    assert 93_000_000 < params < 94_000_000  # SAM ViT-B: 93.7 M parameters


def test_options_are_checked(tiny_options):
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        SamOptions(image_size=100)
    with pytest.raises(ValueError, match=r"global_attn_indexes \[12\] are not layers"):
        SamOptions(global_attn_indexes=[2, 12])
    with pytest.raises(ValueError, match="extra"):
        SamOptions(crop_n_layers=1)


@pytest.mark.skipif(segment_anything_status()[0], reason="segment_anything imports here")
def test_segment_anything_backend_says_why_it_cannot_run(tiny_options, sam_checkpoint):
    from groma_plugin_sam import build_sam_proposer

    with pytest.raises(RuntimeError, match="needs the segment_anything package, which does not import"):
        build_sam_proposer(
            SamOptions(**tiny_options, pretrained=sam_checkpoint, backend="segment-anything"), BuildContext()
        )
