"""Metrics of Groma's evaluations: REC accuracy, LVIS-Ground AS-MANY recall, class-agnostic COCO-style detection
AP/AR and region-caption scores (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D).

Boxes are xyxy. REC only needs consistent units; the LVIS-Ground and detection metrics need pixels of the original
image, because their small/medium/large ranges are areas in pixels (< 32², 32²..96², > 96²).
"""

from __future__ import annotations

import math
import re
import shutil
from collections import Counter, defaultdict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from groma_core.boxes import box_iou

BoxesLike = Tensor | np.ndarray | Sequence[Sequence[float]]
BoxLike = Tensor | np.ndarray | Sequence[float]

#: COCO/LVIS IoU thresholds 0.50:0.05:0.95 (built as their APIs build them, so that ties compare identically).
IOU_THRESHOLDS: np.ndarray = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
#: COCO/LVIS recall points 0:0.01:1 at which precision is interpolated.
RECALL_THRESHOLDS: np.ndarray = np.linspace(0.0, 1.0, int(np.round((1.0 - 0.0) / 0.01)) + 1, endpoint=True)
#: COCO/LVIS area ranges in pixels², bounds inclusive on both sides (an area of exactly 32² is small and medium).
AREA_RANGES: dict[str, tuple[float, float]] = {
    "all": (0.0, 1e5**2),
    "small": (0.0, 32.0**2),
    "medium": (32.0**2, 96.0**2),
    "large": (96.0**2, 1e5**2),
}


# ----------------------------------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------------------------------


def _as_boxes(boxes: BoxesLike, what: str) -> np.ndarray:
    """(N, 4) float64 array of boxes; an empty input gives (0, 4)."""
    if isinstance(boxes, Tensor):
        array = boxes.detach().to("cpu", torch.float64).numpy()
    else:
        array = np.asarray(boxes, dtype=np.float64)
    if array.size == 0:
        return np.zeros((0, 4), dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"{what}: expected boxes of shape (N, 4), got {tuple(array.shape)}")
    if not np.isfinite(array).all():
        raise ValueError(f"{what}: boxes must be finite, got {array.tolist()}")
    return array


def _as_values(values: Sequence[float] | np.ndarray | Tensor, count: int, what: str) -> np.ndarray:
    """(count,) float64 array."""
    if isinstance(values, Tensor):
        array = values.detach().to("cpu", torch.float64).numpy().reshape(-1)
    else:
        array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.shape[0] != count:
        raise ValueError(f"{what}: expected {count} values (one per box), got {array.shape[0]}")
    return array


