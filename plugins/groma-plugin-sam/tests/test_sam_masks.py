"""The automatic mask generator's arithmetic: point grid, logit upscaling, stability score, boxes, filters, NMS.

transformers ships its own port of segment-anything's helpers (``image_processing_pil_sam``, importable without
torchvision); they serve as independent references here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from groma_plugin_sam import SamOptions
from groma_plugin_sam.generator import Candidates, Geometry, filter_candidates, select_masks
from groma_plugin_sam.masks import mask_boxes, point_grid, stability_score, upscale_logits
from transformers.models.sam import image_processing_pil_sam as hf_amg


@pytest.mark.parametrize("n", [1, 4, 32])
def test_point_grid_is_segment_anythings(n):
    grid = point_grid(n)
    assert grid.shape == (n * n, 2) and grid.dtype == np.float64
    np.testing.assert_array_equal(grid, hf_amg._build_point_grid(n))


def test_point_grid_centres_cells_with_x_fastest():
    assert point_grid(1).tolist() == [[0.5, 0.5]]
    assert point_grid(2).tolist() == [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]]


def test_stability_score_matches_the_reference_and_is_nan_when_empty():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 40, 50, generator=g) * 3
    logits[5] = -10.0  # empty at both thresholds
    ours = stability_score(logits, 0.0, 1.0)
    ref = hf_amg._compute_stability_score(logits, 0.0, 1.0)
    torch.testing.assert_close(ours[:5], ref[:5], rtol=0, atol=0)
    assert torch.isnan(ours[5]) and ours.dtype == torch.float32
    block = torch.full((1, 10, 10), -5.0)
    block[0, 2:6, 3:7] = 0.5  # above 0 and -1, below +1: the masks at +-1 share nothing
    assert stability_score(block, 0.0, 1.0).item() == 0.0
    block[0, 2:6, 3:7] = 5.0
    assert stability_score(block, 0.0, 1.0).item() == 1.0


def test_mask_boxes_are_inclusive_pixel_indices():
    masks = torch.zeros(3, 20, 30, dtype=torch.bool)
    masks[0, 4:9, 10:21] = True  # rows 4..8, columns 10..20
    masks[1, 0, 0] = True  # a single pixel: a zero-size box
    masks[2, 3:5, 2:4] = True
    masks[2, 15, 25] = True  # two blobs: one box around both
    assert mask_boxes(masks).tolist() == [[10, 4, 20, 8], [0, 0, 0, 0], [2, 3, 25, 15]]
    g = torch.Generator().manual_seed(1)
    random = torch.rand(8, 33, 17, generator=g) > 0.97
    random[:, 5, 5] = True
    assert torch.equal(mask_boxes(random), hf_amg._batched_mask_to_box(random))


def test_upscale_logits_is_sams_postprocessing():
    g = torch.Generator().manual_seed(2)
    low = torch.randn(5, 16, 16, generator=g)
    ours = upscale_logits(low, 64, (43, 64), (60, 90))
    processor = hf_amg.SamImageProcessorPil()
    ref = processor.post_process_masks(
        [low[None]], [(60, 90)], [(43, 64)], binarize=False, pad_size={"height": 64, "width": 64}
    )[0][0]
    assert ours.shape == (5, 60, 90)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def _rectangle_logits(boxes: list[tuple[int, int, int, int]], size: int = 16, inside: float = 6.0) -> torch.Tensor:
    """Low-resolution logits (N, size, size): ``inside`` within each (x1, y1, x2, y2) cell rectangle, -6 outside."""
    out = torch.full((len(boxes), size, size), -6.0)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        out[i, y1:y2, x1:x2] = inside
    return out


GEOMETRY = Geometry(input_size=64, resized=(64, 64), original=(64, 64))


def _candidates(low, iou, **options):
    opts = SamOptions(**{"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, **options})
    points = torch.zeros(low.shape[0], 2)
    return filter_candidates(low, torch.tensor(iou), points, GEOMETRY, opts), opts


def test_filters_keep_iou_strictly_above_and_stability_at_least_the_thresholds():
    low = _rectangle_logits([(2, 2, 8, 8)] * 4)
    low[3] = torch.where(low[3] > 0, torch.tensor(0.5), low[3])  # a weak mask: stability 0
    cands, _ = _candidates(low, [0.9, 0.88, 0.95, 0.99], pred_iou_thresh=0.88, stability_score_thresh=0.95)
    assert cands.predicted_iou.tolist() == pytest.approx([0.9, 0.95])
    assert torch.all(cands.stability_score >= 0.95)
    off, _ = _candidates(low, [0.9, 0.88, 0.95, 0.99])
    assert off.predicted_iou.numel() == 4  # thresholds of 0 filter nothing


def test_empty_masks_are_dropped():
    low = _rectangle_logits([(2, 2, 8, 8), (0, 0, 0, 0)])
    cands, _ = _candidates(low, [0.5, 0.9])
    assert cands.predicted_iou.tolist() == [0.5]


def test_boxes_follow_the_upscaled_masks():
    low = _rectangle_logits([(2, 3, 8, 12)])  # cells 2..7 x 3..11 of a 16-cell side -> pixels 8..31 x 12..47
    cands, _ = _candidates(low, [0.5])
    x1, y1, x2, y2 = cands.boxes[0].tolist()
    assert (x1, y1) == pytest.approx((8, 12), abs=1) and (x2, y2) == pytest.approx((31, 47), abs=1)


def test_nms_keeps_the_best_of_duplicates_and_distinct_masks_best_first():
    low = _rectangle_logits([(2, 2, 8, 8), (2, 2, 8, 9), (10, 10, 15, 15), (2, 2, 15, 15)])
    cands, opts = _candidates(low, [0.6, 0.8, 0.7, 0.2], box_nms_thresh=0.7)
    kept = select_masks(cands, GEOMETRY, opts, want_masks=True)
    assert kept.predicted_iou.tolist() == pytest.approx([0.8, 0.7, 0.2])  # 0.6 duplicates 0.8
    assert torch.equal(mask_boxes(kept.masks).float(), kept.boxes)
    all_kept = select_masks(cands, GEOMETRY, opts.model_copy(update={"box_nms_thresh": 1.0}), want_masks=False)
    assert all_kept.masks is None and all_kept.predicted_iou.numel() == 4


def test_candidates_concatenate_and_index():
    low = _rectangle_logits([(2, 2, 8, 8), (10, 10, 15, 15)])
    a, _ = _candidates(low, [0.5, 0.6])
    both = Candidates.cat([a, a])
    assert both.boxes.shape == (4, 4) and both[torch.tensor([3])].predicted_iou.tolist() == pytest.approx([0.6])
