"""Attention modules of the Deformable DETR: multi-scale deformable attention and query self-attention."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def multi_scale_deformable_attention(
    value: Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Deformable attention in pure PyTorch (bilinear ``grid_sample``, zero padding, ``align_corners=False``).

    ``value``: (B, S, heads, head_dim) with S = sum of h * w over ``spatial_shapes`` (levels in order, row-major);
    ``sampling_locations``: (B, Q, heads, levels, points, 2) as normalized (x, y) in [0, 1];
    ``attention_weights``: (B, Q, heads, levels, points). Returns (B, Q, heads * head_dim).
    """
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    if len(spatial_shapes) != levels:
        raise ValueError(f"spatial_shapes has {len(spatial_shapes)} levels, sampling_locations {levels}")
    if sum(h * w for h, w in spatial_shapes) != value.shape[1]:
        raise ValueError(f"spatial_shapes {list(spatial_shapes)} do not cover the {value.shape[1]} values")
    # in float32 whatever the model's dtype: CPU grid_sample in bfloat16/float16 returns NaN for finite inputs
    dtype = value.dtype
    value, sampling_locations, attention_weights = value.float(), sampling_locations.float(), attention_weights.float()
    grids = 2 * sampling_locations - 1
    sampled = []
    start = 0
    for level, (height, width) in enumerate(spatial_shapes):
        # (B, h*w, heads, head_dim) -> (B * heads, head_dim, h, w)
        level_value = value[:, start : start + height * width].flatten(2).transpose(1, 2)
        level_value = level_value.reshape(batch * heads, head_dim, height, width)
        # (B, Q, heads, points, 2) -> (B * heads, Q, points, 2)
        level_grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(
            F.grid_sample(level_value, level_grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
        start += height * width
    # (B * heads, 1, Q, levels * points)
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    output = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)
    return output.view(batch, heads * head_dim, queries).transpose(1, 2).contiguous().to(dtype)


class MultiscaleDeformableAttention(nn.Module):
    """Each query attends to ``n_points`` learned offsets around its reference point on every level.

    Reference points are (x, y) in [0, 1] (offsets normalized by the map size) or boxes (cx, cy, w, h) (offsets
    scaled by half the box size divided by ``n_points``). Parameter names follow the reference.
    """

    def __init__(self, d_model: int, n_heads: int, n_levels: int, n_points: int):
        super().__init__()
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_levels = n_levels
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Deformable DETR's initialisation: offsets start on a ring of directions, one per head, at distances
        1..n_points; uniform attention weights; Xavier projections."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        distance = torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1) * distance
        self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(
        self,
        queries: Tensor,
        position_embeddings: Tensor | None,
        reference_points: Tensor,
        memory: Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
    ) -> Tensor:
        """``queries`` (B, Q, d) (+ ``position_embeddings``) sample ``memory`` (B, S, d) around
        ``reference_points`` (B, Q, levels, 2 or 4); returns (B, Q, d)."""
        if position_embeddings is not None:
            queries = queries + position_embeddings
        batch, num_queries, _ = queries.shape
        value = self.value_proj(memory).view(batch, memory.shape[1], self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(queries).view(batch, num_queries, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(queries).view(batch, num_queries, self.n_heads, self.n_levels * self.n_points)
        weights = F.softmax(weights, -1).view(batch, num_queries, self.n_heads, self.n_levels, self.n_points)
        if reference_points.shape[-1] == 2:
            normalizer = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=offsets.dtype, device=offsets.device)
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            locations = (
                reference_points[:, :, None, :, None, :2]
                + offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(
                f"reference_points must end in 2 or 4 coordinates, got shape {tuple(reference_points.shape)}"
            )
        output = multi_scale_deformable_attention(value, spatial_shapes, locations, weights)
        return self.output_proj(output)


class QuerySelfAttention(nn.Module):
    """Multi-head self-attention among the decoder queries; position embeddings are added to queries and keys,
    not to values. Parameter names follow the reference (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``)."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.q_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, hidden_states: Tensor, position_embeddings: Tensor | None) -> Tensor:
        """(B, Q, d) -> (B, Q, d)."""
        batch, length, d_model = hidden_states.shape
        query_key = hidden_states if position_embeddings is None else hidden_states + position_embeddings

        def heads(x: Tensor) -> Tensor:
            return x.view(batch, length, self.n_heads, d_model // self.n_heads).transpose(1, 2)

        attended = F.scaled_dot_product_attention(
            heads(self.q_proj(query_key)), heads(self.k_proj(query_key)), heads(self.v_proj(hidden_states))
        )
        return self.out_proj(attended.transpose(1, 2).reshape(batch, length, d_model))
