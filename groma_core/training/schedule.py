"""Learning-rate schedules: linear warmup from 0, then cosine, linear or constant (as transformers' schedulers)."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from groma_core.schema import StageConfig


def warmup_steps(stage: StageConfig, total_steps: int) -> int:
    """The stage's warmup length in optimizer steps (a ratio rounds up, as transformers does)."""
    if stage.warmup_steps:
        return stage.warmup_steps
    return math.ceil(stage.warmup_ratio * total_steps)


def lr_factor(step: int, total_steps: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total_steps - warmup)
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 1.0


def make_scheduler(optimizer: Optimizer, stage: StageConfig, total_steps: int) -> LambdaLR:
    """A scheduler stepped once per optimizer step; every parameter group keeps its own peak (lr factors)."""
    warmup = warmup_steps(stage, total_steps)
    return LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, warmup, stage.schedule))