def _box_areas(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


# ----------------------------------------------------------------------------------------------------------------
# REC
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecResult:
    """REC scores over a dataset (as printed by the reference's ``eval_rec.py``)."""

    accuracy: float  #: share of samples whose predicted box has IoU > threshold with the ground truth
    mean_iou: float  #: mean IoU over all samples; a sample without a box counts as IoU 0
    no_box_rate: float  #: share of samples whose answer had no box
    count: int  #: number of samples

    def as_dict(self) -> dict[str, float]:
        """The scores as a flat dict."""
        return {
            "accuracy": self.accuracy,
            "mean_iou": self.mean_iou,
            "no_box_rate": self.no_box_rate,
            "count": float(self.count),
        }


def _rec_boxes(boxes: BoxLike | BoxesLike, what: str) -> Tensor:
    """(N, 4) float64 tensor from one box of 4 values or (N, 4) boxes."""
    if isinstance(boxes, Tensor):
        array = boxes.detach().to("cpu", torch.float64).numpy()
    else:
        array = np.asarray(boxes, dtype=np.float64)
    return torch.from_numpy(_as_boxes(array[None] if array.shape == (4,) else array, what))


def rec_accuracy(
    pred_boxes: Sequence[BoxLike | BoxesLike | None],
    gt_boxes: Sequence[BoxLike | BoxesLike] | Tensor,
    iou_threshold: float = 0.5,
) -> RecResult:
    """REC accuracy: a sample is correct when the IoU of its predicted box with the ground truth is strictly greater
    than ``iou_threshold``. A prediction is None or an empty (0, 4) array (no box: wrong, IoU 0), one box, or
    (N, 4) boxes of which the first is scored (as ``eval_rec.py`` scores the first box of the answer); a ground truth
    of several boxes scores the best of them. Boxes are xyxy in any one unit (pixels or normalized); a pair whose
    union is empty has IoU 0."""
    if len(pred_boxes) != len(gt_boxes):
        raise ValueError(f"rec_accuracy: pred_boxes has {len(pred_boxes)} samples but gt_boxes has {len(gt_boxes)}")
    if len(gt_boxes) == 0:
        raise ValueError("rec_accuracy: no samples to score")
    correct = 0
    iou_sum = 0.0
    missing = 0
    for index, (pred, gt) in enumerate(zip(pred_boxes, gt_boxes)):
        gt_array = _rec_boxes(gt, f"gt_boxes[{index}]")
        if gt_array.shape[0] == 0:
            raise ValueError(f"gt_boxes[{index}]: a REC sample needs a ground-truth box")
        box = None if pred is None else _rec_boxes(pred, f"pred_boxes[{index}]")[:1]
        if box is None or box.shape[0] == 0:
            missing += 1
            continue
        iou = float(torch.nan_to_num(box_iou(box, gt_array), nan=0.0).max())
        iou_sum += iou
        correct += iou > iou_threshold
    count = len(gt_boxes)
    return RecResult(accuracy=correct / count, mean_iou=iou_sum / count, no_box_rate=missing / count, count=count)


# ----------------------------------------------------------------------------------------------------------------
# phrase grounding of grounded captions (Flickr30k-Entities style)
# ----------------------------------------------------------------------------------------------------------------

PHRASE_STOPWORDS = frozenset(
    "a an the one two three four five six seven eight nine ten some several many".split()
)  # articles and counts: "two red squares" and "a red square" name the same thing


def phrase_key(phrase: str, ignore: frozenset[str] | set[str] = frozenset()) -> frozenset[str]:
    """What a phrase names, for matching: its lowercase words without punctuation, :data:`PHRASE_STOPWORDS` and
    ``ignore``, plural ``-s``/``-es`` folded (``"Two red squares"`` -> ``{red, square}``)."""
    words = re.findall(r"[a-z0-9]+", phrase.lower())
    out = set()
    for w in words:
        if w in PHRASE_STOPWORDS or w in ignore:
            continue
        if len(w) > 3 and w.endswith("ses"):
            w = w[:-1]  # ellipses -> ellipse
        elif len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
            w = w[:-1]
        out.add(w)
    return frozenset(out)


@dataclass(frozen=True)
class PhraseGroundingResult:
    """Phrase grounding of grounded captions at one IoU threshold."""

    precision: float  #: share of predicted phrases (with a box) that match a ground-truth phrase on one of its boxes
    recall: float  #: share of ground-truth boxes found by a matching predicted phrase
    f1: float
    predicted_phrases: int
    ground_truth_boxes: int

    def as_dict(self) -> dict[str, float]:
        return {
            "phrase_precision": self.precision,
            "phrase_recall": self.recall,
            "phrase_f1": self.f1,
            "predicted_phrases": float(self.predicted_phrases),
            "ground_truth_boxes": float(self.ground_truth_boxes),
        }


def phrase_grounding(
    predictions: Sequence[Sequence[tuple[str, BoxesLike]]],
    references: Sequence[Sequence[tuple[str, BoxesLike]]],
    iou_threshold: float = 0.5,
    ignore_words: frozenset[str] | set[str] = frozenset(),
) -> PhraseGroundingResult:
    """Precision and recall of the phrases of grounded captions, per image: ``predictions[i]`` and
    ``references[i]`` list (phrase, boxes xyxy) of image i. A predicted phrase is right when its :func:`phrase_key`
    equals that of a ground-truth phrase of the image and one of its boxes has IoU >= ``iou_threshold`` with one of
    that phrase's boxes; a ground-truth box is recalled when a predicted phrase of the same key has a box on it. A
    predicted phrase without a box, or naming nothing, counts as wrong."""
    if len(predictions) != len(references):
        raise ValueError(f"phrase_grounding: {len(predictions)} predictions for {len(references)} images")
    right = predicted = recalled = total = 0
    for index, (pred, ref) in enumerate(zip(predictions, references)):
        truth: dict[frozenset[str], list[np.ndarray]] = {}
        for phrase, boxes in ref:
            truth.setdefault(phrase_key(phrase, ignore_words), []).append(_as_boxes(boxes, f"references[{index}]"))
        found: dict[frozenset[str], set[int]] = {}
        for phrase, boxes in pred:
            predicted += 1
            key = phrase_key(phrase, ignore_words)
            mine = _as_boxes(boxes, f"predictions[{index}]")
            if not key or key not in truth or not len(mine):
                continue
            gt = np.concatenate(truth[key])
            iou = _pairwise_iou(mine, gt, np.zeros(len(gt), dtype=bool))
            hits = set(np.nonzero((iou >= iou_threshold).any(axis=0))[0].tolist())
            right += bool(hits)
            found.setdefault(key, set()).update(hits)
        for key, groups in truth.items():
            count = sum(len(g) for g in groups)
            total += count
            recalled += len(found.get(key, ()))
    precision = right / predicted if predicted else 0.0
    recall = recalled / total if total else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return PhraseGroundingResult(precision, recall, f1, predicted, total)


# ----------------------------------------------------------------------------------------------------------------
# COCO/LVIS matching and accumulation (shared by the LVIS-Ground and detection metrics)
# ----------------------------------------------------------------------------------------------------------------


def _pairwise_iou(dt: np.ndarray, gt: np.ndarray, gt_crowd: np.ndarray) -> np.ndarray:
    """(D, G) IoU of xyxy boxes in float64 as the COCO mask API computes box IoU (zero without a positive overlap);
    against a crowd box the "union" is the detection's own area, so a detection inside a crowd region has IoU 1."""
    w = np.minimum(dt[:, None, 2], gt[None, :, 2]) - np.maximum(dt[:, None, 0], gt[None, :, 0])
    h = np.minimum(dt[:, None, 3], gt[None, :, 3]) - np.maximum(dt[:, None, 1], gt[None, :, 1])
    overlap = (w > 0) & (h > 0)
    inter = np.where(overlap, w * h, 0.0)
    dt_areas = _box_areas(dt)[:, None]
    union = np.where(gt_crowd[None, :], dt_areas, dt_areas + _box_areas(gt)[None, :] - inter)
    return np.divide(inter, union, out=np.zeros_like(inter), where=overlap)


@dataclass
class _Group:
    """Detections and ground truth of one (image, category); detections sorted by score (stable), truncated."""

    category: Hashable
    dt_scores: np.ndarray  # (D,)
    dt_areas: np.ndarray  # (D,)
    gt_areas: np.ndarray  # (G,)
    gt_crowd: np.ndarray  # (G,) bool: crowd regions, never counted, matched by any number of detections
    ious: np.ndarray  # (D, G)


@dataclass
class _GroupMatch:
    """Matches of one group for one area range: per threshold, which detections matched and which are ignored."""

    dt_scores: np.ndarray  # (D,)
    dt_matched: np.ndarray  # (T, D) bool
    dt_ignored: np.ndarray  # (T, D) bool
    gt_valid: int  # ground-truth boxes inside the area range


def _make_group(
    category: Hashable,
    dt_boxes: np.ndarray,
    dt_scores: np.ndarray,
    gt_boxes: np.ndarray,
    gt_areas: np.ndarray,
    max_dets: int | None,
    gt_crowd: np.ndarray | None = None,
) -> _Group:
    order = np.argsort(-dt_scores, kind="mergesort")[:max_dets]
    dt_boxes = dt_boxes[order]
    crowd = np.zeros(gt_boxes.shape[0], dtype=bool) if gt_crowd is None else gt_crowd
    return _Group(
        category=category,
        dt_scores=dt_scores[order],
        dt_areas=_box_areas(dt_boxes),
        gt_areas=gt_areas,
        gt_crowd=crowd,
        ious=_pairwise_iou(dt_boxes, gt_boxes, crowd),
    )


def _match_group(group: _Group, area_range: tuple[float, float]) -> _GroupMatch:
    """Greedy matching in score order: each detection takes the unmatched ground truth of highest IoU >= threshold
    (ground truth inside the area range and not crowd first, the last one on equal IoU); each ground truth matches
    at most once per threshold, except a crowd region, which absorbs any number of detections. A detection matched
    to an ignored ground truth (crowd or outside the area range) is ignored, and so is an unmatched detection outside
    the area range."""
    low, high = area_range
    gt_ignored = group.gt_crowd | (group.gt_areas < low) | (group.gt_areas > high)
    gt_order = np.argsort(gt_ignored, kind="mergesort")
    gt_ignored = gt_ignored[gt_order].tolist()
    gt_crowd = group.gt_crowd[gt_order].tolist()
    ious = group.ious[:, gt_order].tolist()
    n_thr, n_dt, n_gt = len(IOU_THRESHOLDS), len(group.dt_scores), len(gt_order)
    dt_matched = np.zeros((n_thr, n_dt), dtype=bool)
    dt_ignored = np.zeros((n_thr, n_dt), dtype=bool)
    if n_gt:
        for t, threshold in enumerate(IOU_THRESHOLDS.tolist()):
            gt_taken = [False] * n_gt
            for d in range(n_dt):
                best_iou, best = min(threshold, 1 - 1e-10), -1
                for g in range(n_gt):
                    if gt_taken[g] and not gt_crowd[g]:
                        continue
                    if best > -1 and not gt_ignored[best] and gt_ignored[g]:
                        break
                    if ious[d][g] < best_iou:
                        continue
                    best_iou, best = ious[d][g], g
                if best == -1:
                    continue
                gt_taken[best] = True
                dt_matched[t, d] = True
                dt_ignored[t, d] = gt_ignored[best]
    dt_outside = (group.dt_areas < low) | (group.dt_areas > high)
    dt_ignored |= ~dt_matched & dt_outside[None, :]
    return _GroupMatch(
        dt_scores=group.dt_scores, dt_matched=dt_matched, dt_ignored=dt_ignored, gt_valid=int(n_gt - sum(gt_ignored))
    )


def _accumulate(matches: list[_GroupMatch], max_det: int | None) -> tuple[np.ndarray, np.ndarray] | None:
    """Precision (T, R) at the recall points and recall (T,) of one category over its images (in image order),
    keeping each image's first ``max_det`` detections (all with None); None when the category has no ground truth
    in range."""
    gt_count = sum(m.gt_valid for m in matches)
    if not matches or gt_count == 0:
        return None
    scores = np.concatenate([m.dt_scores[:max_det] for m in matches])
    order = np.argsort(-scores, kind="mergesort")
    matched = np.concatenate([m.dt_matched[:, :max_det] for m in matches], axis=1)[:, order]
    ignored = np.concatenate([m.dt_ignored[:, :max_det] for m in matches], axis=1)[:, order]
    tp_sum = np.cumsum(matched & ~ignored, axis=1).astype(np.float64)
    fp_sum = np.cumsum(~matched & ~ignored, axis=1).astype(np.float64)
    n_thr, n_dt = tp_sum.shape
    precision = np.zeros((n_thr, len(RECALL_THRESHOLDS)))
    recall = np.zeros(n_thr)
    for t in range(n_thr):
        rc = tp_sum[t] / gt_count
        pr = tp_sum[t] / (tp_sum[t] + fp_sum[t] + np.spacing(1))
        if n_dt:
            recall[t] = rc[-1]
        pr = np.maximum.accumulate(pr[::-1])[::-1]
        at = np.searchsorted(rc, RECALL_THRESHOLDS, side="left")
        inside = at < n_dt
        precision[t, inside] = pr[at[inside]]
    return precision, recall


def _mean_defined(values: list[np.ndarray]) -> float:
    """Mean over categories with ground truth (COCO/LVIS ``summarize``); -1.0 when there is none."""
    if not values:
        return -1.0
    return float(np.mean(np.concatenate([v.reshape(-1) for v in values])))


def _threshold_index(value: float) -> int:
    return int(np.flatnonzero(IOU_THRESHOLDS == value)[0])


# ----------------------------------------------------------------------------------------------------------------
# LVIS-Ground (AS-MANY protocol)
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroundingSample:
    """One LVIS-Ground query: all boxes of one category in one image.

    ``pred_boxes`` are the boxes of the answer in the order the model wrote them (xyxy, pixels of the original
    image); ``gt_areas`` are the areas that decide small/medium/large (LVIS uses the annotation's ``area``, the
    segmentation area; without it the box area is used)."""

    image_id: Hashable
    category_id: Hashable
    pred_boxes: BoxesLike
    gt_boxes: BoxesLike
    gt_areas: Sequence[float] | np.ndarray | None = None


@dataclass(frozen=True)
class GroundingRecall:
    """LVIS-Ground recall (Groma Table 3); -1.0 where no category has ground truth in the range."""

    ar: float  #: recall averaged over IoU 0.50:0.05:0.95 and categories
    ar50: float  #: recall at IoU 0.5
    ar75: float  #: recall at IoU 0.75
    ar_small: float
    ar_medium: float
    ar_large: float
    count: int  #: number of queries

    def as_dict(self) -> dict[str, float]:
        """The scores under the names of the reference's ``CustomLVISEval`` (AR, AR50, AR75, ARs, ARm, ARl)."""
        return {
            "AR": self.ar,
            "AR50": self.ar50,
            "AR75": self.ar75,
            "ARs": self.ar_small,
            "ARm": self.ar_medium,
            "ARl": self.ar_large,
        }


def lvis_ground_recall(
    samples: Sequence[GroundingSample], *, as_many: bool = True, max_dets_per_image: int = 300
) -> GroundingRecall:
    """LVIS-Ground average recall. With ``as_many`` (the paper's AS-MANY protocol) each query keeps its first k
    predicted boxes, k = its number of ground-truth boxes; all boxes score 1.0 (as in ``eval_lvis.py``), so order
    decides. Then LVIS's evaluation: at most ``max_dets_per_image`` boxes per image (earlier queries first), COCO
    matching per (image, category), recall pooled over the images of a category and averaged over categories."""
    seen: set[tuple[Hashable, Hashable]] = set()
    per_image: dict[Hashable, int] = defaultdict(int)
    groups: list[_Group] = []
    for index, sample in enumerate(samples):
        key = (sample.image_id, sample.category_id)
        if key in seen:
            raise ValueError(
                f"samples[{index}]: image {sample.image_id!r} and category {sample.category_id!r} "
                "appear twice; give one query per (image, category)"
            )
        seen.add(key)
        gt = _as_boxes(sample.gt_boxes, f"samples[{index}].gt_boxes")
        if gt.shape[0] == 0:
            raise ValueError(f"samples[{index}].gt_boxes: an LVIS-Ground query needs at least one ground-truth box")
        areas = (
            _box_areas(gt)
            if sample.gt_areas is None
            else _as_values(sample.gt_areas, gt.shape[0], f"samples[{index}].gt_areas")
        )
        pred = _as_boxes(sample.pred_boxes, f"samples[{index}].pred_boxes")
        if as_many:
            pred = pred[: gt.shape[0]]
        room = max(max_dets_per_image - per_image[sample.image_id], 0)
        pred = pred[:room]
        per_image[sample.image_id] += pred.shape[0]
        groups.append(_make_group(sample.category_id, pred, np.ones(pred.shape[0]), gt, areas, None))
    if not groups:
        raise ValueError("lvis_ground_recall: no samples to score")
    recall = {name: _recall_by_category(groups, area) for name, area in AREA_RANGES.items()}
    at50, at75 = _threshold_index(0.5), _threshold_index(0.75)
    return GroundingRecall(
        ar=_mean_defined(recall["all"]),
        ar50=_mean_defined([r[at50] for r in recall["all"]]),
        ar75=_mean_defined([r[at75] for r in recall["all"]]),
        ar_small=_mean_defined(recall["small"]),
        ar_medium=_mean_defined(recall["medium"]),
        ar_large=_mean_defined(recall["large"]),
        count=len(groups),
    )


def _recall_by_category(groups: list[_Group], area_range: tuple[float, float]) -> list[np.ndarray]:
    """Recall (T,) of each category that has ground truth in the area range."""
    by_category: dict[Hashable, list[_GroupMatch]] = defaultdict(list)
    for group in groups:
        by_category[group.category].append(_match_group(group, area_range))
    out = []
    for matches in by_category.values():
        result = _accumulate(matches, max_det=None)
        if result is not None:
            out.append(result[1])
    return out


# ----------------------------------------------------------------------------------------------------------------
# Class-agnostic detection (COCO style)
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DetectionMetrics:
    """COCO-style class-agnostic box metrics; -1.0 where there is no ground truth in the range."""

    ap: float  #: AP averaged over IoU 0.50:0.05:0.95, at max_dets[-1] detections per image
    ap50: float
    ap75: float
    ap_small: float
    ap_medium: float
    ap_large: float
    ar: tuple[float, ...]  #: AR at each of max_dets
    ar_small: float  #: AR at max_dets[-1]
    ar_medium: float
    ar_large: float
    max_dets: tuple[int, ...]

    def as_dict(self) -> dict[str, float]:
        """The twelve COCO summary numbers under their usual names (AP, AP50, ..., AR@100, ARs, ARm, ARl)."""
        out = {
            "AP": self.ap,
            "AP50": self.ap50,
            "AP75": self.ap75,
            "APs": self.ap_small,
            "APm": self.ap_medium,
            "APl": self.ap_large,
        }
        out.update({f"AR@{k}": v for k, v in zip(self.max_dets, self.ar)})
        out.update({"ARs": self.ar_small, "ARm": self.ar_medium, "ARl": self.ar_large})
        return out


def detection_metrics(
    pred_boxes: Sequence[BoxesLike],
    pred_scores: Sequence[Sequence[float] | np.ndarray | Tensor],
    gt_boxes: Sequence[BoxesLike],
    gt_areas: Sequence[Sequence[float] | np.ndarray | None] | None = None,
    max_dets: tuple[int, ...] = (1, 10, 100),
    gt_crowd: Sequence[Sequence[bool] | np.ndarray | None] | None = None,
) -> DetectionMetrics:
    """Class-agnostic AP/AR of a region proposer, computed as pycocotools' ``COCOeval`` (bbox, one category) does.
    One entry per image: predicted xyxy boxes (pixels) with scores, ground-truth xyxy boxes, optionally
    ground-truth areas for the size ranges (default: box areas) and ``iscrowd`` flags (default: none is a crowd).
    A crowd box counts as no object: a detection that falls inside it (intersection over the detection's area
    at the IoU threshold) is neither a true nor a false positive. Score ties across images are broken by image
    order, as COCOeval does with its sorted image ids."""
    if not len(pred_boxes) == len(pred_scores) == len(gt_boxes):
        raise ValueError(
            f"detection_metrics: pred_boxes, pred_scores and gt_boxes must have one entry per image, got "
            f"{len(pred_boxes)}, {len(pred_scores)} and {len(gt_boxes)}"
        )
    if gt_areas is not None and len(gt_areas) != len(gt_boxes):
        raise ValueError(f"detection_metrics: gt_areas has {len(gt_areas)} entries but gt_boxes has {len(gt_boxes)}")
    if gt_crowd is not None and len(gt_crowd) != len(gt_boxes):
        raise ValueError(f"detection_metrics: gt_crowd has {len(gt_crowd)} entries but gt_boxes has {len(gt_boxes)}")
    if not max_dets or any(k <= 0 for k in max_dets):
        raise ValueError(f"detection_metrics: max_dets must be positive counts, got {max_dets}")
    groups = []
    for i in range(len(gt_boxes)):
        dt = _as_boxes(pred_boxes[i], f"pred_boxes[{i}]")
        scores = _as_values(pred_scores[i], dt.shape[0], f"pred_scores[{i}]")
        gt = _as_boxes(gt_boxes[i], f"gt_boxes[{i}]")
        given = None if gt_areas is None else gt_areas[i]
        areas = _box_areas(gt) if given is None else _as_values(given, gt.shape[0], f"gt_areas[{i}]")
        flags = None if gt_crowd is None else gt_crowd[i]
        crowd = None if flags is None else _as_values(flags, gt.shape[0], f"gt_crowd[{i}]").astype(bool)
        if dt.shape[0] or gt.shape[0]:
            groups.append(_make_group(0, dt, scores, gt, areas, max(max_dets), crowd))
    precision: dict[tuple[str, int], list[np.ndarray]] = {}
    recall: dict[tuple[str, int], list[np.ndarray]] = {}
    for name, area in AREA_RANGES.items():
        matches = [_match_group(g, area) for g in groups]
        for k in max_dets:
            result = _accumulate(matches, k)
            precision[name, k] = [] if result is None else [result[0]]
            recall[name, k] = [] if result is None else [result[1]]
    last = max_dets[-1]
    at50, at75 = _threshold_index(0.5), _threshold_index(0.75)
    return DetectionMetrics(
        ap=_mean_defined(precision["all", last]),
        ap50=_mean_defined([p[at50] for p in precision["all", last]]),
        ap75=_mean_defined([p[at75] for p in precision["all", last]]),
        ap_small=_mean_defined(precision["small", last]),
        ap_medium=_mean_defined(precision["medium", last]),
        ap_large=_mean_defined(precision["large", last]),
        ar=tuple(_mean_defined(recall["all", k]) for k in max_dets),
        ar_small=_mean_defined(recall["small", last]),
        ar_medium=_mean_defined(recall["medium", last]),
        ar_large=_mean_defined(recall["large", last]),
        max_dets=tuple(max_dets),
    )


# ----------------------------------------------------------------------------------------------------------------
# Region captioning
# ----------------------------------------------------------------------------------------------------------------

#: Tokens the COCO caption tokenizer drops after PTB tokenization (it runs with lower-casing, so brackets, which
#: come out as ``-lrb-`` etc., stay).
PTB_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)


