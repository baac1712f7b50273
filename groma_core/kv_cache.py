"""Passing a key/value cache to a transformers model under the name that model takes.

transformers up to 5.23 takes and returns the cache as ``past_key_values``; later releases call it ``cache`` and warn
(FutureWarning, removal announced for 5.40) when the old name is passed. Which name applies is read from the model
itself (its ``forward`` signature, its output's fields), not from the version string, so a model that still uses the
old name in a new release keeps working too. The :class:`~groma_core.stages.LanguageBackbone` interface keeps its
own ``past_key_values`` argument and field; only the call into transformers changes.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn


def cache_keyword(model: nn.Module) -> str:
    """The keyword ``model.forward`` takes its key/value cache under: ``"cache"`` or ``"past_key_values"``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(output: Any) -> Any:
    """The key/value cache a transformers model output holds (``cache``; ``past_key_values`` in older releases)."""
    fields = getattr(output, "__dataclass_fields__", {})
    return output.cache if "cache" in fields else output.past_key_values


def run_with_cache(model: nn.Module, past: Any = None, use_cache: bool = False, **inputs: Any) -> tuple[Any, Any]:
    """``model(**inputs)`` with ``past`` passed as its key/value cache: (the output, the cache it returns, or None
    without ``use_cache``)."""
    out = model(**inputs, use_cache=use_cache, **{cache_keyword(model): past})
    return out, (returned_cache(out) if use_cache else None)
