"""Segment Anything's automatic mask generation as a Groma region proposer (transformers ``SamModel``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from groma_core.hookspecs import hookimpl
from groma_core.plugins import lazy_exports
from groma_core.stages import BuildContext
from groma_plugin_sam.options import SamOptions

if TYPE_CHECKING:
    from groma_plugin_sam.proposer import SamProposer

__all__ = [
    "GeneratedMasks",
    "SamOptions",
    "SamProposer",
    "build_sam_model",
    "build_sam_proposer",
    "config_from_segment_anything",
    "from_segment_anything",
    "generate_masks",
    "key_pairs",
    "load_segment_anything_checkpoint",
    "to_segment_anything",
]


# transformers (SamModel) is imported when a stage is built or one of these names is used, not when the plugin loads
__getattr__ = lazy_exports(
    __name__,
    {**dict.fromkeys(["build_sam_model", "config_from_segment_anything", "from_segment_anything", "key_pairs",
                      "load_segment_anything_checkpoint", "to_segment_anything"], ".checkpoint"),
     "GeneratedMasks": ".generator", "generate_masks": ".generator", "SamProposer": ".proposer"},
)  # fmt: skip


def build_sam_proposer(options: SamOptions, context: BuildContext) -> SamProposer:
    """Factory of the ``sam`` region proposer (it reads the original images: the context is not needed)."""
    from groma_plugin_sam.proposer import SamProposer

    return SamProposer(options)


@hookimpl
def register_region_proposers(register):
    register(
        "sam",
        build_sam_proposer,
        config=SamOptions,
        description="Segment Anything automatic masks (point grid, IoU/stability filters, NMS) -> boxes",
    )
