"""Base class of plugin option models (the part of a recipe's stage section beside ``plugin:``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class StageOptions(BaseModel):
    """Options of a stage plugin. Subclass it and declare fields with types, defaults and descriptions;
    unknown keys are rejected so that a misspelled option never passes silently."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    @classmethod
    def from_reference_config(cls, groma_config: dict[str, Any]) -> StageOptions:
        """Optional: the options that rebuild this stage of a reference Groma checkpoint from its ``config.json``
        (a ``GromaConfig`` as a dict). ``groma convert`` calls it on the plugins that take a reference checkpoint's
        weights (the default ones implement it); a plugin without it cannot be a conversion target."""
        raise NotImplementedError(f"{cls.__name__} does not derive its options from a reference Groma config")
