"""A CLIP vision tower as Groma's image tokenizer (transformers CLIPVisionModel; open_clip checkpoints converted)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from groma_core.hookspecs import hookimpl
from groma_core.plugins import lazy_exports
from groma_core.stages import BuildContext
from groma_plugin_clip.options import CLIP_MEAN, CLIP_STD, ClipOptions

if TYPE_CHECKING:
    from groma_plugin_clip.tokenizer import ClipImageTokenizer

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "LEVEL_NAMES",
    "ClipImageTokenizer",
    "ClipOptions",
    "build_clip",
    "convert_visual",
    "merge_2x2",
    "read_checkpoint",
    "visual_state_dict",
]


# transformers (the vision tower) is imported when a stage is built or one of these names is used
__getattr__ = lazy_exports(
    __name__,
    {"convert_visual": ".open_clip_weights", "read_checkpoint": ".open_clip_weights",
     "visual_state_dict": ".open_clip_weights", "LEVEL_NAMES": ".tokenizer", "ClipImageTokenizer": ".tokenizer",
     "merge_2x2": ".tokenizer"},
)  # fmt: skip


def build_clip(options: ClipOptions, context: BuildContext) -> ClipImageTokenizer:
    """Factory of the ``clip`` image tokenizer (the first stage built: the context is not needed)."""
    from groma_plugin_clip.tokenizer import ClipImageTokenizer

    return ClipImageTokenizer(options)


@hookimpl
def register_image_tokenizers(register):
    register(
        "clip",
        build_clip,
        config=ClipOptions,
        description="frozen CLIP ViT-L/14 at 336 px (transformers; open_clip checkpoints converted): 2x2-merged "
        "patch tokens and the last four layers as maps",
    )
