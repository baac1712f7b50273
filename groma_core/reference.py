"""Reading state dicts of the reference Groma implementation (the released checkpoints, the golden fixtures)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from groma_core.errors import CheckpointError
from groma_core.stages import Stage

#: reference modules saved twice (once under ``ddetr_transformer.`` and once under ``ddetr_transformer.decoder.``)
ALIASED_MODULES = ("bbox_embed", "class_embed_enc", "class_embed_coco", "class_embed_sa1b")
_DDETR = "perceiver.ddetr_transformer."


def alias_original(key: str) -> str | None:
    """For an alias key of the reference checkpoint, the key it duplicates; None for any other key."""
    if key.startswith(_DDETR):
        rest = key[len(_DDETR) :]
        if rest.split(".", 1)[0] in ALIASED_MODULES:
            return _DDETR + "decoder." + rest
    return None


@dataclass
class LoadReport:
    """What :func:`load_reference_weights` did."""

    loaded: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # reference keys the stage chose not to keep


def map_reference_keys(stage: Stage, keys: list[str]) -> tuple[dict[str, str], list[str]]:
    """Map the reference keys that belong to ``stage`` to its own keys: ({reference key: own key}, dropped)."""
    mapping: dict[str, str] = {}
    dropped: list[str] = []
    for key in keys:
        if alias_original(key) is not None or not key.startswith(stage.reference_prefixes):
            continue
        own = stage.reference_key(key)
        if own is None:
            dropped.append(key)
        else:
            mapping[key] = own
    return mapping, dropped


def persistent_state_keys(module: nn.Module) -> dict[str, torch.Size]:
    """Shapes of a module's state dict (persistent buffers included, non-persistent ones excluded)."""
    return {k: v.shape for k, v in module.state_dict(keep_vars=True).items()}


def load_reference_weights(stage: Stage, tensors: Mapping[str, Tensor], where: str = "reference weights") -> LoadReport:
    """Copy the reference tensors of ``stage`` into it; every parameter must be covered with the right shape."""
    mapping, dropped = map_reference_keys(stage, list(tensors))
    expected = persistent_state_keys(stage)
    problems: list[str] = []
    state: dict[str, Tensor] = {}
    for ref_key, own in mapping.items():
        if own not in expected:
            problems.append(f"{ref_key} -> {own}: no such parameter in {type(stage).__name__}")
            continue
        if tuple(tensors[ref_key].shape) != tuple(expected[own]):
            problems.append(f"{ref_key}: shape {tuple(tensors[ref_key].shape)} but {own} has {tuple(expected[own])}")
            continue
        state[own] = tensors[ref_key]
    missing = sorted(set(expected) - set(state))
    problems += [f"missing tensor for {k}" for k in missing]
    if problems:
        raise CheckpointError(f"{where}: " + "; ".join(problems[:20]) + (" ..." if len(problems) > 20 else ""))
    stage.load_state_dict(state, strict=True)
    return LoadReport(loaded=sorted(mapping), dropped=dropped)
