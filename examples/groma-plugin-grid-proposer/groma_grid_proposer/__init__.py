"""A multi-scale sliding-window region proposer, registered as ``sliding-window``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from groma_core import BuildContext, ImageFeatures, Proposals, RegionProposer, StageOptions, hookimpl


class SlidingWindowOptions(StageOptions):
    """Options of the ``sliding-window`` proposer."""

    scales: list[float] = Field([0.25, 0.5, 1.0], description="window sides as fractions of the image side")
    overlap: float = Field(0.5, ge=0.0, lt=1.0, description="fraction of a window shared with its neighbour")
    level: str = Field("last", description="image-feature level used to score the windows")
    masks: bool = Field(
        False,
        description="also give a mask per window (the ellipse inscribed in it, at the original image's size; needs "
        "the original images), to show how a proposer that segments hands its masks on",
    )


class SlidingWindowProposer(RegionProposer):
    """Windows at several scales, scored by the feature contrast inside them (sigmoid of a z-score)."""

    def __init__(self, scales: list[float], overlap: float, level: str, masks: bool = False):
        super().__init__()
        self.level, self.masks = level, masks
        windows = []
        for side in scales:
            step = side * (1.0 - overlap)
            n = max(1, int(round((1.0 - side) / step)) + 1) if side < 1.0 else 1
            starts = torch.linspace(0.0, 1.0 - side, n) if n > 1 else torch.zeros(1)
            for y in starts:
                for x in starts:
                    windows.append([float(x), float(y), float(x) + side, float(y) + side])
        self.register_buffer("windows", torch.tensor(windows).clamp(0, 1), persistent=False)

    def forward(self, features: ImageFeatures) -> Proposals:
        fmap = features.level(self.level).float()
        energy = fmap.pow(2).mean(1, keepdim=True)  # (B, 1, h, w)
        h, w = energy.shape[-2:]
        integral = F.pad(energy[:, 0].cumsum(1).cumsum(2), (1, 0, 1, 0))  # (B, h+1, w+1)
        win = self.windows.to(fmap.device)
        x1 = (win[:, 0] * w).floor().long()
        y1 = (win[:, 1] * h).floor().long()
        x2 = (win[:, 2] * w).ceil().long().clamp(min=1)
        y2 = (win[:, 3] * h).ceil().long().clamp(min=1)
        x2 = torch.maximum(x2, x1 + 1).clamp(max=w)
        y2 = torch.maximum(y2, y1 + 1).clamp(max=h)
        sums = integral[:, y2, x2] - integral[:, y1, x2] - integral[:, y2, x1] + integral[:, y1, x1]
        means = sums / ((x2 - x1) * (y2 - y1)).to(sums.dtype)
        flat = energy.flatten(1)
        z = (means - flat.mean(1, keepdim=True)) / (flat.std(1, keepdim=True) + 1e-6)
        scores = torch.sigmoid(z)
        extras = {}
        if self.masks:
            if features.images is None:
                raise ValueError("sliding-window: masks need the original images, and the caller gave none")
            # one (N, H, W) bool tensor per image, at its own size: the core passes them through with the regions
            extras["masks"] = [self._ellipses(win, *image.size) for image in features.images]
        return Proposals([win.clone() for _ in range(fmap.shape[0])], list(scores), extras)

    @staticmethod
    def _ellipses(windows: torch.Tensor, width: int, height: int) -> torch.Tensor:
        ys = (torch.arange(height, dtype=torch.float32)[:, None] + 0.5) / height
        xs = (torch.arange(width, dtype=torch.float32)[None, :] + 0.5) / width
        cx, cy = (windows[:, 0] + windows[:, 2]) / 2, (windows[:, 1] + windows[:, 3]) / 2
        rx, ry = (windows[:, 2] - windows[:, 0]) / 2, (windows[:, 3] - windows[:, 1]) / 2
        dx = (xs[None] - cx[:, None, None].cpu()) / rx[:, None, None].cpu()
        dy = (ys[None] - cy[:, None, None].cpu()) / ry[:, None, None].cpu()
        return dx**2 + dy**2 <= 1.0


def _build(options: SlidingWindowOptions, context: BuildContext) -> SlidingWindowProposer:
    if context.level_channels and options.level not in context.level_channels:
        raise ValueError(
            f"sliding-window: level {options.level!r} is not produced by the image tokenizer "
            f"(it has {sorted(context.level_channels)})"
        )
    return SlidingWindowProposer(options.scales, options.overlap, options.level, options.masks)


@hookimpl
def register_region_proposers(register):
    register(
        "sliding-window",
        _build,
        config=SlidingWindowOptions,
        description="multi-scale sliding windows scored by feature contrast (no weights)",
    )
