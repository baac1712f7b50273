"""Evaluation metrics: hand-computed cases; the wiring of pycocotools and pycocoevalcap (which compute them) checked
against their own loaders, lvis-api, and the PTB tokenizer."""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch

from groma_core.evaluation import (
    GroundingSample,
    caption_scores,
    clean_generated_caption,
    detection_metrics,
    lvis_ground_recall,
    pycocoevalcap_available,
    rec_accuracy,
    tokenize_caption,
)

# ------------------------------------------------------------------------------------------------------------------
# REC
# ------------------------------------------------------------------------------------------------------------------


def test_rec_perfect_predictions_score_one():
    gt = torch.tensor([[10.0, 20.0, 50.0, 80.0], [0.0, 0.0, 640.0, 480.0]])
    result = rec_accuracy(list(gt), gt)
    assert (result.accuracy, result.mean_iou, result.no_box_rate, result.count) == (1.0, 1.0, 0.0, 2)


def test_rec_no_boxes_are_wrong_with_iou_zero():
    gt = [[0.1, 0.1, 0.5, 0.5]] * 3
    result = rec_accuracy([None, np.zeros((0, 4)), torch.zeros(0, 4)], gt)
    assert (result.accuracy, result.mean_iou, result.no_box_rate) == (0.0, 0.0, 1.0)


def test_rec_partial_strict_threshold_first_box_and_missing():
    gt = [[0, 0, 10, 10]] * 5
    preds = [
        [0, 0, 10, 5],  # IoU exactly 0.5: wrong (strict >)
        [0, 0, 10, 6],  # IoU 0.6: correct
        None,  # no box
        [[20, 20, 30, 30], [0, 0, 10, 10]],  # only the first box of the answer counts: IoU 0
        [0, 0, 10, 10],  # IoU 1
    ]
    result = rec_accuracy(preds, gt)
    assert result.accuracy == pytest.approx(2 / 5)
    assert result.mean_iou == pytest.approx((0.5 + 0.6 + 0 + 0 + 1) / 5)
    assert result.no_box_rate == pytest.approx(1 / 5)
    assert rec_accuracy(preds, gt, iou_threshold=0.49).accuracy == pytest.approx(3 / 5)


def test_rec_normalized_boxes_at_image_borders_and_best_gt():
    gt = [[0.0, 0.0, 1.0, 1.0], [0.5, 0.0, 1.0, 1.0], [[0.0, 0.0, 0.2, 0.2], [0.8, 0.8, 1.0, 1.0]]]
    preds = [[0.5, 0.0, 1.0, 1.0], [0.5, 0.0, 1.0, 0.75], [0.8, 0.8, 1.0, 1.0]]
    result = rec_accuracy(preds, gt)
    assert result.accuracy == pytest.approx(2 / 3)  # 0.5 (wrong), 0.75 and 1.0 (best of the two gt boxes)
    assert result.mean_iou == pytest.approx((0.5 + 0.75 + 1.0) / 3)


def test_rec_rejects_bad_input():
    with pytest.raises(ValueError, match="pred_boxes has 1 samples but gt_boxes has 2"):
        rec_accuracy([None], [[0, 0, 1, 1]] * 2)
    with pytest.raises(ValueError, match="no samples"):
        rec_accuracy([], [])
    with pytest.raises(ValueError, match=r"pred_boxes\[0\]: expected boxes of shape \(N, 4\), got \(3,\)"):
        rec_accuracy([[0, 0, 1]], [[0, 0, 1, 1]])


# ------------------------------------------------------------------------------------------------------------------
# Random data and the COCO json the standard tools read
# ------------------------------------------------------------------------------------------------------------------


def _random_boxes(rng: np.random.Generator, n: int, scale: float) -> np.ndarray:
    xy = rng.uniform(0, 400, (n, 2))
    return np.concatenate([xy, xy + rng.uniform(2, scale, (n, 2))], axis=1)