def clean_generated_caption(text: str) -> str:
    """A decoded region caption cleaned as the reference's ``model_vg.py``/``model_refcocog.py`` do before scoring:
    newlines dropped, ``<...>`` tags removed, whitespace collapsed, surrounding quotes and spaces stripped."""
    text = text.replace("\n", "").replace("  ", " ")
    text = re.sub(r"<.*?>", "", text)
    return " ".join(text.split()).strip("'").strip()


_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st jr sr prof mt ft no vs etc inc ltd co corp gen col lt sgt capt rev ave blvd dept est approx "
    "jan feb mar apr jun jul aug sep sept oct nov dec".split()
)
_SPLIT_WORDS = {
    "cannot": ["can", "not"],
    "gonna": ["gon", "na"],
    "gotta": ["got", "ta"],
    "wanna": ["wan", "na"],
    "lemme": ["lem", "me"],
    "gimme": ["gim", "me"],
}
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$", re.IGNORECASE)
_PUNCT_RUN = re.compile(r"(\.\.\.+|--+|[!?]+|[;\\])")
_ACRONYM = re.compile(r"[a-z](\.[a-z])*", re.IGNORECASE)


def tokenize_caption(text: str) -> str:
    """Pure-Python stand-in for the COCO caption tokenizer (Stanford PTBTokenizer ``-preserveLines -lowerCase``,
    then punctuation removal). Equal to it on caption-like text: punctuation, quotes, brackets, possessives and
    contractions, hyphenated words, numbers, times, abbreviations; it is not a full PTB implementation."""
    text = text.replace("\n", " ").replace("\u2019", "'").replace("\u2018", "'")
    text = re.sub(r"[\"\u201c\u201d]", " ", text)
    text = re.sub(r"[()\[\]{}]", lambda m: f" {_BRACKETS[m.group(0)]} ", text)
    text = re.sub(r",(?!\d)|(?<!\d),", " , ", text)
    text = re.sub(r":(?!\d)|(?<!\d):", " : ", text)
    text = _PUNCT_RUN.sub(lambda m: f" {m.group(0)} ", text)
    tokens: list[str] = []
    for word in text.split():
        tokens.extend(_split_word(word))
    return " ".join(t.lower() for t in tokens if t not in PTB_PUNCTUATION)


