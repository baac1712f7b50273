"""groma-core: grounded multimodal language models with swappable stages (a reproduction of Groma)."""

from groma_core.config import StageOptions
from groma_core.hookspecs import hookimpl
from groma_core.stages import (
    BackboneOutput,
    BuildContext,
    ImageTokenizer,
    LanguageBackbone,
    RegionEncoder,
    RegionProposer,
)
from groma_core.types import GroundedAnswer, GroundedPhrase, ImageFeatures, Proposals, Regions

__version__ = "0.1.0"

__all__ = [
    "BackboneOutput",
    "BuildContext",
    "GroundedAnswer",
    "GroundedPhrase",
    "ImageFeatures",
    "ImageTokenizer",
    "LanguageBackbone",
    "Proposals",
    "RegionEncoder",
    "RegionProposer",
    "Regions",
    "StageOptions",
    "hookimpl",
    "__version__",
]
