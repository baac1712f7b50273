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


def build(recipe, overrides=(), manager=None):
    """Build the pipeline a recipe (a :class:`~groma_core.recipe.Recipe`, a path or a shipped name) describes."""
    from groma_core.api import build as _build

    return _build(recipe, overrides, manager)


def load(model=None, overrides=(), manager=None, *, quantize=None, dtype=None, convert_overrides=()):
    """Load a model (a :class:`~groma_core.model.GromaModel`: it computes; ``groma_core.Groma.load`` gives the task
    API over it) from a checkpoint directory, a recipe or a Hugging Face Hub repo id (``org/name[@revision]``);
    with no ``model``, the embedded default model (a tiny Groma trained on synthetic shapes). See
    :func:`groma_core.api.load`."""
    from groma_core.api import load as _load

    return _load(model, overrides, manager, quantize=quantize, dtype=dtype, convert_overrides=convert_overrides)


def __getattr__(name):
    if name == "Groma":  # the task API, imported on first use
        from groma_core.inference import Groma

        return Groma
    raise AttributeError(f"module 'groma_core' has no attribute {name!r}")


__all__ = [
    "BackboneOutput",
    "Groma",
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
    "build",
    "load",
]
