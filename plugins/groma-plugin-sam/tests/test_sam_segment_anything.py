"""Against the official segment_anything package, where it imports (it needs a working torchvision; on machines
without one these tests are skipped)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from groma_plugin_sam import key_pairs, to_segment_anything
from groma_plugin_sam.official import build_official_sam, segment_anything_status
from groma_plugin_sam.preprocess import preprocess_image, to_input_frame

AVAILABLE, REASON = segment_anything_status()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"segment_anything does not import here ({REASON})")


@pytest.fixture(scope="module")
def official(tiny_sam):
    model = build_official_sam(tiny_sam.config)
    model.load_state_dict(to_segment_anything(tiny_sam.state_dict(), tiny_sam.config), strict=True)
    return model


def test_key_names_are_those_of_segment_anythings_modules(tiny_sam):
    model = build_official_sam(tiny_sam.config)
    assert set(model.state_dict()) == {sa for sa, _ in key_pairs(tiny_sam.config)}


def test_preprocessing_embeddings_and_decoder_match_the_predictor(tiny_sam, official, images):
    from segment_anything import SamPredictor

    image = images[0]
    array = np.asarray(image)
    predictor = SamPredictor(official)
    predictor.set_image(array)
    pixels, resized = preprocess_image(image, tiny_sam.config.vision_config.image_size)
    reference_input = official.preprocess(
        torch.as_tensor(predictor.transform.apply_image(array)).permute(2, 0, 1)[None]
    )
    torch.testing.assert_close(pixels, reference_input, rtol=0, atol=0)
    embeddings = tiny_sam.get_image_embeddings(pixels)
    torch.testing.assert_close(embeddings, predictor.features, rtol=0, atol=1e-4)
    points = np.array([[20.0, 20.0], [70.0, 40.0], [45.5, 10.25]])
    coords = torch.as_tensor(predictor.transform.apply_coords(points, array.shape[:2]))
    _, iou, low_res = predictor.predict_torch(coords[:, None], torch.ones(3, 1, dtype=torch.int), return_logits=True)
    ours = torch.as_tensor(to_input_frame(points, array.shape[:2], resized))
    with torch.no_grad():
        out = tiny_sam(
            image_embeddings=embeddings,
            input_points=ours[None, :, None],
            input_labels=torch.ones(1, 3, 1, dtype=torch.int),
        )
    torch.testing.assert_close(out.pred_masks[0], low_res, rtol=0, atol=1e-4)
    torch.testing.assert_close(out.iou_scores[0], iou, rtol=0, atol=1e-4)


@pytest.mark.parametrize("thresholds", [(0.0, 0.0, 1.0), (0.0, 0.0, 0.7), (0.5, 0.3, 0.7)])
def test_both_backends_propose_the_same_boxes_scores_and_masks(make_proposer, features, thresholds):
    iou, stability, nms = thresholds
    options = {"pred_iou_thresh": iou, "stability_score_thresh": stability, "box_nms_thresh": nms, "return_masks": True}
    ours = make_proposer(**options)(features)
    theirs = make_proposer(backend="segment-anything", **options)(features)
    for i in range(len(features.images)):
        torch.testing.assert_close(ours.boxes[i], theirs.boxes[i], rtol=0, atol=1e-6)
        torch.testing.assert_close(ours.scores[i], theirs.scores[i], rtol=0, atol=1e-4)
        torch.testing.assert_close(
            ours.extras["stability_score"][i], theirs.extras["stability_score"][i], rtol=0, atol=0
        )
        assert torch.equal(ours.extras["masks"][i], theirs.extras["masks"][i])
