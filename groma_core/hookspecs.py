"""The plugin API of groma-core: one hook per stage kind.

A plugin is a module (or object) with functions marked ``@groma_core.hookimpl``, published through an entry point
in the group ``groma``. Each hook receives a ``register`` callable and calls it once per stage it provides::

    register(name, factory, config=ConfigClass, description="one line")

``factory(config, context)`` builds the stage from a validated instance of ``config`` (a pydantic model) and a
:class:`~groma_core.stages.BuildContext`.
"""

from __future__ import annotations

from pluggy import HookimplMarker, HookspecMarker

hookspec = HookspecMarker("groma")
hookimpl = HookimplMarker("groma")


@hookspec
def register_image_tokenizers(register):
    """Register image tokenizers: factories returning an ImageTokenizer (images -> image tokens + feature levels)."""


@hookspec
def register_region_proposers(register):
    """Register region proposers: factories returning a RegionProposer (image features -> scored candidate boxes)."""


@hookspec
def register_region_encoders(register):
    """Register region encoders: factories returning a RegionEncoder (features + boxes -> one token per region)."""


@hookspec
def register_language_backbones(register):
    """Register language backbones: factories returning a LanguageBackbone (embeddings -> next-token logits)."""
