"""Groma's DINOv2 image tokenizer (DINOv2-L/14 at 448 px, 2x2 token merge)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from groma_core.hookspecs import hookimpl
from groma_core.plugins import lazy_exports
from groma_core.stages import BuildContext
from groma_plugin_dinov2.options import Dinov2Options

if TYPE_CHECKING:
    from groma_plugin_dinov2.tokenizer import Dinov2ImageTokenizer

__all__ = ["LEVEL_NAMES", "Dinov2ImageTokenizer", "Dinov2Options", "build_dinov2", "merge_neighbours"]


# transformers (the encoder) is imported when a stage is built or one of these names is used, not when the plugin loads
__getattr__ = lazy_exports(
    __name__, {"LEVEL_NAMES": ".tokenizer", "Dinov2ImageTokenizer": ".tokenizer", "merge_neighbours": ".tokenizer"}
)


def build_dinov2(options: Dinov2Options, context: BuildContext) -> Dinov2ImageTokenizer:
    """Factory of the ``dinov2`` image tokenizer (the first stage built: the context is not needed)."""
    from groma_plugin_dinov2.tokenizer import Dinov2ImageTokenizer

    return Dinov2ImageTokenizer(options)


@hookimpl
def register_image_tokenizers(register):
    register(
        "dinov2",
        build_dinov2,
        config=Dinov2Options,
        description="frozen DINOv2-L/14 at 448 px: 2x2-merged patch tokens and the last four layers as maps",
    )
