"""Sine position embeddings of the Deformable DETR: for feature-map pixels and for proposal boxes."""

from __future__ import annotations

import math

import torch
from torch import Tensor

TEMPERATURE = 10000
SCALE = 2 * math.pi


def _frequencies(num_feats: int, device: torch.device) -> Tensor:
    """Divisors ``temperature ** (2 * floor(i / 2) / num_feats)`` for i < num_feats (float32)."""
    index = torch.arange(num_feats, dtype=torch.float32, device=device)
    return TEMPERATURE ** (2 * torch.div(index, 2, rounding_mode="floor") / num_feats)


def _sin_cos(angles: Tensor) -> Tensor:
    """(..., F) angles -> (..., F): sine of the even entries interleaved with cosine of the odd ones."""
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)


def map_position_embedding(height: int, width: int, num_feats: int, device: torch.device) -> Tensor:
    """Position embedding (2 * num_feats, height, width) of an all-valid map: ``[y features, x features]`` of the
    pixel's 1-based row/column, normalized by the map size (offset -0.5, eps 1e-6) and scaled to 2 pi."""
    eps = 1e-6
    y = torch.arange(1, height + 1, dtype=torch.float32, device=device)
    x = torch.arange(1, width + 1, dtype=torch.float32, device=device)
    y = (y - 0.5) / (y[-1:] + eps) * SCALE
    x = (x - 0.5) / (x[-1:] + eps) * SCALE
    freqs = _frequencies(num_feats, device)
    pos_y = _sin_cos(y[:, None] / freqs)  # (h, F)
    pos_x = _sin_cos(x[:, None] / freqs)  # (w, F)
    grid = torch.cat(
        (pos_y[:, None, :].expand(height, width, num_feats), pos_x[None, :, :].expand(height, width, num_feats)), -1
    )
    return grid.permute(2, 0, 1)


def box_position_embedding(box_logits: Tensor, num_feats: int) -> Tensor:
    """Position embedding (..., 4 * num_feats) of boxes given as logits (..., 4): each sigmoid coordinate,
    scaled to 2 pi, gets ``num_feats`` interleaved sine/cosine features (computed in float32)."""
    angles = box_logits.float().sigmoid() * SCALE
    return _sin_cos(angles[..., None] / _frequencies(num_feats, box_logits.device)).flatten(-2).to(box_logits.dtype)
