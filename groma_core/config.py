"""Base class of plugin option models (the part of a recipe's stage section beside ``plugin:``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StageOptions(BaseModel):
    """Options of a stage plugin. Subclass it and declare fields with types, defaults and descriptions;
    unknown keys are rejected so that a misspelled option never passes silently."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
