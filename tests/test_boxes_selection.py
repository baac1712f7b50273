"""Box ops, NMS and region selection against brute-force definitions and the reference's rules."""

from __future__ import annotations

import pytest
import torch

from groma_core.boxes import box_iou, cxcywh_to_xyxy, nms, nms_with_threshold, xyxy_to_cxcywh
from groma_core.selection import SelectionConfig, select_regions
from groma_core.types import Proposals


def brute_nms(boxes, scores, thr):
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))  # Python's sort is stable
    keep = []
    for i in order:
        if all(float(box_iou(boxes[i : i + 1], boxes[j : j + 1])) <= thr for j in keep):
            keep.append(i)
    return keep


def random_boxes(n, seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 0.7
    wh = torch.rand(n, 2, generator=g) * 0.3 + 0.01
    return torch.cat([xy, xy + wh], 1), torch.rand(n, generator=g)


def test_conversions_round_trip():
    boxes, _ = random_boxes(50, 0)
    assert torch.allclose(cxcywh_to_xyxy(xyxy_to_cxcywh(boxes)), boxes, atol=1e-7)


def test_iou_of_known_boxes():
    a = torch.tensor([[0.0, 0.0, 0.5, 0.5]])
    b = torch.tensor([[0.25, 0.25, 0.75, 0.75], [0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 0.5, 0.5]])
    assert torch.allclose(box_iou(a, b), torch.tensor([[0.0625 / 0.4375, 0.0, 1.0]]))


def test_nms_matches_brute_force_on_random_sets():
    for seed in range(5):
        boxes, scores = random_boxes(80, seed)
        assert nms(boxes, scores, 0.6).tolist() == brute_nms(boxes, scores, 0.6)


def test_nms_ties_keep_input_order_and_threshold_is_strict():
    boxes = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [0.5, 0, 1.5, 1]], dtype=torch.float32)
    scores = torch.tensor([1.0, 1.0, 0.9])
    assert nms(boxes, scores, 0.99).tolist() == [0, 2]
    # IoU of box 0 and 2 is exactly 1/3: suppressed only when strictly above the threshold
    assert nms(boxes[[0, 2]], scores[[0, 2]], 1 / 3).tolist() == [0, 1]
    keep = nms_with_threshold(boxes, torch.tensor([0.15, 0.5, 0.16]), 0.99, 0.15, 10)
    assert keep.tolist() == [1, 2]  # 0.15 is not > 0.15


def test_selection_joins_user_boxes_caps_and_falls_back():
    boxes, scores = random_boxes(300, 3)
    user = torch.tensor([[0.1, 0.1, 0.3, 0.3], [0.6, 0.6, 0.9, 0.8]])
    cfg = SelectionConfig(max_regions=20)
    regions = select_regions(Proposals([boxes], [scores]), cfg, refer_boxes=[user])
    assert regions.boxes[0].shape[0] == 20
    assert torch.equal(regions.boxes[0][:2], user)  # score 1.0, stable order
    assert regions.refer_index[0].tolist() == [0, 1]
    assert torch.all(regions.scores[0][2:] > 0.15)
    low = select_regions(Proposals([boxes], [scores * 0.1]), SelectionConfig())
    assert regions.boxes[0].shape[0] and low.boxes[0].shape == (1, 4)
    assert torch.equal(low.boxes[0][0], boxes[scores.argmax()])


def test_user_box_suppresses_overlapping_proposals():
    prop = torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.6, 0.6, 0.9, 0.9]])
    user = torch.tensor([[0.11, 0.1, 0.5, 0.51]])
    regions = select_regions(Proposals([prop], [torch.tensor([0.9, 0.8])]), SelectionConfig(), refer_boxes=[user])
    assert torch.equal(regions.boxes[0], torch.cat([user, prop[1:]]))


def test_seeded_shuffle_is_reproducible_and_refer_index_follows():
    boxes, scores = random_boxes(100, 4)
    user = torch.tensor([[0.2, 0.2, 0.4, 0.4]])
    cfg = SelectionConfig(shuffle=True, seed=11)
    a = select_regions(Proposals([boxes], [scores]), cfg, refer_boxes=[user])
    b = select_regions(Proposals([boxes], [scores]), cfg, refer_boxes=[user])
    plain = select_regions(Proposals([boxes], [scores]), SelectionConfig(), refer_boxes=[user])
    assert torch.equal(a.boxes[0], b.boxes[0])
    assert not torch.equal(a.boxes[0], plain.boxes[0])
    assert torch.equal(a.boxes[0][a.refer_index[0][0]], user[0])


def test_left_to_right_orders_regions_by_centre_and_the_indices_follow():
    boxes, scores = random_boxes(100, 5)
    user = torch.tensor([[0.45, 0.2, 0.55, 0.4]])
    truth = torch.tensor([[0.0, 0.6, 0.1, 0.7]])  # the leftmost box of all: region 0
    cfg = SelectionConfig(left_to_right=True, max_regions=12)
    regions = select_regions(Proposals([boxes], [scores]), cfg, refer_boxes=[user], ground_boxes=[truth])
    plain = select_regions(Proposals([boxes], [scores]), SelectionConfig(max_regions=12), [user], [truth])
    picked = regions.boxes[0]
    centre_x = (picked[:, 0] + picked[:, 2]) / 2
    assert torch.all(centre_x[1:] >= centre_x[:-1])  # <r0> is the leftmost region, and so on
    assert sorted(map(tuple, picked.tolist())) == sorted(map(tuple, plain.boxes[0].tolist()))  # same regions
    assert torch.equal(picked[regions.refer_index[0][0]], user[0]) and regions.ground_index[0].tolist() == [0]
    kept = regions.source_index[0]
    assert torch.equal(picked[kept >= 0], boxes[kept[kept >= 0]])  # masks etc. still follow their proposals
    with pytest.raises(ValueError, match="left_to_right and shuffle"):
        SelectionConfig(left_to_right=True, shuffle=True)
