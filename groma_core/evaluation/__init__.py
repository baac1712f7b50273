"""Evaluation metrics of Groma's benchmarks (REC, LVIS-Ground, class-agnostic detection, region captioning)."""

from groma_core.evaluation.metrics import (
    AREA_RANGES,
    IOU_THRESHOLDS,
    RECALL_THRESHOLDS,
    CaptionScores,
    DetectionMetrics,
    GroundingRecall,
    GroundingSample,
    RecResult,
    caption_scores,
    clean_generated_caption,
    detection_metrics,
    lvis_ground_recall,
    pycocoevalcap_available,
    rec_accuracy,
    tokenize_caption,
)

__all__ = [
    "AREA_RANGES",
    "IOU_THRESHOLDS",
    "RECALL_THRESHOLDS",
    "CaptionScores",
    "DetectionMetrics",
    "GroundingRecall",
    "GroundingSample",
    "RecResult",
    "caption_scores",
    "clean_generated_caption",
    "detection_metrics",
    "lvis_ground_recall",
    "pycocoevalcap_available",
    "rec_accuracy",
    "tokenize_caption",
]
