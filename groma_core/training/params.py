"""Which parameters a stage trains, and the optimizer's parameter groups (weight decay, learning-rate factors)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase

from torch import nn

from groma_core.errors import did_you_mean
from groma_core.schema import StageConfig


def matches(name: str, pattern: str) -> bool:
    """A glob ``pattern`` matches the parameter ``name`` itself or, as a module path, everything below it."""
    return fnmatchcase(name, pattern) or fnmatchcase(name, pattern + ".*")


def pattern_problems(
    names: Sequence[str], patterns: Iterable[str], where: str, modules: Sequence[str], match_modules: bool
) -> list[str]:
    """One line per pattern that matches no parameter name (nor a module path, with ``match_modules``), with a
    suggestion from the module paths."""
    problems = []
    paths = sorted(set(modules))
    candidates = [*names, *modules] if match_modules else list(names)
    for i, pattern in enumerate(patterns):
        if any(matches(n, pattern) for n in candidates):
            continue
        hint = did_you_mean(pattern.rstrip(".*"), paths)
        tops = ", ".join(sorted({n.split(".", 1)[0] for n in names}))
        problems.append(f"{where}.{i}: {pattern!r} matches no parameter{hint}; top-level modules: {tops}")
    return problems


def trainable_names(model: nn.Module, stage: StageConfig) -> list[str]:
    """Names of the parameters ``stage`` trains: matched by ``train`` and not by ``freeze``, in model order."""
    return [
        name
        for name, _ in model.named_parameters()
        if any(matches(name, p) for p in stage.train) and not any(matches(name, p) for p in stage.freeze)
    ]


def apply_trainable(model: nn.Module, stage: StageConfig) -> list[str]:
    """Set ``requires_grad`` for ``stage`` (trained parameters on, all others off); return the trained names."""
    names = set(trainable_names(model, stage))
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)
    return [n for n, _ in model.named_parameters() if n in names]


def no_decay_names(model: nn.Module) -> set[str]:
    """Biases and the weights of normalization layers (LayerNorm, GroupNorm, RMSNorm, BatchNorm...)."""
    out = set()
    for module_name, module in model.named_modules():
        is_norm = "norm" in type(module).__name__.lower()
        for pname, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{pname}" if module_name else pname
            if is_norm or "bias" in pname:
                out.add(full)
    return out


def param_groups(model: nn.Module, stage: StageConfig) -> list[dict]:
    """AdamW parameter groups over the trainable parameters: one per (learning-rate factor, decay) pair, each
    with ``names``, ``lr``, ``lr_factor`` and ``weight_decay``."""
    exempt = no_decay_names(model) if stage.no_decay_bias_norm else set()
    groups: dict[tuple[float, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        factor = next((f for key, f in stage.lr_multipliers.items() if key in name), 1.0)
        decay = name not in exempt
        group = groups.setdefault(
            (factor, decay),
            {
                "params": [],
                "names": [],
                "lr": stage.lr * factor,
                "lr_factor": factor,
                "weight_decay": stage.weight_decay if decay else 0.0,
            },
        )
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())