def _near(rng: np.random.Generator, gt: np.ndarray, preds: np.ndarray) -> np.ndarray:
    """Predictions whose first rows are jittered copies of ground-truth boxes (so that matches happen)."""
    m = min(len(gt), len(preds))
    preds = preds.copy()
    if m:
        preds[:m] = gt[rng.integers(0, len(gt), m)] + rng.normal(0, rng.choice([1, 5, 15]), (m, 4))
    return preds


def _xywh(box) -> list[float]:
    return [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]


def _coco_json(images):
    """COCO-format ground truth and results from (image_id, category_id, gt_boxes, gt_areas, preds, scores) or
    (..., scores, gt_crowd) tuples."""
    gt = {"images": [], "annotations": [], "categories": []}
    results = []
    seen_images, seen_cats = set(), set()
    for image_id, cat, gt_boxes, gt_areas, preds, scores, *crowd in images:
        crowd_flags = crowd[0] if crowd and crowd[0] is not None else [0] * len(gt_boxes)
        if image_id not in seen_images:
            seen_images.add(image_id)
            gt["images"].append(
                {"id": image_id, "width": 640, "height": 480, "neg_category_ids": [], "not_exhaustive_category_ids": []}
            )
        if cat not in seen_cats:
            seen_cats.add(cat)
            gt["categories"].append({"id": cat, "name": f"c{cat}", "frequency": "f"})
        for box, area, is_crowd in zip(gt_boxes, gt_areas, crowd_flags):
            gt["annotations"].append(
                {
                    "id": len(gt["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": cat,
                    "bbox": _xywh(box),
                    "area": float(area),
                    "iscrowd": int(is_crowd),
                }
            )
        for box, score in zip(preds, scores):
            results.append({"image_id": image_id, "category_id": cat, "bbox": _xywh(box), "score": float(score)})
    return gt, results


def _cocoeval(gt_json, results, max_dets, summarize=True):
    coco_mod = pytest.importorskip("pycocotools.coco")
    cocoeval_mod = pytest.importorskip("pycocotools.cocoeval")
    with contextlib.redirect_stdout(io.StringIO()):
        gt = coco_mod.COCO()
        gt.dataset = gt_json
        gt.createIndex()
        evaluator = cocoeval_mod.COCOeval(gt, gt.loadRes(results), "bbox")
        evaluator.params.maxDets = list(max_dets)
        evaluator.evaluate()
        evaluator.accumulate()
        if summarize:
            evaluator.summarize()
    return evaluator


# ------------------------------------------------------------------------------------------------------------------
# Class-agnostic detection
# ------------------------------------------------------------------------------------------------------------------


def _box_area(boxes):
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _pycocotools_detection(preds, scores, gts, max_dets=(1, 10, 100), gt_crowd=None) -> np.ndarray:
    """pycocotools' twelve numbers, compared with atol 1e-6: both sides compute IoUs in float64 and divide the same
    integer counts, so only the order of the final sums differs (a wrong match moves a number by 1e-3 or more)."""
    crowd = gt_crowd or [None] * len(gts)
    gt_json, results = _coco_json(
        [(i + 1, 1, g, _box_area(g), p, s, c) for i, (p, s, g, c) in enumerate(zip(preds, scores, gts, crowd))]
    )
    evaluator = _cocoeval(gt_json, results, max_dets)
    stats = evaluator.stats.copy()
    # COCOeval.summarize reads the first AP at maxDets=100 whatever maxDets holds: take it from the precision array
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    stats[0] = np.mean(precision[precision > -1]) if (precision > -1).any() else -1.0
    return stats


def test_detection_perfect_empty_and_no_ground_truth():
    gts = [np.array([[0, 0, 640, 480], [10, 10, 20, 20]]), np.array([[100, 100, 200, 150]])]
    perfect = detection_metrics(gts, [np.array([0.9, 0.8]), np.array([0.7])], gts)
    assert (perfect.ap, perfect.ap50, perfect.ap75) == pytest.approx((1.0, 1.0, 1.0))
    assert perfect.ar == pytest.approx((2 / 3, 1.0, 1.0))  # one detection per image finds 2 of the 3 boxes
    assert (perfect.ap_small, perfect.ap_medium, perfect.ap_large) == pytest.approx((1.0, 1.0, 1.0))
    empty = detection_metrics([np.zeros((0, 4))] * 2, [[], []], gts)
    assert empty.as_dict() == {k: 0.0 for k in empty.as_dict()}
    no_gt = detection_metrics([np.array([[0, 0, 5, 5]])], [[0.5]], [np.zeros((0, 4))])
    assert set(no_gt.as_dict().values()) == {-1.0}


def test_detection_false_positive_on_image_without_ground_truth():
    gts = [np.array([[0, 0, 100, 100]]), np.zeros((0, 4))]
    preds = [np.array([[0, 0, 100, 100]]), np.array([[0, 0, 50, 50]])]
    scores = [np.array([0.9]), np.array([0.95])]
    result = detection_metrics(preds, scores, gts)
    # ranked: FP (0.95) then TP (0.9): precision [0, 0.5], interpolated to 0.5 at every recall point
    assert result.ap == pytest.approx(0.5)
    assert result.ar == (1.0, 1.0, 1.0)
    np.testing.assert_allclose(list(result.as_dict().values()), _pycocotools_detection(preds, scores, gts), atol=1e-6)


def test_detection_exact_iou_thresholds_at_image_borders():
    gts = [np.array([[0, 0, 100, 100]]), np.array([[540, 380, 640, 480]])]
    preds = [np.array([[0, 0, 100, 50]]), np.array([[540, 380, 640, 455]])]  # IoU exactly 0.5 and 0.75
    scores = [np.array([0.5]), np.array([0.5])]
    result = detection_metrics(preds, scores, gts)
    assert result.ap50 == pytest.approx(1.0)
    # at 0.75 the tie in score ranks image 1's miss first: precision 0.5 up to recall 0.5 (51 of 101 points)
    assert result.ap75 == pytest.approx(0.5 * 51 / 101)
    assert result.ar[-1] == pytest.approx((1 + 5 * 0.5) / 10)  # both found at 0.50, one at 0.55..0.75, none above
    np.testing.assert_allclose(list(result.as_dict().values()), _pycocotools_detection(preds, scores, gts), atol=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_detection_equals_pycocotools_on_random_sets(seed):
    rng = np.random.default_rng(seed)
    gts, preds, scores = [], [], []
    for _ in range(int(rng.integers(2, 9))):
        gt = _random_boxes(rng, int(rng.integers(0, 6)), float(rng.choice([20, 60, 200])))
        pred = _near(rng, gt, _random_boxes(rng, int(rng.integers(0, 15)), 300))
        score = rng.uniform(0, 1, len(pred))
        gts.append(gt)
        preds.append(pred)
        scores.append(np.round(score, 1) if seed % 2 else score)  # rounded scores: ties within and across images
    preds[0] = _random_boxes(rng, 3, 100)  # at least one prediction (pycocotools cannot load an empty result list)
    scores[0] = np.array([0.3, 0.3, 0.9])
    max_dets = (1, 3, 10) if seed == 5 else (1, 10, 100)
    mine = detection_metrics(preds, scores, gts, max_dets=max_dets)
    np.testing.assert_allclose(
        list(mine.as_dict().values()), _pycocotools_detection(preds, scores, gts, max_dets), atol=1e-6
    )


def test_detection_crowd_regions_absorb_detections_without_counting():
    # image 1: an object and a crowd region (a group of people, say); image 2: the crowd region alone
    gts = [np.array([[0, 0, 100, 100], [200, 200, 400, 400]]), np.array([[0, 0, 300, 300]])]
    crowd = [[False, True], [True]]
    preds = [
        # inside the crowd region (IoU 0.05 by the usual formula, but inside it: intersection over own area is 1),
        # twice: a crowd region absorbs any number of detections; then the object, ranked last
        np.array([[220, 220, 260, 260], [300, 300, 390, 390], [0, 0, 100, 100]]),
        np.array([[10, 10, 60, 60]]),
    ]
    scores = [np.array([0.9, 0.8, 0.5]), np.array([0.95])]
    result = detection_metrics(preds, scores, gts, gt_crowd=crowd)
    # only the object counts: found by the one detection that is not ignored, at every threshold
    assert (result.ap, result.ar[-1]) == (pytest.approx(1.0), pytest.approx(1.0))
    assert result.ap_small == -1.0 and result.ap_large == pytest.approx(1.0)  # crowd boxes are no ground truth
    # without the flags the crowd boxes are objects missed and the detections in them false positives
    plain = detection_metrics(preds, scores, gts)
    assert plain.ap < 0.5 and plain.ar[-1] == pytest.approx(1 / 3)
    np.testing.assert_allclose(
        list(result.as_dict().values()), _pycocotools_detection(preds, scores, gts, gt_crowd=crowd), atol=1e-6
    )


@pytest.mark.parametrize("seed", range(6))
def test_detection_with_crowd_regions_equals_pycocotools(seed):
    rng = np.random.default_rng(100 + seed)
    gts, preds, scores, crowd = [], [], [], []
    for _ in range(int(rng.integers(2, 7))):
        gt = _random_boxes(rng, int(rng.integers(1, 6)), float(rng.choice([20, 60, 200])))
        flags = rng.uniform(size=len(gt)) < 0.35
        pred = _near(rng, gt, _random_boxes(rng, int(rng.integers(1, 12)), 300))
        # detections shrunk inside the crowd regions: matched to them only through intersection over own area
        inside = gt[flags] * 0.8 + gt[flags][:, [2, 3, 0, 1]] * 0.2
        gts.append(gt)
        crowd.append(flags)
        preds.append(np.concatenate([pred, inside]))
        scores.append(rng.uniform(0, 1, len(pred) + len(inside)))
    mine = detection_metrics(preds, scores, gts, gt_crowd=crowd)
    expected = _pycocotools_detection(preds, scores, gts, gt_crowd=[list(c) for c in crowd])
    np.testing.assert_allclose(list(mine.as_dict().values()), expected, atol=1e-6)


def test_detection_rejects_bad_input():
    with pytest.raises(ValueError, match="one entry per image"):
        detection_metrics([np.zeros((0, 4))], [[], []], [np.zeros((0, 4))])
    with pytest.raises(ValueError, match=r"pred_scores\[0\]: expected 2 values"):
        detection_metrics([np.zeros((2, 4))], [[0.1]], [np.zeros((0, 4))])
    with pytest.raises(ValueError, match=r"gt_crowd\[0\]: expected 1 values"):
        detection_metrics([np.zeros((0, 4))], [[]], [[[0, 0, 1, 1]]], gt_crowd=[[True, False]])


# ------------------------------------------------------------------------------------------------------------------
# LVIS-Ground (AS-MANY)
# ------------------------------------------------------------------------------------------------------------------

SMALL_AND_LARGE = np.array([[0, 0, 10, 10], [0, 0, 200, 200]], dtype=float)  # areas 100 (small), 40000 (large)


def test_lvis_ground_hand_computed_as_many():
    preds = [[0, 0, 10, 10], [0, 0, 200, 100], [0, 0, 200, 200]]  # IoU 1 (small), 0.5 (large), 1 (large)
    result = lvis_ground_recall([GroundingSample(1, 7, preds, SMALL_AND_LARGE)])
    # AS-MANY keeps 2 boxes: small found at every threshold, large only at 0.5
    assert result.ar == pytest.approx((1 + 9 * 0.5) / 10)
    assert (result.ar50, result.ar75) == (pytest.approx(1.0), pytest.approx(0.5))
    assert result.ar_small == pytest.approx(1.0)
    assert result.ar_large == pytest.approx(0.1)
    assert result.ar_medium == -1.0  # no medium ground truth
    everything = lvis_ground_recall([GroundingSample(1, 7, preds, SMALL_AND_LARGE)], as_many=False)
    assert everything.ar == pytest.approx(1.0)  # the third box finds the large one above 0.5


def test_lvis_ground_categories_averaged_missing_answers_and_single_match():
    samples = [
        GroundingSample(1, 7, [[0, 0, 10, 10], [0, 0, 200, 100]], SMALL_AND_LARGE),
        GroundingSample(2, 8, np.zeros((0, 4)), [[600, 400, 640, 480]]),  # no box answered, at the image border
    ]
    assert lvis_ground_recall(samples).ar == pytest.approx((0.55 + 0.0) / 2)
    twice = [GroundingSample(1, 7, [[0, 0, 10, 10]] * 2, [[0, 0, 10, 10], [500, 500, 600, 600]])]
    assert lvis_ground_recall(twice, as_many=False).ar == pytest.approx(0.5)  # a gt box is matched once


def test_lvis_ground_areas_and_per_image_cap():
    box = [[0, 0, 200, 200]]
    given = lvis_ground_recall([GroundingSample(1, 1, box, box, gt_areas=[500.0])])  # segmentation area: small
    assert (given.ar_small, given.ar_large) == (1.0, -1.0)
    capped = [GroundingSample(1, 1, box, box), GroundingSample(1, 2, box, box)]
    assert lvis_ground_recall(capped, max_dets_per_image=1).ar == pytest.approx(0.5)


def test_lvis_ground_rejects_bad_input():
    with pytest.raises(ValueError, match="appear twice"):
        lvis_ground_recall([GroundingSample(1, 1, [], [[0, 0, 1, 1]])] * 2)
    with pytest.raises(ValueError, match="at least one ground-truth box"):
        lvis_ground_recall([GroundingSample(1, 1, [], np.zeros((0, 4)))])


def _random_grounding(seed: int) -> list[GroundingSample]:
    rng = np.random.default_rng(seed)
    samples = []
    for image_id in range(1, int(rng.integers(3, 7))):
        for cat in rng.choice(np.arange(1, 6), int(rng.integers(1, 4)), replace=False):
            gt = _random_boxes(rng, int(rng.integers(1, 5)), float(rng.choice([20, 60, 200])))
            pred = _near(rng, gt, _random_boxes(rng, int(rng.integers(0, 8)), 300))
            areas = _box_area(gt) * rng.uniform(0.3, 1.0, len(gt)) if seed % 2 else None
            samples.append(GroundingSample(image_id, int(cat), pred, gt, areas))
    return samples


def _lvis_json(samples):
    return _coco_json(
        [
            (
                s.image_id,
                s.category_id,
                s.gt_boxes,
                _box_area(s.gt_boxes) if s.gt_areas is None else s.gt_areas,
                np.asarray(s.pred_boxes)[: len(s.gt_boxes)],
                [1.0] * min(len(s.pred_boxes), len(s.gt_boxes)),
            )
            for s in samples
        ]
    )


@pytest.mark.parametrize("seed", range(4))
def test_lvis_ground_recall_equals_pycocotools_recall(seed):
    """COCOeval's per-category recall (maxDets 300, same area ranges) is LVISEval's recall for positive queries."""
    samples = _random_grounding(seed)
    evaluator = _cocoeval(*_lvis_json(samples), max_dets=(300,), summarize=False)
    recall = evaluator.eval["recall"][:, :, :, 0]  # (T, K, A)

    def mean(values):
        return float(np.mean(values[values > -1])) if (values > -1).any() else -1.0

    expected = [
        mean(recall[:, :, 0]),
        mean(recall[0, :, 0]),
        mean(recall[5, :, 0]),
        mean(recall[:, :, 1]),
        mean(recall[:, :, 2]),
        mean(recall[:, :, 3]),
    ]
    np.testing.assert_allclose(list(lvis_ground_recall(samples).as_dict().values()), expected, atol=1e-6)


@pytest.mark.parametrize("seed", range(2))
def test_lvis_ground_recall_equals_lvis_api(seed, tmp_path, monkeypatch):
    lvis = pytest.importorskip("lvis")
    monkeypatch.setattr(np, "float", float, raising=False)  # lvis 0.5.3 still uses the alias numpy 1.24 removed
    samples = _random_grounding(seed)
    gt_json, results = _lvis_json(samples)
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt_json))
    gt = lvis.LVIS(str(path))
    evaluator = lvis.LVISEval(gt, lvis.LVISResults(gt, results), "bbox")
    evaluator.run()
    expected = [
        evaluator.results["AR@300"],
        evaluator._summarize("ar", iou_thr=0.5),
        evaluator._summarize("ar", iou_thr=0.75),
        evaluator.results["ARs@300"],
        evaluator.results["ARm@300"],
        evaluator.results["ARl@300"],
    ]
    np.testing.assert_allclose(list(lvis_ground_recall(samples).as_dict().values()), expected, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------------
# Region captioning
# ------------------------------------------------------------------------------------------------------------------


def test_clean_generated_caption_as_reference_scripts():
    assert clean_generated_caption("'A man in <p>a red</p>  shirt.'  ") == "A man in a red shirt."
    assert clean_generated_caption("a dog\nrunning") == "a dogrunning"  # the reference drops newlines outright


def _python_scores(res: dict, gts: dict):
    """caption_scores without Java on captions the tokenizer leaves as they are (lowercase words)."""
    return caption_scores(res, gts, backend="python")


def test_bleu_rouge_cider_hand_computed():
    scores = _python_scores({1: "a b c d"}, {1: ["a b x y z"]})
    assert scores.bleu[0] == pytest.approx(0.5 * math.exp(1 - 5 / 4))  # 2 of 4 unigrams, brevity penalty 4 vs 5 words
    assert scores.bleu[1] == pytest.approx(math.sqrt(0.5 * 1 / 3) * math.exp(1 - 5 / 4))
    # LCS 3 of 4 predicted and 5 reference words, beta 1.2
    rouge = _python_scores({1: "a b c d"}, {1: ["a x c d e"]}).rouge_l
    assert rouge == pytest.approx(2.44 * 0.75 * 0.6 / (0.6 + 1.44 * 0.75))
    perfect = {1: "a man riding a horse", 2: "two red cars on the street"}
    refs = {k: [v, "something else entirely here"] for k, v in perfect.items()}
    scores = _python_scores(perfect, refs)
    assert scores.rouge_l == pytest.approx(1.0)
    assert all(b == pytest.approx(1.0) for b in scores.bleu)
    # idf is log(2 images / df); each prediction equals one of its two references: cosine 1 and 0 -> 10 * 1 / 2
    assert scores.cider == pytest.approx(5.0)
    assert _python_scores({1: "a b c d"}, {1: ["a b c d"]}).cider == 0.0  # a single image: every idf is log(1) = 0
    nothing = _python_scores({1: ""}, {1: ["a b"]})
    assert nothing.rouge_l == 0.0
    assert nothing.bleu[0] == pytest.approx(0.0, abs=1e-12)
    assert _python_scores({1: "", 2: "two red cars on the street"}, refs).cider == pytest.approx(2.5)


#: Caption-like sentences on which the pure-Python tokenizer equals the PTB tokenizer (checked below when Java runs).
TOKENIZER_CASES = {
    "Man wearing a white shirt.": "man wearing a white shirt",
    "The woman on the left, in a red coat.": "the woman on the left in a red coat",
    "A dog's head": "a dog 's head",
    "the dogs' bowls": "the dogs bowls",
    "cup of coffee; saucer": "cup of coffee saucer",
    'A sign that reads "ONE WAY".': "a sign that reads one way",
    "a clock showing 10:30": "a clock showing 10:30",
    "there are 1,000 birds": "there are 1,000 birds",
    "The man isn't smiling, he's serious.": "the man is n't smiling he 's serious",
    "They're playing frisbee (outdoors)": "they 're playing frisbee -lrb- outdoors -rrb-",
    "a $5 bill at 50% off [sale]": "a $ 5 bill at 50 % off -lsb- sale -rsb-",
    "we'll see what you've got, I'm sure": "we 'll see what you 've got i 'm sure",
    "the boy can't reach and won't try": "the boy ca n't reach and wo n't try",
    "a t-shirt -- black": "a t-shirt black",
    "a plate: pizza and fries": "a plate pizza and fries",
    "is this a cat? what a view!": "is this a cat what a view",
    "sign that says 'stop'": "sign that says stop",
    "He is in the U.S. Today, mr. smith and dr. who": "he is in the u.s. today mr. smith and dr. who",
    "A man. A woman": "a man a woman",
    "window of a building...": "window of a building",
    "wait!!! what??": "wait !!! what ??",
    "cannot gonna": "can not gon na",
    "it is 5. the '90s, the A&W sign": "it is 5 the '90s the a&w sign",
    "a    man   with extra spaces": "a man with extra spaces",
    "": "",
}


def test_tokenize_caption_hand_expected():
    for text, expected in TOKENIZER_CASES.items():
        assert tokenize_caption(text) == expected, text


@pytest.mark.skipif(not pycocoevalcap_available(), reason="needs pycocoevalcap and Java")
def test_tokenize_caption_equals_ptb_tokenizer():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    texts = list(TOKENIZER_CASES)
    ptb = PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(texts)})
    assert [tokenize_caption(t) for t in texts] == [ptb[i][0] for i in range(len(texts))]


