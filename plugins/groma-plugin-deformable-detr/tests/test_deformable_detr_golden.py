"""Parity with the reference implementation's tensors, stage by stage, for every golden fixture set."""

from __future__ import annotations

import pytest
import torch

from groma_core.boxes import cxcywh_to_xyxy, xyxy_to_cxcywh
from groma_core.selection import SelectionConfig, select_regions

FEATURE_ATOL = 1e-4
BOX_ATOL = 1e-5


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual - expected).abs().max().item()
    assert diff <= atol, f"{what}: max abs diff {diff:.3g} > {atol}"


@pytest.mark.parametrize("batched", [False, True], ids=["one-image", "all-images"])
def test_every_stage_tensor_matches_the_reference(golden, golden_stage, make_features, batched):
    images = golden.images()
    groups = [images] if batched else [[image] for image in images]
    for group in groups:
        features = make_features(group)
        with torch.no_grad():
            source = golden_stage.project(features)
            output = golden_stage.transformer(source)
            scores = golden_stage.fused_scores(output)
        for b, image in enumerate(group):
            ref = golden.tensors(f"image_{image}")
            where = f"{golden.name}/{image} (batch {group})"
            pairs = [
                ("ddetr_src", source, FEATURE_ATOL),
                ("ddetr_enc_outputs_class", output.encoder_logits, FEATURE_ATOL),
                ("ddetr_enc_outputs_coord_logits", output.encoder_coord_logits, FEATURE_ATOL),
                ("ddetr_init_reference_points", output.init_reference_points, BOX_ATOL),
                ("ddetr_intermediate_reference_points", output.intermediate_reference_points, BOX_ATOL),
                ("ddetr_intermediate_hidden_states", output.hidden_states, FEATURE_ATOL),
                ("ddetr_pred_boxes", output.pred_boxes, BOX_ATOL),
                ("ddetr_logits_coco", output.logits_coco[:, -1], FEATURE_ATOL),
                ("ddetr_logits_sa1b", output.logits_sa1b[:, -1], FEATURE_ATOL),
                ("scores_fused", scores, BOX_ATOL),
            ]
            for name, actual, atol in pairs:
                assert_close(actual[b : b + 1], ref[name], atol, f"{where} {name}")


def _case_images(name: str, case: dict) -> list[str]:
    images = case.get("images") or case.get("image")
    images = [images] if isinstance(images, str) else list(images or [])
    if len(images) != case["batch_size"]:
        images = ["img0", "img1"]  # FORMAT.md §5.3: the batch2 case is cat(image_img0, image_img1)
    return images


def test_proposals_are_the_reference_nms_candidates_and_select_the_reference_regions(
    golden, golden_stage, make_features
):
    for name, case in golden.cases().items():
        images = _case_images(name, case)
        tensors = golden.tensors(case["file"].removesuffix(".safetensors"))
        proposals = golden_stage(make_features(images))
        refer = [tensors.get(f"refer_boxes.{b}", torch.zeros(0, 4)) for b in range(len(images))]
        groma = golden.groma_config
        config = SelectionConfig(
            nms_iou=groma["nms_thres"], score_threshold=groma["box_score_thres"], max_regions=groma["max_region_num"]
        )
        regions = select_regions(proposals, config, refer_boxes=[cxcywh_to_xyxy(r) for r in refer])
        for b in range(len(images)):
            queries = proposals.boxes[b].shape[0]
            candidates = tensors[f"nms_candidates_xyxy.{b}"]
            assert_close(proposals.boxes[b], candidates[:queries], BOX_ATOL, f"{name} candidates {b}")
            assert_close(
                proposals.scores[b], tensors[f"nms_candidate_scores.{b}"][:queries], BOX_ATOL, f"{name} scores {b}"
            )
            expected = tensors[f"regions_cxcywh.{b}"]
            assert regions.boxes[b].shape == expected.shape, f"{name}: region count differs in image {b}"
            assert_close(xyxy_to_cxcywh(regions.boxes[b]), expected, BOX_ATOL, f"{name} regions {b}")
