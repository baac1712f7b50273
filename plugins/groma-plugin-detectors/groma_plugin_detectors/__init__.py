"""Class-agnostic region proposers from detectors that transformers builds: OWLv2 objectness and RT-DETR."""

from __future__ import annotations

from groma_core.hookspecs import hookimpl
from groma_core.stages import BuildContext
from groma_plugin_detectors.common import DetectorOptions
from groma_plugin_detectors.owlv2 import Owlv2Options, Owlv2Proposer, padded_square_to_original
from groma_plugin_detectors.rt_detr import RTDetrOptions, RTDetrProposer

__all__ = [
    "DetectorOptions",
    "Owlv2Options",
    "Owlv2Proposer",
    "RTDetrOptions",
    "RTDetrProposer",
    "build_owlv2",
    "build_rt_detr",
    "padded_square_to_original",
]


def build_owlv2(options: Owlv2Options, context: BuildContext) -> Owlv2Proposer:
    """Factory of the ``owlv2`` proposer (it reads the original images, not the context's feature levels)."""
    return Owlv2Proposer(options)


def build_rt_detr(options: RTDetrOptions, context: BuildContext) -> RTDetrProposer:
    """Factory of the ``rt-detr`` proposer (it reads the original images, not the context's feature levels)."""
    return RTDetrProposer(options)


@hookimpl
def register_region_proposers(register):
    register(
        "owlv2",
        build_owlv2,
        config=Owlv2Options,
        description="OWLv2 objectness on the original images: one class-agnostic box per patch",
    )
    register(
        "rt-detr",
        build_rt_detr,
        config=RTDetrOptions,
        description="RT-DETR on the original images: every query's box, scored by its best class probability",
    )
