"""Metrics of Groma's evaluations: REC accuracy, LVIS-Ground AS-MANY recall, class-agnostic COCO-style detection
AP/AR and region-caption scores (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D).

Boxes are xyxy. REC only needs consistent units; the LVIS-Ground and detection metrics need pixels of the original
image, because their small/medium/large ranges are areas in pixels (< 32², 32²..96², > 96²).
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
from collections import defaultdict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from torch import Tensor

from groma_core.boxes import box_iou

if TYPE_CHECKING:
    from pycocotools.cocoeval import COCOeval

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
            iou = torch.nan_to_num(box_iou(torch.from_numpy(mine), torch.from_numpy(gt)), nan=0.0).numpy()
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
# COCO-style evaluation (LVIS-Ground and detection): pycocotools' COCOeval
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CocoImage:
    """One image for :func:`_cocoeval`: detections and ground truth, xyxy pixels, with integer categories >= 1."""

    dt_boxes: np.ndarray  # (D, 4)
    dt_scores: np.ndarray  # (D,)
    dt_categories: np.ndarray  # (D,)
    gt_boxes: np.ndarray  # (G, 4)
    gt_areas: np.ndarray  # (G,): decide small/medium/large
    gt_crowd: np.ndarray  # (G,) bool
    gt_categories: np.ndarray  # (G,)


def _cocoeval(images: Sequence[_CocoImage], max_dets: Sequence[int], use_categories: bool) -> COCOeval:
    """pycocotools' ``COCOeval`` (bbox) run and accumulated on in-memory annotations, its printing silenced. Images
    are numbered 1.. in the given order (which breaks score ties across images, as COCOeval's sorted ids do) and
    detections keep their order within an image (which breaks ties there)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def xywh(box: np.ndarray) -> list[float]:
        return [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]

    categories = {int(c) for im in images for c in (*im.dt_categories.tolist(), *im.gt_categories.tolist())} or {1}
    gt: dict[str, list] = {"images": [], "annotations": [], "categories": [{"id": c} for c in sorted(categories)]}
    dt: dict[str, list] = {"images": [], "annotations": [], "categories": gt["categories"]}
    for image_id, im in enumerate(images, start=1):
        gt["images"].append({"id": image_id})
        dt["images"].append({"id": image_id})
        for box, area, crowd, category in zip(im.gt_boxes, im.gt_areas, im.gt_crowd, im.gt_categories):
            gt["annotations"].append(
                {
                    "id": len(gt["annotations"]) + 1,  # COCOeval reads an id of 0 as "unmatched"
                    "image_id": image_id,
                    "category_id": int(category),
                    "bbox": xywh(box),
                    "area": float(area),
                    "iscrowd": int(crowd),
                }
            )
        for box, score, category in zip(im.dt_boxes, im.dt_scores, im.dt_categories):
            dt["annotations"].append(
                {
                    "id": len(dt["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": int(category),
                    "bbox": xywh(box),
                    "area": float((box[2] - box[0]) * (box[3] - box[1])),  # as COCO.loadRes sets it
                    "score": float(score),
                }
            )
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt, coco_dt = COCO(), COCO()
        coco_gt.dataset, coco_dt.dataset = gt, dt
        coco_gt.createIndex()
        coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.params.useCats = int(use_categories)
        evaluator.params.maxDets = [int(k) for k in max_dets]
        evaluator.params.areaRng = [list(r) for r in AREA_RANGES.values()]
        evaluator.params.areaRngLbl = list(AREA_RANGES)
        evaluator.evaluate()
        evaluator.accumulate()
    return evaluator


def _mean_defined(values: np.ndarray) -> float:
    """Mean over the defined entries (COCOeval's ``summarize``: -1 marks a category without ground truth in the
    range); -1.0 when none is defined."""
    defined = values[values > -1]
    return float(np.mean(defined)) if defined.size else -1.0


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
    image_number: dict[Hashable, int] = {}
    category_number: dict[Hashable, int] = {}
    per_image: dict[int, dict[str, list]] = defaultdict(lambda: defaultdict(list))
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
        image = per_image[image_number.setdefault(sample.image_id, len(image_number) + 1)]
        room = max(max_dets_per_image - sum(len(b) for b in image["dt"]), 0)
        pred = pred[:room]
        category = category_number.setdefault(sample.category_id, len(category_number) + 1)
        image["dt"].append(pred)
        image["dt_cat"].append(np.full(pred.shape[0], category))
        image["gt"].append(gt)
        image["gt_area"].append(areas)
        image["gt_cat"].append(np.full(gt.shape[0], category))
    if not seen:
        raise ValueError("lvis_ground_recall: no samples to score")
    images = [
        _CocoImage(
            dt_boxes=np.concatenate(im["dt"]),
            dt_scores=np.ones(sum(len(b) for b in im["dt"])),
            dt_categories=np.concatenate(im["dt_cat"]),
            gt_boxes=np.concatenate(im["gt"]),
            gt_areas=np.concatenate(im["gt_area"]),
            gt_crowd=np.zeros(sum(len(b) for b in im["gt"]), dtype=bool),
            gt_categories=np.concatenate(im["gt_cat"]),
        )
        for _, im in sorted(per_image.items())
    ]
    # every answer box scores 1.0 (as in eval_lvis.py), so the order of the answer decides
    recall = _cocoeval(images, [max_dets_per_image], use_categories=True).eval["recall"][..., 0]  # (T, K, A)
    at50, at75 = _threshold_index(0.5), _threshold_index(0.75)
    return GroundingRecall(
        ar=_mean_defined(recall[:, :, 0]),
        ar50=_mean_defined(recall[at50, :, 0]),
        ar75=_mean_defined(recall[at75, :, 0]),
        ar_small=_mean_defined(recall[:, :, 1]),
        ar_medium=_mean_defined(recall[:, :, 2]),
        ar_large=_mean_defined(recall[:, :, 3]),
        count=len(seen),
    )


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
    images = []
    for i in range(len(gt_boxes)):
        dt = _as_boxes(pred_boxes[i], f"pred_boxes[{i}]")
        scores = _as_values(pred_scores[i], dt.shape[0], f"pred_scores[{i}]")
        gt = _as_boxes(gt_boxes[i], f"gt_boxes[{i}]")
        given = None if gt_areas is None else gt_areas[i]
        areas = _box_areas(gt) if given is None else _as_values(given, gt.shape[0], f"gt_areas[{i}]")
        flags = None if gt_crowd is None else gt_crowd[i]
        crowd = np.zeros(gt.shape[0], dtype=bool) if flags is None else _as_values(flags, gt.shape[0], f"gt_crowd[{i}]")
        images.append(_CocoImage(dt, scores, np.ones(dt.shape[0]), gt, areas, crowd.astype(bool), np.ones(gt.shape[0])))
    levels = sorted(set(max_dets))  # COCOeval keeps maxDets[-1] detections per image: ascending
    evaluator = _cocoeval(images, levels, use_categories=False)
    precision = evaluator.eval["precision"][:, :, 0]  # (T, R, A, M)
    recall = evaluator.eval["recall"][:, 0]  # (T, A, M)
    last = levels.index(max_dets[-1])
    at50, at75 = _threshold_index(0.5), _threshold_index(0.75)
    return DetectionMetrics(
        ap=_mean_defined(precision[:, :, 0, last]),
        ap50=_mean_defined(precision[at50, :, 0, last]),
        ap75=_mean_defined(precision[at75, :, 0, last]),
        ap_small=_mean_defined(precision[:, :, 1, last]),
        ap_medium=_mean_defined(precision[:, :, 2, last]),
        ap_large=_mean_defined(precision[:, :, 3, last]),
        ar=tuple(_mean_defined(recall[:, 0, levels.index(k)]) for k in max_dets),
        ar_small=_mean_defined(recall[:, 1, last]),
        ar_medium=_mean_defined(recall[:, 2, last]),
        ar_large=_mean_defined(recall[:, 3, last]),
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
    """Whether the COCO caption evaluation can run in full here (pycocoevalcap installed and ``java`` on PATH, which
    its PTB tokenizer and METEOR need)."""
    return _pycocoevalcap_installed() and shutil.which("java") is not None


def _pycocoevalcap_installed() -> bool:
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        return False
    return True


def caption_scores(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    *,
    backend: Literal["auto", "pycocoevalcap", "python"] = "auto",
) -> CaptionScores:
    """Score one predicted caption per id against that id's reference captions, as the reference's ``eval_cap.py``
    (pycocoevalcap: PTB tokenizer, BLEU-1..4 with "closest" reference length, METEOR 1.5, ROUGE-L, CIDEr-D; SPICE is
    not computed). Only the ids of ``predictions`` are scored, as there. ``backend="python"`` runs without Java:
    :func:`tokenize_caption` instead of the PTB tokenizer and no METEOR (BLEU, ROUGE-L and CIDEr-D are still
    pycocoevalcap's scorers); "auto" picks "pycocoevalcap" when :func:`pycocoevalcap_available`."""
    if not predictions:
        raise ValueError("caption_scores: no predictions to score")
    missing = [k for k in predictions if not references.get(k)]
    if missing:
        raise ValueError(f"caption_scores: no reference captions for prediction ids {missing[:5]}")
    if backend not in ("auto", "pycocoevalcap", "python"):
        raise ValueError(f"caption_scores: backend must be 'auto', 'pycocoevalcap' or 'python', got {backend!r}")
    if not _pycocoevalcap_installed():
        raise ImportError("caption_scores: the caption scorers come from pycocoevalcap: pip install 'groma-core[eval]'")
    if backend == "auto":
        backend = "pycocoevalcap" if pycocoevalcap_available() else "python"
    if backend == "python":
        res = {k: [tokenize_caption(v)] for k, v in predictions.items()}
        gts = {k: [tokenize_caption(c) for c in references[k]] for k in predictions}
        return _score_tokenized(gts, res, meteor=False)
    if shutil.which("java") is None:
        raise RuntimeError("caption_scores: backend 'pycocoevalcap' needs Java on PATH (or use backend 'python')")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    res = tokenizer.tokenize({k: [{"caption": v}] for k, v in predictions.items()})
    gts = tokenizer.tokenize({k: [{"caption": c} for c in references[k]] for k in predictions})
    return _score_tokenized(gts, res, meteor=True)


def _score_tokenized(gts: dict[Hashable, list[str]], res: dict[Hashable, list[str]], meteor: bool) -> CaptionScores:
    """pycocoevalcap's scorers on tokenized captions (``res``: one per id); METEOR (Java) only when asked."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    meteor_score = None
    if meteor:
        from pycocoevalcap.meteor.meteor import Meteor

        meteor_scorer = Meteor()
        java = meteor_scorer.meteor_p
        try:
            meteor_score, _ = meteor_scorer.compute_score(gts, res)
        finally:
            del meteor_scorer  # its __del__ closes Java's stdin, kills it and waits
            for pipe in (java.stdout, java.stderr):  # which it leaves open (a ResourceWarning)
                pipe.close()
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return CaptionScores(
        bleu=tuple(float(b) for b in bleu),
        meteor=None if meteor_score is None else float(meteor_score),
        rouge_l=float(rouge),
        cider=float(cider),
        count=len(res),
        backend="pycocoevalcap" if meteor else "python",
    )