def _split_word(word: str) -> list[str]:
    """PTB splitting of one whitespace-free piece: currency/number signs, quotes, final period, clitics."""
    if word in _BRACKETS.values() or _PUNCT_RUN.fullmatch(word) or word in PTB_PUNCTUATION:
        return [word]
    head: list[str] = []
    tail: list[str] = []
    while (
        word[:1] in ("$", "#", "'", "`")
        and len(word) > 1
        and not _CLITIC.match("x" + word)
        and not (word[0] == "'" and word[1].isdigit())
    ):
        head.append(word[0])
        word = word[1:]
    while word.endswith("%") and len(word) > 1:
        tail.insert(0, "%")
        word = word[:-1]
    if word.endswith(".") and len(word) > 1:
        stem = word[:-1]
        if not (_ACRONYM.fullmatch(stem) or stem.lower() in _ABBREVIATIONS):
            tail.insert(0, ".")
            word = stem
    while word.endswith("'") and len(word) > 1:
        tail.insert(0, "'")
        word = word[:-1]
    middle: list[str] = []
    if word.lower() in _SPLIT_WORDS:
        middle = list(_SPLIT_WORDS[word.lower()])
    else:
        while match := _CLITIC.match(word):
            middle.insert(0, match.group(2))
            word = match.group(1)
        middle.insert(0, word)
    return head + middle + tail