CAPTION_PREDICTIONS = {
    1: "A man wearing a white shirt.",
    2: "the red car on the left",
    3: "A dog's head",
    4: "",
    5: "two people sitting at a table, eating",
    6: "a clock showing 10:30",
}
CAPTION_REFERENCES = {
    1: ["man in a white shirt", "A man wearing a white T-shirt."],
    2: ["red car parked on the street"],
    3: ["the head of a dog", "dog's head", "brown dog"],
    4: ["a window"],
    5: ["Two people eating at a table.", "people at a dinner table"],
    6: ["clock on the tower", "a clock showing the time 10:30"],
    7: ["an id that has no prediction is not scored"],
}


@pytest.fixture(scope="module")
def cocoeval_scores():
    if not pycocoevalcap_available():
        pytest.skip("needs pycocoevalcap and Java")
    return caption_scores(CAPTION_PREDICTIONS, CAPTION_REFERENCES, backend="pycocoevalcap")


def test_caption_scores_python_backend_equals_pycocoevalcap(cocoeval_scores):
    python = caption_scores(CAPTION_PREDICTIONS, CAPTION_REFERENCES, backend="python")
    assert (python.backend, python.meteor, python.count) == ("python", None, 6)
    assert "METEOR" not in python.as_dict()
    np.testing.assert_allclose(python.bleu, cocoeval_scores.bleu, atol=1e-9)
    assert python.rouge_l == pytest.approx(cocoeval_scores.rouge_l, abs=1e-9)
    assert python.cider == pytest.approx(cocoeval_scores.cider, abs=1e-9)


def test_caption_scores_meteor_runs_offline(cocoeval_scores):
    assert cocoeval_scores.backend == "pycocoevalcap"
    assert 0.0 < cocoeval_scores.meteor < 1.0
    assert set(cocoeval_scores.as_dict()) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}


def test_caption_scores_rejects_bad_input():
    with pytest.raises(ValueError, match=r"no reference captions for prediction ids \[2\]"):
        caption_scores({1: "a", 2: "b"}, {1: ["a"]})
    with pytest.raises(ValueError, match="no predictions"):
        caption_scores({}, {1: ["a"]})
    with pytest.raises(ValueError, match="backend must be"):
        caption_scores({1: "a"}, {1: ["a"]}, backend="java")
