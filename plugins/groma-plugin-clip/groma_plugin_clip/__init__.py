"""A CLIP vision tower as Groma's image tokenizer (transformers CLIPVisionModel; open_clip checkpoints converted)."""

from __future__ import annotations

from groma_core.hookspecs import hookimpl
from groma_core.stages import BuildContext
from groma_plugin_clip.open_clip_weights import convert_visual, read_checkpoint, visual_state_dict
from groma_plugin_clip.options import CLIP_MEAN, CLIP_STD, ClipOptions
from groma_plugin_clip.tokenizer import LEVEL_NAMES, ClipImageTokenizer, merge_2x2

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


def build_clip(options: ClipOptions, context: BuildContext) -> ClipImageTokenizer:
    """Factory of the ``clip`` image tokenizer (the first stage built: the context is not needed)."""
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