@dataclass(frozen=True)
class CaptionScores:
    """Corpus caption scores as the COCO caption evaluation reports them (fractions, not percentages)."""

    bleu: tuple[float, float, float, float]  #: BLEU-1..4
    meteor: float | None  #: None when METEOR could not run (it needs pycocoevalcap and Java)
    rouge_l: float
    cider: float  #: CIDEr-D, as pycocoevalcap's ``Cider``
    count: int  #: number of scored predictions
    backend: str  #: "pycocoevalcap" or "python"

    def as_dict(self) -> dict[str, float]:
        """The scores under pycocoevalcap's names (Bleu_1..4, METEOR, ROUGE_L, CIDEr); METEOR left out when None."""
        out = {f"Bleu_{n + 1}": v for n, v in enumerate(self.bleu)}
        if self.meteor is not None:
            out["METEOR"] = self.meteor
        out.update({"ROUGE_L": self.rouge_l, "CIDEr": self.cider})
        return out


def pycocoevalcap_available() -> bool:
    """Whether the COCO caption scorers can run here (the package is installed and ``java`` is on PATH)."""
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        return False
    return shutil.which("java") is not None


def caption_scores(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    *,
    backend: Literal["auto", "pycocoevalcap", "python"] = "auto",
) -> CaptionScores:
    """Score one predicted caption per id against that id's reference captions, as the reference's ``eval_cap.py``
    (pycocoevalcap: PTB tokenizer, BLEU-1..4 with "closest" reference length, METEOR 1.5, ROUGE-L, CIDEr-D; SPICE is
    not computed). Only the ids of ``predictions`` are scored, as there. ``backend="python"`` uses this module's
    tokenizer and scorers (no METEOR); "auto" picks pycocoevalcap when :func:`pycocoevalcap_available`."""
    if not predictions:
        raise ValueError("caption_scores: no predictions to score")
    missing = [k for k in predictions if not references.get(k)]
    if missing:
        raise ValueError(f"caption_scores: no reference captions for prediction ids {missing[:5]}")
    if backend == "auto":
        backend = "pycocoevalcap" if pycocoevalcap_available() else "python"
    if backend == "pycocoevalcap":
        return _pycocoevalcap_scores(predictions, references)
    if backend != "python":
        raise ValueError(f"caption_scores: backend must be 'auto', 'pycocoevalcap' or 'python', got {backend!r}")
    res = {k: [tokenize_caption(v)] for k, v in predictions.items()}
    gts = {k: [tokenize_caption(c) for c in references[k]] for k in predictions}
    return CaptionScores(
        bleu=bleu_scores(res, gts),
        meteor=None,
        rouge_l=rouge_l_score(res, gts),
        cider=cider_d_score(res, gts),
        count=len(res),
        backend="python",
    )


