"""Groma's multi-level RoIAlign region encoder (pure PyTorch)."""

from groma_core.hookspecs import hookimpl
from groma_plugin_roialign.encoder import MlvlRoIAlignEncoder, RoIAlignEncoderOptions, build_region_encoder
from groma_plugin_roialign.extractor import MlvlRoIExtractor
from groma_plugin_roialign.fuse import MLVLFuseModule
from groma_plugin_roialign.ops import roi_align

__all__ = [
    "MLVLFuseModule",
    "MlvlRoIAlignEncoder",
    "MlvlRoIExtractor",
    "RoIAlignEncoderOptions",
    "build_region_encoder",
    "roi_align",
]


@hookimpl
def register_region_encoders(register):
    register(
        "mlvl-roialign",
        build_region_encoder,
        config=RoIAlignEncoderOptions,
        description="Groma's multi-level fuse + 14x14 RoIAlign: one token per region (pure PyTorch)",
    )
