"""Groma's two-stage class-agnostic Deformable DETR region proposer."""

from __future__ import annotations

from groma_core.hookspecs import hookimpl
from groma_plugin_deformable_detr.attention import multi_scale_deformable_attention
from groma_plugin_deformable_detr.losses import DetectionLossWeights, detection_loss
from groma_plugin_deformable_detr.options import DeformableDetrOptions, ScoreExponents
from groma_plugin_deformable_detr.proposer import DeformableDetrProposer, build_proposer
from groma_plugin_deformable_detr.transformer import DeformableDetrOutput, TwoStageDeformableTransformer

__all__ = [
    "DeformableDetrOptions",
    "DeformableDetrOutput",
    "DeformableDetrProposer",
    "DetectionLossWeights",
    "ScoreExponents",
    "TwoStageDeformableTransformer",
    "build_proposer",
    "detection_loss",
    "multi_scale_deformable_attention",
]


@hookimpl
def register_region_proposers(register):
    register(
        "deformable-detr",
        build_proposer,
        config=DeformableDetrOptions,
        description="Groma's class-agnostic two-stage Deformable DETR (mean of feature levels, 300 scored boxes)",
    )
