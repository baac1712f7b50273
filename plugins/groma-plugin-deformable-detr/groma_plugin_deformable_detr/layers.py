"""Encoder and decoder layers of the Deformable DETR (post-norm, ReLU feed-forward; reference parameter names)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from groma_plugin_deformable_detr.attention import MultiscaleDeformableAttention, QuerySelfAttention


class EncoderLayer(nn.Module):
    """Deformable self-attention over the flattened feature map, then a feed-forward block."""

    def __init__(self, d_model: int, n_heads: int, n_levels: int, n_points: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.dropout = dropout
        self.self_attn = MultiscaleDeformableAttention(d_model, n_heads, n_levels, n_points)
        self.self_attn_layer_norm = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d_model)
        self.final_layer_norm = nn.LayerNorm(d_model)

    def forward(
        self,
        hidden_states: Tensor,
        position_embeddings: Tensor,
        reference_points: Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
    ) -> Tensor:
        """(B, S, d) map tokens with their position embeddings and (B, S, levels, 2) reference points -> (B, S, d)."""
        attended = self.self_attn(hidden_states, position_embeddings, reference_points, hidden_states, spatial_shapes)
        hidden_states = self.self_attn_layer_norm(hidden_states + self._drop(attended))
        return self.final_layer_norm(hidden_states + self._drop(self.fc2(F.relu(self.fc1(hidden_states)))))

    def _drop(self, x: Tensor) -> Tensor:
        return F.dropout(x, p=self.dropout, training=self.training)


class DecoderLayer(nn.Module):
    """Self-attention among the queries, deformable cross-attention into the encoder memory around each query's
    reference box, then a feed-forward block."""

    def __init__(self, d_model: int, n_heads: int, n_levels: int, n_points: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.dropout = dropout
        self.self_attn = QuerySelfAttention(d_model, n_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d_model)
        self.encoder_attn = MultiscaleDeformableAttention(d_model, n_heads, n_levels, n_points)
        self.encoder_attn_layer_norm = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d_model)
        self.final_layer_norm = nn.LayerNorm(d_model)

    def forward(
        self,
        hidden_states: Tensor,
        query_pos: Tensor,
        reference_points: Tensor,
        memory: Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
    ) -> Tensor:
        """(B, Q, d) queries with positional part ``query_pos`` and reference boxes (B, Q, levels, 4) -> (B, Q, d)."""
        attended = self.self_attn(hidden_states, query_pos)
        hidden_states = self.self_attn_layer_norm(hidden_states + self._drop(attended))
        attended = self.encoder_attn(hidden_states, query_pos, reference_points, memory, spatial_shapes)
        hidden_states = self.encoder_attn_layer_norm(hidden_states + self._drop(attended))
        return self.final_layer_norm(hidden_states + self._drop(self.fc2(F.relu(self.fc1(hidden_states)))))

    def _drop(self, x: Tensor) -> Tensor:
        return F.dropout(x, p=self.dropout, training=self.training)


class Encoder(nn.Module):
    """A stack of :class:`EncoderLayer` over one or more flattened feature maps."""

    def __init__(
        self, num_layers: int, d_model: int, n_heads: int, n_levels: int, n_points: int, ffn_dim: int, dropout: float
    ):
        super().__init__()
        self.dropout = dropout
        self.layers = nn.ModuleList(
            EncoderLayer(d_model, n_heads, n_levels, n_points, ffn_dim, dropout) for _ in range(num_layers)
        )

    def forward(self, tokens: Tensor, position_embeddings: Tensor, spatial_shapes: Sequence[tuple[int, int]]) -> Tensor:
        """(B, S, d) map tokens (levels in order, row-major) -> encoder memory (B, S, d)."""
        # every token's reference point is its own pixel centre, the same on every level
        centres = []
        for height, width in spatial_shapes:
            y = (torch.arange(height, dtype=torch.float32, device=tokens.device) + 0.5) / height
            x = (torch.arange(width, dtype=torch.float32, device=tokens.device) + 0.5) / width
            centres.append(torch.stack(torch.meshgrid(x, y, indexing="xy"), -1).reshape(-1, 2))
        reference_points = torch.cat(centres, 0).to(tokens.dtype)
        reference_points = reference_points[None, :, None, :].expand(tokens.shape[0], -1, len(spatial_shapes), -1)
        hidden_states = F.dropout(tokens, p=self.dropout, training=self.training)
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings, reference_points, spatial_shapes)
        return hidden_states


class Decoder(nn.Module):
    """A stack of :class:`DecoderLayer`. Every layer samples around the same reference boxes: the reference never
    refines them between layers (Groma quirk 3)."""

    def __init__(
        self, num_layers: int, d_model: int, n_heads: int, n_levels: int, n_points: int, ffn_dim: int, dropout: float
    ):
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(d_model, n_heads, n_levels, n_points, ffn_dim, dropout) for _ in range(num_layers)
        )

    def forward(
        self,
        target: Tensor,
        query_pos: Tensor,
        reference_boxes: Tensor,
        memory: Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
    ) -> Tensor:
        """Content queries (B, Q, d), their positional part (B, Q, d) and reference boxes (B, Q, 4) cxcywh ->
        the output of every layer (B, layers, Q, d)."""
        reference_points = reference_boxes[:, :, None, :].expand(-1, -1, len(spatial_shapes), -1)
        hidden_states = target
        outputs = []
        for layer in self.layers:
            hidden_states = layer(hidden_states, query_pos, reference_points, memory, spatial_shapes)
            outputs.append(hidden_states)
        return torch.stack(outputs, dim=1)
