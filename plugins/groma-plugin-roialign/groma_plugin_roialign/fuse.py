"""Groma's multi-level fuse module: coordinate channels, a 1x1 input conv per level, then rounds of cross-level
channel shuffle followed by a 3x3 conv + GroupNorm + ReLU shared by all levels of the round."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def resize_bilinear(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize with ``align_corners=True``, computed in float32 and returned in ``x``'s dtype."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x.float(), size=size, mode="bilinear", align_corners=True).to(x.dtype)


def coordinate_channels(x: Tensor) -> Tensor:
    """(B, 2, h, w) normalized coordinates in [-1, 1]: channel 0 = x (varies along width), channel 1 = y."""
    batch, _, height, width = x.shape
    xs = torch.linspace(-1, 1, width, device=x.device, dtype=x.dtype)
    ys = torch.linspace(-1, 1, height, device=x.device, dtype=x.dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y]).expand(batch, 2, height, width)


class ConvGNReLU(nn.Module):
    """Conv2d(3x3, no bias) -> GroupNorm -> ReLU (mmcv ``ConvModule`` layout: ``conv``, ``gn``)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.gn = nn.GroupNorm(groups, channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.gn(self.conv(x)))


class MLVLFuseModule(nn.Module):
    """Fuses L feature maps of one width C (any spatial sizes) into L maps of the same sizes.

    Each round rebuilds every level l from the previous round's maps (all levels at once): its first C/2
    channels, the last C/4 channels of level min(l+1, L-1) and channels [C/2, 3C/4) of level max(l-1, 0), both
    resized to level l; then the round's shared :class:`ConvGNReLU`.
    """

    def __init__(self, channels: int, num_levels: int = 3, num_fuse: int = 5, gn_groups: int = 64):
        super().__init__()
        if channels % 4:
            raise ValueError(f"MLVLFuseModule: channels must be divisible by 4 for the shuffle, got {channels}")
        self.channels = channels
        self.num_levels = num_levels
        self.input_conv = nn.ModuleList(nn.Conv2d(channels + 2, channels, 1) for _ in range(num_levels))
        self.fuse_convs = nn.ModuleList(ConvGNReLU(channels, gn_groups) for _ in range(num_fuse))

    def shuffle(self, feats: list[Tensor]) -> list[Tensor]:
        """One channel shuffle across levels (before the round's conv)."""
        keep, quarter = self.channels // 2, self.channels // 4
        last = len(feats) - 1
        mixed = []
        for level, feat in enumerate(feats):
            size = tuple(feat.shape[-2:])
            from_top = resize_bilinear(feats[min(level + 1, last)][:, keep + quarter :], size)
            from_down = resize_bilinear(feats[max(level - 1, 0)][:, keep : keep + quarter], size)
            mixed.append(torch.cat([feat[:, :keep], from_top, from_down], dim=1))
        return mixed

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        """Fuse ``num_levels`` maps (B, C, h_l, w_l) -> maps of the same shapes."""
        if len(feats) != self.num_levels:
            raise ValueError(f"MLVLFuseModule: expected {self.num_levels} feature maps, got {len(feats)}")
        feats = [conv(torch.cat([f, coordinate_channels(f)], dim=1)) for conv, f in zip(self.input_conv, feats)]
        for conv in self.fuse_convs:
            feats = [conv(x) for x in self.shuffle(feats)]
        return feats