def _pycocoevalcap_scores(
    predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]
) -> CaptionScores:
    if not pycocoevalcap_available():
        raise RuntimeError("caption_scores: backend 'pycocoevalcap' needs `pip install pycocoevalcap` and Java on PATH")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    res = tokenizer.tokenize({k: [{"caption": v}] for k, v in predictions.items()})
    gts = tokenizer.tokenize({k: [{"caption": c} for c in references[k]] for k in predictions})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    meteor_scorer = Meteor()
    java = meteor_scorer.meteor_p
    try:
        meteor, _ = meteor_scorer.compute_score(gts, res)
    finally:
        del meteor_scorer  # its __del__ closes Java's stdin, kills it and waits
        for pipe in (java.stdout, java.stderr):  # which it leaves open (a ResourceWarning)
            pipe.close()
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return CaptionScores(
        bleu=tuple(float(b) for b in bleu),
        meteor=float(meteor),
        rouge_l=float(rouge),
        cider=float(cider),
        count=len(res),
        backend="pycocoevalcap",
    )


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def bleu_scores(
    predictions: Mapping[Hashable, Sequence[str]], references: Mapping[Hashable, Sequence[str]], n: int = 4
) -> tuple[float, ...]:
    """Corpus BLEU-1..n of tokenized captions as pycocoevalcap's ``Bleu`` computes it: clipped n-gram counts summed
    over the corpus, brevity penalty from the reference length closest to each prediction (shorter on ties)."""
    tiny, small = 1e-15, 1e-9
    correct, guess = [0] * n, [0] * n
    test_len = ref_len = 0
    for key, (prediction,) in predictions.items():
        words = prediction.split()
        refs = [r.split() for r in references[key]]
        max_counts: dict[tuple[str, ...], int] = {}
        for ref in refs:
            for gram, count in _ngrams(ref, n).items():
                max_counts[gram] = max(max_counts.get(gram, 0), count)
        for gram, count in _ngrams(words, n).items():
            correct[len(gram) - 1] += min(max_counts.get(gram, 0), count)
        for k in range(n):
            guess[k] += max(0, len(words) - k)
        test_len += len(words)
        ref_len += min((abs(len(r) - len(words)), len(r)) for r in refs)[1]
    scores = []
    product = 1.0
    for k in range(n):
        product *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (test_len + tiny) / (ref_len + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return tuple(scores)


def _lcs_length(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l_score(
    predictions: Mapping[Hashable, Sequence[str]], references: Mapping[Hashable, Sequence[str]], beta: float = 1.2
) -> float:
    """Mean ROUGE-L F-score (beta 1.2) of tokenized captions as pycocoevalcap's ``Rouge``: LCS precision and recall
    each maximised over the references; tokens are split on single spaces."""
    scores = []
    for key, (prediction,) in predictions.items():
        words = prediction.split(" ")
        lcs = [_lcs_length(ref.split(" "), words) for ref in references[key]]
        precision = max(c / len(words) for c in lcs)
        recall = max(c / len(ref.split(" ")) for c, ref in zip(lcs, references[key]))
        if precision and recall:
            scores.append((1 + beta**2) * precision * recall / (recall + beta**2 * precision))
        else:
            scores.append(0.0)
    return float(np.mean(scores))


def cider_d_score(
    predictions: Mapping[Hashable, Sequence[str]],
    references: Mapping[Hashable, Sequence[str]],
    n: int = 4,
    sigma: float = 6.0,
) -> float:
    """Corpus CIDEr-D of tokenized captions as pycocoevalcap's ``Cider``: tf-idf n-gram vectors (idf from the
    references of the scored ids), clipped cosine similarity, Gaussian length penalty (the length being the bigram
    count, as there), averaged over n-gram orders and references, times 10."""
    keys = list(predictions)
    ref_counts = {k: [_ngrams(r.split(), n) for r in references[k]] for k in keys}
    document_frequency: Counter = Counter()
    for k in keys:
        document_frequency.update(set().union(*ref_counts[k]))
    log_images = math.log(float(len(keys)))

    def vector(counts: Counter) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(n)]
        norm = [0.0] * n
        for gram, tf in counts.items():
            weight = tf * (log_images - math.log(max(1.0, document_frequency[gram])))
            vec[len(gram) - 1][gram] = weight
            norm[len(gram) - 1] += weight**2
        bigrams = sum(tf for gram, tf in counts.items() if len(gram) == 2)
        return vec, [math.sqrt(v) for v in norm], bigrams

    scores = []
    for k in keys:
        hyp, hyp_norm, hyp_len = vector(_ngrams(predictions[k][0].split(), n))
        total = 0.0
        for counts in ref_counts[k]:
            ref, ref_norm, ref_len = vector(counts)
            penalty = math.exp(-((hyp_len - ref_len) ** 2) / (2 * sigma**2))
            for order in range(n):
                value = sum(min(w, ref[order].get(g, 0.0)) * ref[order].get(g, 0.0) for g, w in hyp[order].items())
                if hyp_norm[order] != 0 and ref_norm[order] != 0:
                    value /= hyp_norm[order] * ref_norm[order]
                total += value * penalty
        scores.append(total / n / len(ref_counts[k]) * 10.0)
    return float(np.mean(scores))
