"""Class-agnostic region proposals from any detectron2 model (a config and its weights).

detectron2 has no release on the package registry. Without it this module raises ImportError on import, so that
``groma plugins`` shows the plugin with that error and the install instructions instead of silently offering
nothing.
"""

from __future__ import annotations

import importlib.util

from groma_core.hookspecs import hookimpl
from groma_core.stages import BuildContext

MISSING_DETECTRON2 = (
    "groma-plugin-detectron2 needs detectron2, which is not installed and has no release on PyPI: install it from "
    "source, e.g. `pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git'` "
    "(needs torch, a working torchvision and a C++ compiler; see the plugin's README); until then the "
    "'detectron2' region proposer is not available"
)

if importlib.util.find_spec("detectron2") is None:
    raise ImportError(MISSING_DETECTRON2)

from groma_plugin_detectron2.options import Detectron2Options  # noqa: E402 - only once detectron2 is known present
from groma_plugin_detectron2.proposer import Detectron2Proposer  # noqa: E402

__all__ = ["MISSING_DETECTRON2", "Detectron2Options", "Detectron2Proposer", "build_detectron2"]


def build_detectron2(options: Detectron2Options, context: BuildContext) -> Detectron2Proposer:
    """Factory of the ``detectron2`` proposer (it reads the original images, not the context's feature levels)."""
    return Detectron2Proposer(options)


@hookimpl
def register_region_proposers(register):
    register(
        "detectron2",
        build_detectron2,
        config=Detectron2Options,
        description="any detectron2 model (config + weights) on the original images: class-agnostic boxes",
    )
